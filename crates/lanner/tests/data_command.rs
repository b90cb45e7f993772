//! `lanner data` run as a user runs it: the real binary on image folders the tests write.

mod common;

use common::{lanner, text};
use std::fs;
use std::path::Path;

use image::ImageFormat;
use lanner_data::synthetic::{ShapesSpec, write_shapes};

fn shapes(root: &Path, per_class: usize, format: ImageFormat) {
    let spec = ShapesSpec {
        per_class,
        width: 60,
        height: 40,
        seed: 5,
        format,
    };
    write_shapes(root, &spec).unwrap();
}

#[test]
fn summary_lists_classes_counts_formats_sizes_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 6, ImageFormat::Jpeg);
    fs::write(
        dir.path().join("square/broken.jpg"),
        b"\xff\xd8\xff garbage",
    )
    .unwrap();
    fs::write(dir.path().join("circle/photo.webp"), b"RIFF").unwrap();
    fs::write(dir.path().join("square/notes.txt"), b"hello").unwrap();
    image::RgbImage::new(80, 20)
        .save(dir.path().join("circle/wide.png"))
        .unwrap();
    let out = lanner(&["data", dir.path().to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("2 classes, 14 images"), "{stdout}");
    assert!(stdout.contains("0  circle        7        7"), "{stdout}");
    assert!(stdout.contains("1  square        7        6"), "{stdout}");
    assert!(stdout.contains("Formats: jpeg 12, png 1"), "{stdout}");
    assert!(
        stdout.contains("Width:  min 60, median 60, max 80"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Height: min 20, median 40, max 40"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Undecodable files (1), skipped in training unless --strict:\n")
            && stdout.contains("broken.jpg: Format error decoding Jpeg"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Ignored 2 files in '")
            && stdout
                .contains("that are not .jpg, .jpeg, .png, .bmp or .gif images (txt 1, webp 1)"),
        "{stdout}"
    );

    let strict = lanner(&["data", dir.path().to_str().unwrap(), "--strict"]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(text(&strict.stderr).contains("1 file(s) cannot be decoded (--strict)"));

    let json = lanner(&["data", dir.path().to_str().unwrap(), "--json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["images"], 14);
    assert_eq!(value["classes"][1]["usable"], 6);
    assert_eq!(value["undecodable"].as_array().unwrap().len(), 1);
    assert_eq!(value["ignored"].as_array().unwrap().len(), 2);
}

#[test]
fn unusable_folders_fail_with_one_clear_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let missing = lanner(&["data", dir.path().join("nope").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = text(&missing.stderr);
    assert!(
        stderr.starts_with("error: data folder") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let only = dir.path().join("one/only");
    fs::create_dir_all(&only).unwrap();
    image::RgbImage::new(8, 8).save(only.join("a.png")).unwrap();
    let single = lanner(&["data", dir.path().join("one").to_str().unwrap()]);
    assert_eq!(single.status.code(), Some(1));
    assert!(
        text(&single.stderr).contains("has only one class"),
        "{}",
        text(&single.stderr)
    );

    fs::create_dir_all(dir.path().join("one/empty")).unwrap();
    let empty = lanner(&["data", dir.path().join("one").to_str().unwrap()]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        text(&empty.stderr).contains("holds no images"),
        "{}",
        text(&empty.stderr)
    );

    let bomb = dir.path().join("bomb");
    shapes(&bomb, 2, ImageFormat::Png);
    let limited = lanner(&["data", bomb.to_str().unwrap(), "--max-image-pixels", "100"]);
    assert_eq!(
        limited.status.code(),
        Some(1),
        "an image over the pixel limit is refused"
    );
    let stderr = text(&limited.stderr);
    assert!(
        stderr.contains("claims 60x40 pixels, over the limit of 100 pixels; remove it or raise --max-image-pixels"),
        "{stderr}"
    );
    assert!(
        text(&limited.stdout).contains("Over the pixel limit (4), refused:"),
        "{}",
        text(&limited.stdout)
    );
    let training = lanner(&[
        "data",
        bomb.to_str().unwrap(),
        "--max-image-pixels",
        "100",
        "--benchmark",
        "1",
    ]);
    assert_eq!(
        training.status.code(),
        Some(1),
        "the loader stops on it too, --strict or not"
    );
    assert!(
        text(&training.stderr).contains("over the limit of 100 pixels"),
        "{}",
        text(&training.stderr)
    );
}

#[test]
fn validation_split_subsets_cover_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 10, ImageFormat::Png);
    let count = |subset: &str| {
        let out = lanner(&[
            "data",
            dir.path().to_str().unwrap(),
            "--validation-split",
            "0.25",
            "--subset",
            subset,
            "--json",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        value["images"].as_u64().unwrap()
    };
    assert_eq!(count("training"), 15);
    assert_eq!(count("validation"), 5);
}

#[test]
fn benchmark_times_the_loader_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 8, ImageFormat::Jpeg);
    let out = lanner(&[
        "data",
        dir.path().to_str().unwrap(),
        "--benchmark",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--cache",
        "--json",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("epoch 1: 16 images in") && stdout.contains("epoch 2: 16 images in"),
        "{stdout}"
    );
    let last: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(last["images_per_second"].as_array().unwrap().len(), 2);

    let bad = lanner(&[
        "data",
        dir.path().to_str().unwrap(),
        "--benchmark",
        "1",
        "--batch-size",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("--batch-size must be at least 1"));
}
