//! The resize and the augmentation against TensorFlow's own kernels: `tf_reference.json` is
//! written by `fixtures/make_tf_fixtures.py` (tf.image.resize + ImageProjectiveTransformV3, the
//! ops Keras' `image_dataset_from_directory` and `RandomRotation` run).

use image::RgbImage;
use lanner_data::SampleTransform;
use lanner_data::augment::transform_to_chw;
use lanner_data::resize::{PIXEL_STRIDE, resize_bilinear};
use serde_json::Value;

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn reference() -> Value {
    let text = include_str!("fixtures/tf_reference.json");
    serde_json::from_str(text).unwrap()
}

#[test]
fn resize_matches_tensorflow_bilinear() {
    let r = reference();
    let (w, h) = (
        r["input_width"].as_u64().unwrap() as u32,
        r["input_height"].as_u64().unwrap() as u32,
    );
    let pixels: Vec<u8> = floats(&r["input_hwc"]).iter().map(|&v| v as u8).collect();
    let image = RgbImage::from_raw(w, h, pixels).unwrap();
    let (oh, ow) = (
        r["height"].as_u64().unwrap() as usize,
        r["width"].as_u64().unwrap() as usize,
    );
    let mut out = vec![0.0; oh * ow * PIXEL_STRIDE];
    resize_bilinear(&image, oh, ow, &mut out);
    let expected = floats(&r["resized_hwc"]);
    let ours = out.chunks(PIXEL_STRIDE).flat_map(|p| [p[0], p[1], p[2]]);
    let worst = ours
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst < 1e-4, "max |Δ| = {worst}");
}

#[test]
fn flip_and_rotation_match_tensorflow() {
    let r = reference();
    let (h, w) = (
        r["height"].as_u64().unwrap() as usize,
        r["width"].as_u64().unwrap() as usize,
    );
    let resized: Vec<f32> = floats(&r["resized_hwc"])
        .chunks(3)
        .flat_map(|p| [p[0], p[1], p[2], 0.0])
        .collect();
    for case in r["rotations"].as_array().unwrap() {
        let transform = SampleTransform {
            flip: case["flip"].as_bool().unwrap(),
            angle: case["angle_radians"].as_f64().unwrap() as f32,
        };
        let mut chw = vec![0.0; h * w * 3];
        transform_to_chw(&resized, PIXEL_STRIDE, h, w, transform, &mut chw);
        let expected = floats(&case["output_hwc"]);
        let mut worst = 0.0f32;
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let ours = chw[c * h * w + y * w + x];
                    worst = worst.max((ours - expected[(y * w + x) * 3 + c]).abs());
                }
            }
        }
        // Bit-identical on x86-64 today; allow for a compiler fusing multiply-adds.
        assert!(worst < 1e-3, "{transform:?}: max |Δ| = {worst}");
    }
}
