//! Inference throughput of a registry backbone with the seed's head (global average pooling →
//! one logit) on the CPU device (burn-flex), for `bench/backbone_inference.py`.
//!
//! ```text
//! cargo run --release -p lanner-models --example inference_throughput -- \
//!     mobilenet_v3_large [--batch 32] [--size 224] [--warmup 2] [--runs 5] [--threads 2]
//! ```
//!
//! The weights are random (timm's initialisation): ImageNet weights are not needed to time a
//! forward pass. The input is a random `[batch, 3, size, size]` batch, the size the model's
//! pretrained configuration gives unless `--size` says otherwise. The device has no autodiff,
//! so every BatchNorm uses its running statistics and dropout is the identity: inference mode.
//! `--threads N` sets `RAYON_NUM_THREADS` (burn-flex's matmuls and reductions run on rayon's
//! global pool) before anything starts the pool; without it rayon uses every core, or what
//! `RAYON_NUM_THREADS` already says.
//!
//! Prints one JSON line: the model, the batch shape, every timed run in seconds and images/s
//! (all timed images over the total time of the timed runs).

use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use lanner_models::{ClassifierHeadConfig, find};

struct Args {
    model: String,
    batch: usize,
    size: Option<usize>,
    warmup: usize,
    runs: usize,
    threads: Option<usize>,
}

const USAGE: &str = "usage: inference_throughput MODEL [--batch 32] [--size S] [--warmup 2] \
                     [--runs 5] [--threads N]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: String::new(),
        batch: 32,
        size: None,
        warmup: 2,
        runs: 5,
        threads: None,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut number = |flag: &str| -> Result<usize, String> {
            let value = iter.next().ok_or_else(|| format!("{flag} needs a value"))?;
            value
                .parse()
                .map_err(|_| format!("{flag}: `{value}` is not a whole number"))
        };
        match arg.as_str() {
            "--batch" => args.batch = number("--batch")?,
            "--size" => args.size = Some(number("--size")?),
            "--warmup" => args.warmup = number("--warmup")?,
            "--runs" => args.runs = number("--runs")?,
            "--threads" => args.threads = Some(number("--threads")?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}\n{USAGE}")),
            name if args.model.is_empty() => args.model = name.to_string(),
            extra => return Err(format!("unexpected argument `{extra}`\n{USAGE}")),
        }
    }
    if args.model.is_empty() {
        return Err(USAGE.to_string());
    }
    if args.batch == 0 || args.runs == 0 {
        return Err("--batch and --runs must be at least 1".to_string());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(threads) = args.threads {
        // SAFETY: no other thread exists yet; rayon reads the variable when its global pool
        // starts, at the first parallel operation below.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    let entry = match find(&args.model) {
        Ok(entry) => entry,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let size = args.size.unwrap_or(entry.pretrained.input_size);

    let device = Device::flex();
    let backbone = entry.init_backbone(&device);
    let head = ClassifierHeadConfig::new(entry.feature_channels(), 1).init(&device);
    let images = Tensor::<4>::random(
        [args.batch, 3, size, size],
        Distribution::Normal(0.0, 1.0),
        &device,
    );

    // One forward pass, waited for: the logits are read back to the host.
    let infer = || -> f64 {
        let start = Instant::now();
        let logits = head.forward(backbone.forward(images.clone()));
        let logits: Vec<f32> = logits.into_data().try_to_vec::<f32>().expect("f32 logits");
        device.sync().expect("device sync");
        assert_eq!(logits.len(), args.batch);
        start.elapsed().as_secs_f64()
    };

    let warmup: Vec<f64> = (0..args.warmup).map(|_| infer()).collect();
    let times: Vec<f64> = (0..args.runs).map(|_| infer()).collect();
    let total: f64 = times.iter().sum();
    let images_per_second = (args.batch * args.runs) as f64 / total;

    // rayon's global pool: RAYON_NUM_THREADS, or every core.
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let report = serde_json::json!({
        "model": entry.name,
        "timm_name": entry.timm_name,
        "batch": args.batch,
        "size": size,
        "threads": threads,
        "warmup_seconds": warmup,
        "run_seconds": times,
        "images_per_second": images_per_second,
    });
    println!("{report}");
    ExitCode::SUCCESS
}
