//! Times each stage of the loader on one image file, to see where a batch's time goes:
//! `cargo run --release -p lanner-data --example pipeline_stages -- IMAGE [SIZE]`.

use std::path::PathBuf;
use std::time::Instant;

use lanner_data::SampleTransform;
use lanner_data::augment::transform_to_chw;
use lanner_data::decode::decode_file;
use lanner_data::resize::{PIXEL_STRIDE, resize_bilinear};

fn time<T>(label: &str, runs: u32, mut f: impl FnMut() -> T) -> T {
    let mut out = f();
    // `PIPELINE_STAGE=rotate` times one stage only (for `perf stat`).
    if std::env::var("PIPELINE_STAGE").is_ok_and(|only| !label.starts_with(&only)) {
        return out;
    }
    // `PIPELINE_REPEAT=N` runs each stage N times longer (for `perf record`).
    let repeat = std::env::var("PIPELINE_REPEAT").map_or(1, |n| n.parse().unwrap_or(1));
    let runs = runs * repeat;
    let start = Instant::now();
    for _ in 0..runs {
        out = std::hint::black_box(f());
    }
    println!(
        "{label:<28} {:>8.1} µs",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(runs)
    );
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().expect("usage: pipeline_stages IMAGE [SIZE]"));
    let size: usize = args
        .next()
        .map(|s| s.parse().expect("SIZE is a number"))
        .unwrap_or(224);
    let bytes = std::fs::read(&path).expect("readable image");
    let decoded = time("read + decode", 50, || {
        decode_file(&path, u64::MAX).expect("decodable image")
    });
    println!(
        "  ({} bytes, {}x{})",
        bytes.len(),
        decoded.image.width(),
        decoded.image.height()
    );
    let mut hwc = vec![0.0f32; size * size * PIXEL_STRIDE];
    time("resize to SIZE (f32 HWC)", 200, || {
        resize_bilinear(&decoded.image, size, size, &mut hwc)
    });
    let mut chw = vec![0.0f32; size * size * 3];
    time("layout HWC->CHW", 200, || {
        transform_to_chw(
            &hwc,
            PIXEL_STRIDE,
            size,
            size,
            SampleTransform::default(),
            &mut chw,
        )
    });
    time("flip", 200, || {
        transform_to_chw(
            &hwc,
            PIXEL_STRIDE,
            size,
            size,
            SampleTransform {
                flip: true,
                angle: 0.0,
            },
            &mut chw,
        )
    });
    time("rotate 0.3 rad", 200, || {
        transform_to_chw(
            &hwc,
            PIXEL_STRIDE,
            size,
            size,
            SampleTransform {
                flip: false,
                angle: 0.3,
            },
            &mut chw,
        )
    });
    time("flip + rotate 1.2 rad", 200, || {
        transform_to_chw(
            &hwc,
            PIXEL_STRIDE,
            size,
            size,
            SampleTransform {
                flip: true,
                angle: 1.2,
            },
            &mut chw,
        )
    });
}
