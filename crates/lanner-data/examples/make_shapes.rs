//! Generates the demo dataset: `cargo run --release -p lanner-data --example make_shapes -- OUT`
//! writes `OUT/train` and `OUT/validation`, each with `circle/` and `square/` JPEGs.
//!
//! Options (after `--`): `--per-class N` (training images per class, default 100; validation
//! gets a quarter), `--size WxH` (default 500x375), `--seed S`.

use std::path::PathBuf;
use std::process::ExitCode;

use image::ImageFormat;
use lanner_data::synthetic::{ShapesSpec, write_shapes};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let (mut per_class, mut width, mut height, mut seed) = (100usize, 500u32, 375u32, 7u64);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--per-class" => {
                per_class = value("--per-class")?
                    .parse()
                    .map_err(|e| format!("--per-class: {e}"))?
            }
            "--seed" => {
                seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--size" => {
                let size = value("--size")?;
                let (w, h) = size
                    .split_once('x')
                    .ok_or("--size takes WIDTHxHEIGHT, e.g. 500x375")?;
                width = w.parse().map_err(|e| format!("--size width: {e}"))?;
                height = h.parse().map_err(|e| format!("--size height: {e}"))?;
            }
            _ if out.is_none() && !arg.starts_with("--") => out = Some(PathBuf::from(arg)),
            _ => {
                return Err(format!(
                    "unknown argument '{arg}'; usage: make_shapes OUT [--per-class N] [--size WxH] [--seed S]"
                ));
            }
        }
    }
    let out = out.ok_or("usage: make_shapes OUT [--per-class N] [--size WxH] [--seed S]")?;
    let spec = |per_class, seed| ShapesSpec {
        per_class,
        width,
        height,
        seed,
        format: ImageFormat::Jpeg,
    };
    write_shapes(&out.join("train"), &spec(per_class, seed)).map_err(|e| e.to_string())?;
    write_shapes(
        &out.join("validation"),
        &spec((per_class / 4).max(1), seed + 1),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "wrote {} training and {} validation images per class under {}",
        per_class,
        (per_class / 4).max(1),
        out.display()
    );
    Ok(())
}
