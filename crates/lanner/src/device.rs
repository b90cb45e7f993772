//! `--device auto|cpu|cuda|cuda:N`: where tensors live.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use burn::tensor::Device;
use lanner_models::precision::Precision;

/// The device a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A GPU when this build supports one and a driver is present, else the CPU.
    Auto,
    /// The CPU (burn-flex).
    Cpu,
    /// NVIDIA GPU number N.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
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
        }
    }
}

impl DeviceChoice {
    /// The burn device and how logs name it (with why `auto` chose the CPU), or why the
    /// device asked for cannot be had.
    pub fn resolve(self) -> Result<(Device, String)> {
        match self {
            Self::Cpu => Ok((Device::flex(), "cpu".into())),
            #[cfg(feature = "cuda-base")]
            Self::Auto => match crate::gpu_runtime::prepare() {
                Ok(()) => Ok((Device::cuda(0), "cuda:0 (auto)".into())),
                Err(why) => Ok((Device::flex(), format!("cpu (auto: {why})"))),
            },
            #[cfg(not(feature = "cuda-base"))]
            Self::Auto => Ok((
                Device::flex(),
                "cpu (auto: this build has no GPU support)".into(),
            )),
            #[cfg(feature = "cuda-base")]
            Self::Cuda(n) => {
                if let Err(why) = crate::gpu_runtime::prepare() {
                    bail!("--device {self}: {why}; or use --device cpu");
                }
                Ok((Device::cuda(n), self.to_string()))
            }
            #[cfg(not(feature = "cuda-base"))]
            Self::Cuda(_) => bail!(
                "--device {self}: this lanner was built without GPU support; rebuild it with \
                 `cargo build --release --features cuda`, or use --device cpu"
            ),
        }
    }
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
            return Ok(TrainingDevices {
                devices: vec![device],
                name,
            });
        };
        let wanted = gpus.unwrap_or(if self == Self::Auto { usize::MAX } else { 1 });
        if wanted == 1 {
            return Ok(TrainingDevices {
                devices: vec![device],
                name,
            });
        }
        let visible = visible_gpus()?;
        if gpus.is_some() && first + wanted > visible {
            bail!(
                "--gpus {wanted} from cuda:{first} needs GPUs up to cuda:{}, but the driver shows \
                 {visible}; lower --gpus",
                first + wanted - 1
            );
        }
        let count = wanted.min(visible.saturating_sub(first)).max(1);
        Ok(TrainingDevices {
            devices: (first..first + count).map(cuda_device).collect(),
            name: if count == 1 {
                name
            } else {
                format!(
                    "cuda:{first}..cuda:{} (data-parallel over {count} GPUs)",
                    first + count - 1
                )
            },
        })
    }
}

/// Refuse a precision below f32 on the CPU, whose folded kernels compute in f32 (bf16 and f16
/// are for GPUs), in one sentence naming the device.
pub fn check_precision(precision: Precision, device: &Device, device_name: &str) -> Result<()> {
    if !precision.is_f32() && lanner_models::frozen::is_cpu(device) {
        bail!(
            "--precision {precision} runs on GPUs; this runs on the {device_name}, where Lanner \
             computes in f32: leave --precision out or use a GPU"
        );
    }
    Ok(())
}

#[cfg(feature = "cuda-base")]
fn visible_gpus() -> Result<usize> {
    crate::gpu_runtime::device_count().map_err(anyhow::Error::msg)
}

#[cfg(not(feature = "cuda-base"))]
fn visible_gpus() -> Result<usize> {
    Ok(0)
}

#[cfg(feature = "cuda-base")]
fn cuda_device(index: usize) -> Device {
    Device::cuda(index)
}

#[cfg(not(feature = "cuda-base"))]
fn cuda_device(_index: usize) -> Device {
    unreachable!("a build without GPU support never picks a GPU")
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
        assert_eq!(
            "tpu".parse::<DeviceChoice>(),
            Err("`tpu` is not a device; use auto, cpu, cuda or cuda:N".to_string())
        );
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
