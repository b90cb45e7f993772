//! `lanner serve`: the model behind SageMaker hosting's and TF Serving's HTTP APIs. Also the
//! SageMaker container's `serve` entry point: with no `--model` it serves `$SM_MODEL_DIR` or
//! `/opt/ml/model`, on `$SAGEMAKER_BIND_TO_PORT` or 8080, on all interfaces.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use lanner_serve::ServeConfig;
use lanner_serve::batcher::BatchingConfig;

use crate::device::{DeviceChoice, check_precision};
use lanner_models::precision::Precision;

/// Where SageMaker puts the model in a hosting container.
const SAGEMAKER_MODEL_DIR: &str = "/opt/ml/model";

#[derive(Args, Debug)]
#[command(after_help = "\
Address: --host when given; otherwise 0.0.0.0 (all interfaces) inside a SageMaker container \
(the folder /opt/ml exists, or SAGEMAKER_BIND_TO_PORT is set), and 127.0.0.1 (this machine \
only) everywhere else.

Routes: GET /ping (200 once the model is loaded, 503 before), POST /invocations (image/jpeg, \
image/png, application/x-image or TF Serving JSON; answers application/json or text/csv), GET \
/v1/models/NAME[/metadata], POST /v1/models/NAME[/versions/V]:predict, GET /metrics \
(Prometheus). Predictions are TF Serving's: [[p]] for a binary model (p = probability of the \
second class), one probability per class otherwise.")]
pub struct ServeArgs {
    /// The model: the --model-dir of `lanner train`, a folder holding it in a sub-folder
    /// (`1/`), or its model.tar.gz; local, or an `s3://` URI. Default: $SM_MODEL_DIR, else
    /// /opt/ml/model.
    #[arg(long)]
    pub model: Option<PathBuf>,

    #[command(flatten)]
    pub s3: crate::model_source::S3Args,

    /// Address to listen on (see below for the default).
    #[arg(long)]
    pub host: Option<IpAddr>,

    /// Port to listen on; 0 picks a free one (printed on stdout).
    #[arg(long, env = "SAGEMAKER_BIND_TO_PORT", default_value_t = 8080)]
    pub port: u16,

    /// The model's name in TF Serving's URLs (/v1/models/NAME).
    #[arg(long, default_value = "model")]
    pub model_name: String,

    /// Images in one forward pass at most; concurrent requests are grouped up to it.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,

    /// Milliseconds the first request of a batch waits for others. With 0, a pass takes the
    /// requests queued when the model is free: a lone request never waits, and requests that
    /// arrive during a pass share the next one.
    #[arg(long, default_value_t = 0)]
    pub max_batch_delay: u64,

    /// Requests waiting for the model at most; beyond it, 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,

    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,

    /// Largest image, width × height (413 beyond), checked before decoding.
    #[arg(long, default_value_t = 50_000_000)]
    pub max_image_pixels: u64,

    /// Milliseconds a prediction request may take (504 beyond).
    #[arg(long, default_value_t = 60_000)]
    pub request_timeout_ms: u64,

    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,

    /// Compute in f32, or in bf16 / f16 on a GPU, or in bf16 on a CPU with Intel AMX (the
    /// weights stay f32; logits are read in f32). In a container: `LANNER_PRECISION`.
    #[arg(long, env = "LANNER_PRECISION", default_value = "f32")]
    pub precision: Precision,
}

/// Whether this process runs in a SageMaker container.
fn in_sagemaker() -> bool {
    Path::new("/opt/ml").exists() || std::env::var_os("SAGEMAKER_BIND_TO_PORT").is_some()
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    if args.max_batch_size == 0 || args.max_queue == 0 {
        bail!("--max-batch-size and --max-queue must be at least 1");
    }
    if args.model_name.is_empty() || args.model_name.contains(['/', ':']) {
        bail!(
            "--model-name '{}' cannot be used in a URL; use a plain name such as `model`",
            args.model_name
        );
    }
    let source = args
        .model
        .clone()
        .or_else(|| std::env::var_os("SM_MODEL_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(SAGEMAKER_MODEL_DIR));
    let (model, _download) = crate::model_source::open(&source, &args.s3)?;
    // Refuse a bad card now, with the model's path, rather than after binding.
    model.card()?;
    let (device, device_name) = args.device.resolve()?;
    check_precision(args.precision, &device, &device_name)?;
    crate::device::choose_fused_layers()?;
    crate::device::choose_copy_stream()?;
    crate::device::choose_memory_format(&device, args.precision)?;
    let host = args.host.unwrap_or(if in_sagemaker() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    });
    let request_timeout = Duration::from_millis(args.request_timeout_ms.max(1));
    let config = ServeConfig {
        host,
        port: args.port,
        model_name: args.model_name.clone(),
        batching: BatchingConfig {
            max_batch_size: args.max_batch_size,
            max_delay: Duration::from_millis(args.max_batch_delay),
            max_queue: args.max_queue,
        },
        max_body_bytes: args.max_body_bytes,
        max_image_pixels: args.max_image_pixels,
        request_timeout,
        shutdown_grace: request_timeout + Duration::from_secs(5),
        precision: args.precision,
    };
    let model_path = if model.path == model.source {
        model.source.display().to_string()
    } else {
        format!(
            "{} (unpacked to {})",
            model.source.display(),
            model.path.display()
        )
    };
    lanner_serve::serve(model, device, config, |addr| {
        println!("lanner serve: listening on http://{addr}");
        eprintln!(
            "lanner serve: loading the model {model_path} on {device_name}; /ping answers 200 once it is loaded"
        );
    })?;
    eprintln!("lanner serve: stopped");
    Ok(ExitCode::SUCCESS)
}
