//! The data pipeline end to end on image files the tests write: indexing, decoding of every
//! format and colour type, bad files, the loader's batches, determinism, cache and splits.

use std::fs;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use lanner_data::decode::{decode_file, read_header};
use lanner_data::synthetic::{ShapesSpec, write_shapes};
use lanner_data::{
    Augmentation, Batch, DataError, ImageFolder, Loader, LoaderConfig, Subset, ValidationSplit,
};

fn touch_dir(path: &Path) -> PathBuf {
    fs::create_dir_all(path).unwrap();
    path.to_path_buf()
}

fn solid(width: u32, height: u32, rgb: [u8; 3]) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_pixel(width, height, Rgb(rgb)))
}

/// A palette PNG (colour type 3), which the `image` crate cannot write itself.
fn write_palette_png(path: &Path) {
    let file = fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(file, 4, 2);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(vec![255, 0, 0, 0, 0, 255]);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&[0, 1, 0, 1, 1, 0, 1, 0]).unwrap();
}

/// A BMP header that claims 60000 x 60000 pixels and carries none.
fn write_bomb_bmp(path: &Path) {
    let mut header = Vec::new();
    header.extend_from_slice(b"BM");
    header.extend_from_slice(&(54u32 + 16).to_le_bytes());
    header.extend_from_slice(&[0; 4]);
    header.extend_from_slice(&54u32.to_le_bytes());
    header.extend_from_slice(&40u32.to_le_bytes());
    header.extend_from_slice(&60_000i32.to_le_bytes());
    header.extend_from_slice(&60_000i32.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes());
    header.extend_from_slice(&24u16.to_le_bytes());
    header.extend_from_slice(&[0; 24]);
    header.extend_from_slice(&[0; 16]);
    fs::write(path, header).unwrap();
}

/// Two classes in every format and colour type, nested folders, and things Keras ignores.
fn mixed_folder(root: &Path) {
    let cats = touch_dir(&root.join("cats"));
    let dogs = touch_dir(&root.join("dogs"));
    solid(40, 30, [200, 10, 10])
        .save_with_format(cats.join("a.jpg"), ImageFormat::Jpeg)
        .unwrap();
    solid(12, 9, [10, 200, 10])
        .save_with_format(cats.join("b.PNG"), ImageFormat::Png)
        .unwrap();
    DynamicImage::ImageLuma8(ImageBuffer::from_pixel(8, 8, Luma([77])))
        .save_with_format(cats.join("c_grey.png"), ImageFormat::Png)
        .unwrap();
    DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(8, 8, LumaA([90, 10])))
        .save_with_format(cats.join("d_grey_alpha.png"), ImageFormat::Png)
        .unwrap();
    let nested = touch_dir(&cats.join("more"));
    DynamicImage::ImageRgba8(ImageBuffer::from_pixel(6, 6, Rgba([1, 2, 3, 4])))
        .save_with_format(nested.join("e_rgba.png"), ImageFormat::Png)
        .unwrap();
    DynamicImage::ImageRgb16(ImageBuffer::from_pixel(5, 5, Rgb([65535, 32896, 0])))
        .save_with_format(dogs.join("f_16bit.png"), ImageFormat::Png)
        .unwrap();
    solid(7, 7, [0, 0, 255])
        .save_with_format(dogs.join("g.bmp"), ImageFormat::Bmp)
        .unwrap();
    solid(9, 9, [255, 255, 0])
        .save_with_format(dogs.join("h.gif"), ImageFormat::Gif)
        .unwrap();
    write_palette_png(&dogs.join("i_palette.png"));
    // Ignored: a file in the top folder, hidden files and folders, other extensions.
    solid(4, 4, [0, 0, 0])
        .save_with_format(root.join("top.jpg"), ImageFormat::Jpeg)
        .unwrap();
    solid(4, 4, [0, 0, 0])
        .save_with_format(dogs.join(".hidden.jpg"), ImageFormat::Jpeg)
        .unwrap();
    touch_dir(&root.join(".thumbnails"));
    fs::write(dogs.join("notes.txt"), "not an image").unwrap();
}

#[test]
fn classes_are_sorted_folders_and_files_follow_keras_order() {
    let dir = tempfile::tempdir().unwrap();
    mixed_folder(dir.path());
    let folder = ImageFolder::open(dir.path()).unwrap();
    assert_eq!(folder.class_names, vec!["cats", "dogs"]);
    let names: Vec<String> = folder
        .samples
        .iter()
        .map(|s| {
            s.path
                .strip_prefix(dir.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        vec![
            "cats/a.jpg",
            "cats/b.PNG",
            "cats/c_grey.png",
            "cats/d_grey_alpha.png",
            "cats/more/e_rgba.png",
            "dogs/f_16bit.png",
            "dogs/g.bmp",
            "dogs/h.gif",
            "dogs/i_palette.png",
        ]
    );
    let labels: Vec<usize> = folder.samples.iter().map(|s| s.label).collect();
    assert_eq!(labels, vec![0, 0, 0, 0, 0, 1, 1, 1, 1]);
    assert_eq!(folder.class_counts(), vec![5, 4]);
}

#[test]
fn every_colour_type_becomes_8_bit_rgb() {
    let dir = tempfile::tempdir().unwrap();
    mixed_folder(dir.path());
    let pixel = |name: &str, x: u32, y: u32| {
        let decoded = decode_file(&dir.path().join(name), u64::MAX).unwrap();
        decoded.image.get_pixel(x, y).0
    };
    assert_eq!(pixel("cats/c_grey.png", 0, 0), [77, 77, 77]);
    assert_eq!(pixel("cats/d_grey_alpha.png", 3, 3), [90, 90, 90]);
    assert_eq!(pixel("cats/more/e_rgba.png", 1, 1), [1, 2, 3]);
    assert_eq!(pixel("dogs/f_16bit.png", 0, 0), [255, 128, 0]);
    assert_eq!(pixel("dogs/g.bmp", 2, 2), [0, 0, 255]);
    assert_eq!(pixel("dogs/h.gif", 2, 2), [255, 255, 0]);
    assert_eq!(pixel("dogs/i_palette.png", 0, 0), [255, 0, 0]);
    assert_eq!(pixel("dogs/i_palette.png", 1, 0), [0, 0, 255]);
    let jpeg = pixel("cats/a.jpg", 20, 15);
    assert!(jpeg[0] > 190 && jpeg[1] < 25 && jpeg[2] < 25, "{jpeg:?}");
}

#[test]
fn bad_files_are_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::write(root.join("empty.jpg"), b"").unwrap();
    fs::write(root.join("text.jpg"), b"hello, I am not a picture").unwrap();
    let mut jpeg = Vec::new();
    solid(64, 64, [1, 2, 3])
        .write_to(&mut std::io::Cursor::new(&mut jpeg), ImageFormat::Jpeg)
        .unwrap();
    fs::write(root.join("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    write_bomb_bmp(&root.join("bomb.bmp"));

    let message = |name: &str| {
        decode_file(&root.join(name), 100_000_000)
            .err()
            .unwrap()
            .to_string()
    };
    assert!(
        message("empty.jpg").contains("empty.jpg': the file is empty"),
        "{}",
        message("empty.jpg")
    );
    assert!(
        message("text.jpg").contains("not a JPEG, PNG, BMP or GIF"),
        "{}",
        message("text.jpg")
    );
    assert!(
        message("truncated.jpg").starts_with("cannot decode"),
        "{}",
        message("truncated.jpg")
    );
    let bomb = message("bomb.bmp");
    assert!(
        bomb.contains("claims 60000x60000 pixels") && bomb.contains("--max-image-pixels"),
        "{bomb}"
    );
    // The header alone is enough to refuse it.
    assert!(matches!(
        read_header(&root.join("bomb.bmp"), 100_000_000),
        Err(DataError::TooLarge { .. })
    ));
}

#[test]
fn folder_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = ImageFolder::open(&dir.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("does not exist") && missing.contains("one sub-folder per class"),
        "{missing}"
    );

    let no_classes = ImageFolder::open(dir.path()).unwrap_err().to_string();
    assert!(no_classes.contains("has no class folders"), "{no_classes}");

    let file = dir.path().join("file.jpg");
    fs::write(&file, b"x").unwrap();
    assert!(
        ImageFolder::open(&file)
            .unwrap_err()
            .to_string()
            .contains("is a file, not a folder")
    );

    let one = touch_dir(&dir.path().join("only"));
    solid(4, 4, [1, 1, 1])
        .save_with_format(one.join("x.png"), ImageFormat::Png)
        .unwrap();
    let folder = ImageFolder::open(dir.path()).unwrap();
    let single = folder.require_two_classes().unwrap_err().to_string();
    assert!(single.contains("only one class ('only')"), "{single}");

    touch_dir(&dir.path().join("zebra"));
    let empty = ImageFolder::open(dir.path()).unwrap_err().to_string();
    assert!(empty.contains("zebra' holds no images"), "{empty}");
}

fn shapes(root: &Path, per_class: usize) {
    let spec = ShapesSpec {
        per_class,
        width: 48,
        height: 36,
        seed: 3,
        format: ImageFormat::Png,
    };
    write_shapes(root, &spec).unwrap();
}

fn collect(loader: &Loader, epoch: u64) -> Vec<Batch> {
    loader.epoch(epoch).map(|b| b.unwrap()).collect()
}

fn config(batch_size: usize) -> LoaderConfig {
    let mut config = LoaderConfig::new(batch_size, (24, 32));
    config.seed = 11;
    config.workers = 2;
    config.augmentation = Some(Augmentation::seed_recipe(0.2));
    config
}

#[test]
fn batches_have_the_model_layout_and_pixel_range() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 10);
    let folder = ImageFolder::open(dir.path()).unwrap();
    let loader = Loader::new(folder.samples, config(8)).unwrap();
    let batches = collect(&loader, 0);
    assert_eq!(
        batches.iter().map(Batch::len).collect::<Vec<_>>(),
        vec![8, 8, 4]
    );
    for batch in &batches {
        assert_eq!(batch.images.len(), batch.len() * 3 * 24 * 32);
        assert!(batch.images.iter().all(|&v| (0.0..=255.0).contains(&v)));
        let tensor = batch.images_tensor(&burn::tensor::Device::flex());
        assert_eq!(tensor.dims(), [batch.len(), 3, 24, 32]);
    }
    // Every sample once per epoch, labels matching their folders.
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.samples.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    for batch in &batches {
        for (&sample, &label) in batch.samples.iter().zip(&batch.labels) {
            assert_eq!(label, loader.samples()[sample].label);
        }
    }
    let device = burn::tensor::Device::flex();
    let first = &batches[0];
    let ints: Vec<i64> = first
        .labels_tensor(&device)
        .into_data()
        .iter::<i64>()
        .collect();
    assert_eq!(
        ints,
        first.labels.iter().map(|&l| l as i64).collect::<Vec<_>>()
    );
    let binary = first.binary_labels_tensor(&device);
    assert_eq!(binary.dims(), [8, 1]);
    let binary: Vec<f32> = binary.into_data().try_to_vec().unwrap();
    assert_eq!(
        binary,
        first.labels.iter().map(|&l| l as f32).collect::<Vec<_>>()
    );
    let one_hot: Vec<f32> = first
        .one_hot_labels_tensor(2, &device)
        .into_data()
        .try_to_vec()
        .unwrap();
    for (row, &label) in first.labels.iter().enumerate() {
        assert_eq!(one_hot[row * 2 + label], 1.0);
        assert_eq!(one_hot[row * 2 + 1 - label], 0.0);
    }
}

#[test]
fn same_seed_same_batches_whatever_the_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 12);
    let samples = ImageFolder::open(dir.path()).unwrap().samples;
    let one = Loader::new(
        samples.clone(),
        LoaderConfig {
            workers: 1,
            ..config(5)
        },
    )
    .unwrap();
    let three = Loader::new(
        samples.clone(),
        LoaderConfig {
            workers: 3,
            prefetch: 1,
            ..config(5)
        },
    )
    .unwrap();
    let other_seed = Loader::new(
        samples,
        LoaderConfig {
            seed: 12,
            ..config(5)
        },
    )
    .unwrap();
    let (a, b, c) = (
        collect(&one, 1),
        collect(&three, 1),
        collect(&other_seed, 1),
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.samples, y.samples);
        assert_eq!(x.images, y.images);
    }
    assert_ne!(a[0].samples, c[0].samples);
    // A new epoch reshuffles.
    let next = collect(&one, 2);
    assert_ne!(a[0].samples, next[0].samples);
    // A run resumed mid-epoch gets the rest of the same epoch.
    let rest: Vec<Batch> = three.epoch_from(1, 2).map(|b| b.unwrap()).collect();
    assert_eq!(rest.len(), a.len() - 2);
    for (x, y) in a[2..].iter().zip(&rest) {
        assert_eq!(x.samples, y.samples);
        assert_eq!(x.images, y.images);
    }
}

#[test]
fn cache_gives_the_same_batches_as_decoding() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 6);
    let samples = ImageFolder::open(dir.path()).unwrap().samples;
    let plain = Loader::new(samples.clone(), config(4)).unwrap();
    let cached = Loader::new(
        samples,
        LoaderConfig {
            cache: true,
            ..config(4)
        },
    )
    .unwrap();
    for epoch in 0..3 {
        for (x, y) in collect(&plain, epoch).iter().zip(&collect(&cached, epoch)) {
            assert_eq!(x.images, y.images, "epoch {epoch}");
        }
    }
    // Even after the files are gone, the cache serves them.
    fs::remove_dir_all(dir.path().join("circle")).unwrap();
    assert_eq!(
        collect(&cached, 3).iter().map(Batch::len).sum::<usize>(),
        12
    );
}

#[test]
fn no_augmentation_means_resize_only_and_no_randomness() {
    let dir = tempfile::tempdir().unwrap();
    let class_a = touch_dir(&dir.path().join("a"));
    let class_b = touch_dir(&dir.path().join("b"));
    solid(10, 10, [10, 20, 30])
        .save_with_format(class_a.join("x.png"), ImageFormat::Png)
        .unwrap();
    solid(10, 10, [40, 50, 60])
        .save_with_format(class_b.join("y.png"), ImageFormat::Png)
        .unwrap();
    let samples = ImageFolder::open(dir.path()).unwrap().samples;
    let mut cfg = LoaderConfig::new(2, (4, 4));
    cfg.shuffle = false;
    let batch = collect(&Loader::new(samples, cfg).unwrap(), 0).remove(0);
    assert_eq!(batch.labels, vec![0, 1]);
    let plane = 16;
    assert!(batch.images[..plane].iter().all(|&v| v == 10.0));
    assert!(batch.images[plane..2 * plane].iter().all(|&v| v == 20.0));
    assert!(
        batch.images[3 * plane + 2 * plane..]
            .iter()
            .all(|&v| v == 60.0)
    );
}

#[test]
fn undecodable_files_are_skipped_and_reported_unless_strict() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 4);
    fs::write(dir.path().join("circle/zz_broken.png"), b"garbage").unwrap();
    let samples = ImageFolder::open(dir.path()).unwrap().samples;
    assert_eq!(samples.len(), 9);

    let loader = Loader::new(samples.clone(), config(4)).unwrap();
    let batches = collect(&loader, 0);
    let total: usize = batches.iter().map(Batch::len).sum();
    assert_eq!(total, 8);
    // The batch that lost an image holds exactly the images it kept, every pixel written.
    for batch in &batches {
        assert_eq!(batch.images.len(), batch.len() * 3 * 24 * 32);
        assert!(batch.images.iter().all(|v| (0.0..=255.0).contains(v)));
    }
    let skipped = loader.skipped();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].path.ends_with("circle/zz_broken.png"));
    assert!(skipped[0].reason.contains("not a JPEG, PNG, BMP or GIF"));
    // Known-bad files are not retried (and not reported twice) in later epochs.
    assert_eq!(collect(&loader, 1).iter().map(Batch::len).sum::<usize>(), 8);
    assert_eq!(loader.skipped().len(), 1);

    let strict = Loader::new(
        samples,
        LoaderConfig {
            strict: true,
            ..config(4)
        },
    )
    .unwrap();
    let error = strict
        .epoch(0)
        .find_map(Result::err)
        .expect("strict loader must fail");
    assert!(error.to_string().contains("zz_broken.png"));
}

#[test]
fn validation_split_matches_keras_and_subsets_are_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 5); // 10 files: circle_00000..04, square_00000..04
    let open = || ImageFolder::open(dir.path()).unwrap();
    let split = |subset| {
        open()
            .split(ValidationSplit {
                fraction: 0.2,
                subset,
                seed: 42,
            })
            .unwrap()
    };
    let training = split(Subset::Training);
    let validation = split(Subset::Validation);
    // np.random.RandomState(42).shuffle(list(range(10))) -> [8, 1, 5, 0, 7, 2, 9, 4, 3, 6];
    // int(0.2 * 10) = 2 validation files: the last two, indices 3 and 6 of Keras' order.
    let all = open().samples;
    assert_eq!(validation.samples, vec![all[3].clone(), all[6].clone()]);
    assert_eq!(training.samples.len(), 8);
    let mut union: Vec<_> = training
        .samples
        .iter()
        .chain(&validation.samples)
        .map(|s| s.path.clone())
        .collect();
    union.sort();
    union.dedup();
    assert_eq!(union.len(), 10);
    assert_eq!(training.class_names, validation.class_names);

    let bad = open().split(ValidationSplit {
        fraction: 1.5,
        subset: Subset::Training,
        seed: 1,
    });
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("--validation-split must be between 0 and 1")
    );
    let tiny = open().split(ValidationSplit {
        fraction: 0.05,
        subset: Subset::Training,
        seed: 1,
    });
    assert!(
        tiny.unwrap_err()
            .to_string()
            .contains("leaves one subset empty")
    );
}

#[test]
fn workers_never_run_more_than_workers_plus_prefetch_batches_ahead() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 10);
    let samples = ImageFolder::open(dir.path()).unwrap().samples;
    let cfg = LoaderConfig {
        workers: 2,
        prefetch: 1,
        cache: true,
        ..config(1)
    };
    let loader = Loader::new(samples, cfg).unwrap();
    let mut epoch = loader.epoch(0);
    assert_eq!(epoch.next().unwrap().unwrap().len(), 1);
    // Give the workers every chance to run ahead of a consumer that has stopped.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The cache counts the images decoded: the one taken plus at most 2 + 1 batches of one.
    let decoded = loader.cached_images();
    assert!(
        (2..=4).contains(&decoded),
        "{decoded} of 20 images decoded ahead"
    );
    drop(epoch);
}

#[test]
fn an_image_over_the_pixel_limit_stops_the_loader_even_without_strict() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 2);
    let samples = ImageFolder::open(dir.path()).unwrap().samples;
    let loader = Loader::new(
        samples,
        LoaderConfig {
            max_pixels: 1000,
            ..config(4)
        },
    )
    .unwrap();
    let error = loader
        .epoch(0)
        .find_map(Result::err)
        .expect("a bomb must stop the epoch");
    assert!(
        matches!(
            error,
            DataError::TooLarge {
                width: 48,
                height: 36,
                ..
            }
        ),
        "{error}"
    );
    assert!(loader.skipped().is_empty());
}

#[test]
fn bad_loader_options_are_refused() {
    let err = |c: LoaderConfig| Loader::new(vec![], c).err().unwrap().to_string();
    assert!(err(LoaderConfig::new(0, (8, 8))).contains("--batch-size must be at least 1"));
    let mut rotation = LoaderConfig::new(1, (8, 8));
    rotation.augmentation = Some(Augmentation::seed_recipe(-0.1));
    assert!(err(rotation).contains("--random-rotation must be 0 or more"));
}
