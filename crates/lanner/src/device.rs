//! `--device auto|cpu|cuda|cuda:N`: where tensors live.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use burn::tensor::Device;

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
            #[cfg(feature = "cuda")]
            Self::Auto => match crate::gpu_runtime::prepare() {
                Ok(()) => Ok((Device::cuda(0), "cuda:0 (auto)".into())),
                Err(why) => Ok((Device::flex(), format!("cpu (auto: {why})"))),
            },
            #[cfg(not(feature = "cuda"))]
            Self::Auto => Ok((
                Device::flex(),
                "cpu (auto: this build has no GPU support)".into(),
            )),
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => {
                if let Err(why) = crate::gpu_runtime::prepare() {
                    bail!("--device {self}: {why}; or use --device cpu");
                }
                Ok((Device::cuda(n), self.to_string()))
            }
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => bail!(
                "--device {self}: this lanner was built without GPU support; rebuild it with \
                 `cargo build --release --features cuda`, or use --device cpu"
            ),
        }
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
        assert_eq!(
            "tpu".parse::<DeviceChoice>(),
            Err("`tpu` is not a device; use auto, cpu, cuda or cuda:N".to_string())
        );
    }
}
