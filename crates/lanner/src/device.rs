//! `--device auto|cpu|cuda|cuda:N|libtorch-cpu`: where tensors live.
//!
//! Two builds reach NVIDIA GPUs, through two burn backends: `cuda` (burn-cuda, kernels compiled
//! at run time by NVRTC; `gpu_runtime.rs`) and `torch` (burn-tch over PyTorch's
//! libraries, cuDNN and cuBLAS kernels compiled ahead of time; `torch_runtime.rs`). A
//! build has at most one of them; [`gpu`] is the one it has.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use burn::tensor::Device;
use lanner_models::precision::Precision;

#[cfg(all(feature = "cuda-base", feature = "torch"))]
compile_error!(
    "the `cuda` and `torch` features are two GPU backends; build one binary per feature"
);

/// Whether this build can use NVIDIA GPUs (the `cuda` or the `torch` feature).
pub const GPU_BUILD: bool = cfg!(any(feature = "cuda-base", feature = "torch"));

/// The device a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A GPU when this build supports one and a driver is present, else the CPU.
    Auto,
    /// The CPU (burn-flex, with Lanner's folded kernels).
    Cpu,
    /// NVIDIA GPU number N.
    Cuda(usize),
    /// The CPU through PyTorch's libraries (the `torch` build): the GPU build's code path
    /// without a GPU, to check it against `cpu`.
    LibTorchCpu,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "libtorch-cpu" => Ok(Self::LibTorchCpu),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device; use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::LibTorchCpu => f.write_str("libtorch-cpu"),
        }
    }
}

impl DeviceChoice {
    /// The burn device and how logs name it (with why `auto` chose the CPU), or why the
    /// device asked for cannot be had.
    pub fn resolve(self) -> Result<(Device, String)> {
        match self {
            Self::Cpu => Ok((Device::flex(), "cpu".into())),
            Self::Auto if !GPU_BUILD => Ok((
                Device::flex(),
                "cpu (auto: this build has no GPU support)".into(),
            )),
            Self::Auto => match gpu::prepare() {
                Ok(()) => Ok((gpu::device(0), format!("cuda:0 (auto, {})", gpu::BACKEND))),
                Err(why) => Ok((Device::flex(), format!("cpu (auto: {why})"))),
            },
            Self::Cuda(_) if !GPU_BUILD => bail!(
                "--device {self}: this lanner was built without GPU support; rebuild it with \
                 `cargo build --release --features cuda` (or `--features torch`), or use \
                 --device cpu"
            ),
            Self::Cuda(n) => {
                if let Err(why) = gpu::prepare() {
                    bail!("--device {self}: {why}; or use --device cpu");
                }
                Ok((gpu::device(n), format!("{self} ({})", gpu::BACKEND)))
            }
            Self::LibTorchCpu => libtorch_cpu(),
        }
    }
}

#[cfg(feature = "torch")]
#[allow(
    deprecated,
    reason = "burn 0.22 deprecates burn-tch, which the `torch` build is"
)]
fn libtorch_cpu() -> Result<(Device, String)> {
    Ok((Device::libtorch(), "libtorch-cpu".into()))
}

#[cfg(not(feature = "torch"))]
fn libtorch_cpu() -> Result<(Device, String)> {
    bail!(
        "--device libtorch-cpu: this lanner was built without PyTorch's libraries; rebuild it \
         with `cargo build --release --features torch`, or use --device cpu"
    )
}

/// The devices of a data-parallel run (`lanner train --gpus N`): the first holds the model.
pub struct TrainingDevices {
    /// The devices, the model's own first.
    pub devices: Vec<Device>,
    /// How logs name them.
    pub name: String,
}

impl DeviceChoice {
    /// The devices `train` runs on: `gpus` GPUs from the chosen one on (`None`: every GPU the
    /// driver shows for `auto`, one for `cuda:N`), or the CPU.
    pub fn resolve_for_training(self, gpus: Option<usize>) -> Result<TrainingDevices> {
        if gpus == Some(0) {
            bail!("--gpus 0 trains on no device; use --device cpu to train on the CPU");
        }
        let (device, name) = self.resolve()?;
        let first = match self {
            Self::Cuda(n) => Some(n),
            Self::Auto if name.starts_with("cuda") => Some(0),
            _ => None,
        };
        let Some(first) = first else {
            if let Some(n) = gpus.filter(|&n| n > 1) {
                bail!(
                    "--gpus {n} needs GPUs, but training runs on the {name}; use a `cuda` build \
                     on a machine with NVIDIA GPUs, or leave --gpus out"
                );
            }
            return replicate(device, name);
        };
        let wanted = gpus.unwrap_or(if self == Self::Auto { usize::MAX } else { 1 });
        if wanted == 1 {
            return replicate(device, name);
        }
        let visible = gpu::count().map_err(anyhow::Error::msg)?;
        if gpus.is_some() && first + wanted > visible {
            bail!(
                "--gpus {wanted} from cuda:{first} needs GPUs up to cuda:{}, but the driver shows \
                 {visible}; lower --gpus",
                first + wanted - 1
            );
        }
        let count = wanted.min(visible.saturating_sub(first)).max(1);
        if count == 1 {
            return replicate(device, name);
        }
        if replicas()? > 1 {
            bail!(
                "LANNER_REPLICAS replicates one device, but training runs on {count} GPUs; unset \
                 it, or pass --gpus 1"
            );
        }
        Ok(TrainingDevices {
            devices: (first..first + count).map(gpu::device).collect(),
            name: format!(
                "cuda:{first}..cuda:{} (data-parallel over {count} GPUs)",
                first + count - 1
            ),
        })
    }
}

/// Training on `device` alone, or data-parallel over `LANNER_REPLICAS` replicas of it.
fn replicate(device: Device, name: String) -> Result<TrainingDevices> {
    let replicas = replicas()?;
    Ok(TrainingDevices {
        devices: vec![device; replicas],
        name: if replicas == 1 {
            name
        } else {
            format!("{name} (data-parallel over {replicas} replicas of it, LANNER_REPLICAS)")
        },
    })
}

/// How many replicas of its one device a run trains on: `LANNER_REPLICAS` (default 1).
/// Data parallelism is for several GPUs; replicas of one device gain nothing, but they run the
/// same code (shards, BatchNorm statistics summed across replicas, summed gradients) where
/// there is one GPU or none, as XLA's `--xla_force_host_platform_device_count` does for JAX.
/// Tests and `bench/gpu_check.sh` use it.
fn replicas() -> Result<usize> {
    match std::env::var("LANNER_REPLICAS") {
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!(
                "LANNER_REPLICAS={value} is not a number of replicas; set it to 1 or more, or \
                 unset it"
            ),
        },
        Err(_) => Ok(1),
    }
}

/// Refuse a precision the device cannot compute in, in one sentence naming the device: on the
/// CPU, f32, and bf16 where the CPU has AMX tiles (f16 is for GPUs).
pub fn check_precision(precision: Precision, device: &Device, device_name: &str) -> Result<()> {
    if precision.is_f32() || !lanner_models::frozen::is_cpu(device) {
        return Ok(());
    }
    match precision {
        Precision::Bf16 if lanner_models::frozen::cpu_bf16().is_some() => Ok(()),
        Precision::Bf16 => bail!(
            "--precision bf16 on the {device_name} needs Intel AMX (Xeon Sapphire Rapids or \
             later, as in SageMaker's ml.c7i and ml.m7i), which this CPU lacks: leave \
             --precision out to compute in f32, or use a GPU"
        ),
        _ => bail!(
            "--precision {precision} runs on GPUs; this runs on the {device_name}, where Lanner \
             computes in f32 (or in bf16, with AMX): leave --precision out or use a GPU"
        ),
    }
}

/// In the `torch` build, choose the memory order of convolution inputs for `device` and
/// `precision` (see `torch_runtime::set_memory_format`) and return its name; `None` in other
/// builds and on burn-flex, which have one order.
pub fn choose_memory_format(device: &Device, precision: Precision) -> Result<Option<&'static str>> {
    #[cfg(feature = "torch")]
    #[allow(
        deprecated,
        reason = "burn 0.22 deprecates burn-tch, which the `torch` build is"
    )]
    if !lanner_models::frozen::is_cpu(device) {
        let on_gpu = device.clone().inner() != Device::libtorch();
        return crate::torch_runtime::set_memory_format(on_gpu, precision)
            .map(Some)
            .map_err(anyhow::Error::msg);
    }
    let _ = (device, precision);
    Ok(None)
}

/// Whether the fused layers (`lanner_models::fused`: BatchNorm, hard swish, hard sigmoid,
/// global average pooling, and each convolution's gradients from one operation) run as one
/// operation each way (the default) or as burn's composites: `LANNER_FUSED_LAYERS=on|off`.
pub fn choose_fused_layers() -> Result<()> {
    lanner_models::fused::set_enabled(switch("LANNER_FUSED_LAYERS")?);
    Ok(())
}

/// In the `torch` build, whether copies to a GPU run on a stream of their own, overlapping
/// the step the GPU is computing (the default), or on the compute stream after it:
/// `LANNER_COPY_STREAM=on|off` (vendor/burn-tch/src/copy_stream.rs). Other builds check the
/// value only.
pub fn choose_copy_stream() -> Result<()> {
    let enabled = switch("LANNER_COPY_STREAM")?;
    #[cfg(feature = "torch")]
    #[allow(
        deprecated,
        reason = "burn 0.22 deprecates burn-tch, which the `torch` build is"
    )]
    burn_tch::copy_stream::set_enabled(enabled);
    let _ = enabled;
    Ok(())
}

/// The environment switch `name`: on unless set to `off`.
fn switch(name: &str) -> Result<bool> {
    match std::env::var(name).as_deref() {
        Err(_) | Ok("on") => Ok(true),
        Ok("off") => Ok(false),
        Ok(value) => bail!("{name}={value} is neither on nor off; set one, or unset it"),
    }
}

/// Steps run between two readbacks of their logits on `device` (see
/// `lanner_train::TrainingJob::readback_every`): `LANNER_READBACK_EVERY` when set, else 1 on
/// the CPU and 16 on a GPU.
pub fn readback_every(device: &Device) -> Result<usize> {
    match std::env::var("LANNER_READBACK_EVERY") {
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!(
                "LANNER_READBACK_EVERY={value} is not a number of steps; set it to 1 or more, \
                 or unset it"
            ),
        },
        Err(_) => Ok(lanner_train::trainer::default_readback_every(device)),
    }
}

/// The GPU backend of the `cuda` build: burn-cuda.
#[cfg(feature = "cuda-base")]
mod gpu {
    use burn::tensor::Device;

    /// How logs name the backend.
    pub const BACKEND: &str = "burn-cuda";

    pub fn prepare() -> Result<(), String> {
        crate::gpu_runtime::prepare()
    }

    pub fn count() -> Result<usize, String> {
        crate::gpu_runtime::device_count()
    }

    pub fn device(index: usize) -> Device {
        Device::cuda(index)
    }
}

/// The GPU backend of the `torch` build: burn-tch over PyTorch's CUDA libraries.
#[cfg(feature = "torch")]
mod gpu {
    use burn::tensor::Device;

    /// How logs name the backend.
    pub const BACKEND: &str = "libtorch";

    pub fn prepare() -> Result<(), String> {
        crate::torch_runtime::prepare_cuda()
    }

    pub fn count() -> Result<usize, String> {
        Ok(crate::torch_runtime::gpu_count())
    }

    #[allow(
        deprecated,
        reason = "burn 0.22 deprecates burn-tch, which the `torch` build is"
    )]
    pub fn device(index: usize) -> Device {
        Device::libtorch_cuda(index)
    }
}

/// A build without GPU support: nothing resolves to a GPU (`GPU_BUILD` is false).
#[cfg(not(any(feature = "cuda-base", feature = "torch")))]
mod gpu {
    use burn::tensor::Device;

    pub const BACKEND: &str = "none";

    pub fn prepare() -> Result<(), String> {
        Err("this build has no GPU support".into())
    }

    pub fn count() -> Result<usize, String> {
        Ok(0)
    }

    pub fn device(_index: usize) -> Device {
        unreachable!("a build without GPU support never picks a GPU")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:2".parse(), Ok(DeviceChoice::Cuda(2)));
        assert_eq!("libtorch-cpu".parse(), Ok(DeviceChoice::LibTorchCpu));
        assert_eq!(
            "tpu".parse::<DeviceChoice>(),
            Err("`tpu` is not a device; use auto, cpu, cuda or cuda:N".to_string())
        );
    }

    #[test]
    #[cfg(not(feature = "torch"))]
    fn libtorch_needs_the_torch_build() {
        let error = DeviceChoice::LibTorchCpu
            .resolve()
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.starts_with("--device libtorch-cpu: this lanner was built without PyTorch")
                && error.contains("--features torch"),
            "{error}"
        );
    }

    #[test]
    #[cfg(not(any(feature = "cuda-base", feature = "torch")))]
    fn a_cpu_build_names_both_gpu_builds() {
        let error = DeviceChoice::Cuda(1).resolve().err().unwrap().to_string();
        assert!(
            error.contains("--features cuda") && error.contains("--features torch"),
            "{error}"
        );
        let (_, name) = DeviceChoice::Auto.resolve().unwrap();
        assert_eq!(name, "cpu (auto: this build has no GPU support)");
    }

    #[test]
    fn the_cpu_trains_alone() {
        let devices = DeviceChoice::Cpu.resolve_for_training(None).unwrap();
        assert_eq!((devices.devices.len(), devices.name.as_str()), (1, "cpu"));
        assert_eq!(
            DeviceChoice::Cpu
                .resolve_for_training(Some(1))
                .unwrap()
                .devices
                .len(),
            1
        );
        let error = DeviceChoice::Cpu
            .resolve_for_training(Some(2))
            .err()
            .unwrap();
        assert!(
            error.to_string().starts_with("--gpus 2 needs GPUs"),
            "{error}"
        );
        let error = DeviceChoice::Cpu
            .resolve_for_training(Some(0))
            .err()
            .unwrap();
        assert!(error.to_string().contains("--device cpu"), "{error}");
    }
}
