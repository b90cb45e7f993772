//! Mixed precision (`--precision f32|bf16|f16`): the float type a pass computes in. The
//! model's own parameters, BatchNorm statistics and optimizer state stay f32 (the master
//! copy); a pass in bf16 or f16 runs on [`cast_floats`]' copy, through burn's differentiable
//! cast, so the gradients arrive in f32 on the master parameters. Inputs are normalised in f32
//! and then cast; the loss is computed in f32.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};

/// The float type of a training or inference pass (`"f32"`, `"bf16"`, `"f16"` in JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats everywhere (the default, and the only type of the CPU's folded kernels).
    #[default]
    F32,
    /// bfloat16 compute (f32's range, 8 bits of mantissa), f32 master weights.
    Bf16,
    /// IEEE half compute, f32 master weights.
    F16,
}

impl Precision {
    /// The tensor type a pass computes in.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// Whether passes compute in f32 (nothing is cast).
    pub fn is_f32(self) -> bool {
        self == Self::F32
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            _ => Err(format!("`{s}` is not a precision; use f32, bf16 or f16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// `tensor` in `dtype`: itself when it already is, else through burn's (differentiable) cast.
pub fn in_dtype<const D: usize>(tensor: Tensor<D>, dtype: DType) -> Tensor<D> {
    if tensor.dtype() == dtype {
        tensor
    } else {
        tensor.cast(dtype)
    }
}

/// `module` with every float parameter cast to `dtype`. BatchNorm running statistics stay
/// f32 (the layers cast them as they use them): burn shares a `RunningState` between a module
/// and its clones and casts it in place, so casting them here would round the master model's
/// statistics too. So do BatchNorm weights and biases on devices whose BatchNorm takes f32
/// parameters with any input ([`crate::fused::batch_norm_in_f32`]): no cast there, forward
/// or back. On an autodiff device the casts are part of the graph: gradients flow back to the
/// original f32 parameters, keyed by the same parameter ids.
pub fn cast_floats<M: Module>(module: M, dtype: DType) -> M {
    module.map(&mut CastFloats {
        dtype,
        path: Vec::new(),
        containers: Vec::new(),
    })
}

/// The fields of [`crate::batch_norm::BatchNorm2d`] that hold running statistics.
const RUNNING_STATISTICS: [&str; 2] = ["running_mean", "running_var"];

/// What burn's derived `Module` names a field's container when it is a BatchNorm.
const BATCH_NORM: &str = "Struct:BatchNorm2d";

struct CastFloats {
    dtype: DType,
    /// The field names from the root module down to the one being mapped.
    path: Vec<String>,
    /// The type of the module holding each of those fields.
    containers: Vec<String>,
}

impl ModuleMapper for CastFloats {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let field = self.path.last().map(String::as_str).unwrap_or_default();
        if RUNNING_STATISTICS.contains(&field) {
            return param;
        }
        let in_batch_norm = self.containers.last().is_some_and(|c| c == BATCH_NORM);
        if in_batch_norm && crate::fused::batch_norm_in_f32(&param.val().device()) {
            return param;
        }
        let id = param.id;
        Param::initialized(id, param.val().cast(self.dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_precision_names() {
        assert_eq!("bf16".parse(), Ok(Precision::Bf16));
        assert_eq!("fp16".parse(), Ok(Precision::F16));
        assert_eq!("f32".parse(), Ok(Precision::F32));
        assert_eq!(
            "int8".parse::<Precision>(),
            Err("`int8` is not a precision; use f32, bf16 or f16".to_string())
        );
        assert_eq!(Precision::Bf16.to_string(), "bf16");
    }

    #[test]
    fn a_cast_copy_leaves_the_masters_batch_norm_statistics_in_f32() {
        use crate::batch_norm::BatchNorm2dConfig;
        use burn::tensor::{Device, TensorData};

        let device = Device::flex();
        let layer = BatchNorm2dConfig::new(3).init(&device);
        let mean = TensorData::from([0.1f32, 0.2, 0.3]);
        layer
            .running_mean
            .update(Tensor::<1>::from_data(mean.clone(), &device));
        let _ = layer.running_mean.value_sync();
        let copy = cast_floats(layer.clone(), DType::BF16);
        assert_eq!(copy.weight.val().dtype(), DType::BF16);
        for statistics in [&layer.running_mean, &layer.running_var] {
            assert_eq!(statistics.value().dtype(), DType::F32);
        }
        assert_eq!(layer.running_mean.value().into_data(), mean);
    }

    /// On libtorch a bf16 pass keeps BatchNorm's weight and bias in f32 (ATen's kernels take
    /// them so, as PyTorch's autocast leaves them), still casts the convolutions', and trains:
    /// the output is bf16 and the gradients reach the f32 masters.
    #[cfg(feature = "torch")]
    #[test]
    #[allow(
        deprecated,
        reason = "burn 0.22 deprecates burn-tch, the `torch` build"
    )]
    fn on_libtorch_batch_norm_parameters_stay_f32_in_a_bf16_pass() {
        use crate::batch_norm::BatchNorm2dConfig;
        use burn::tensor::{Device, TensorData};

        let device = Device::libtorch().autodiff();
        let layer = BatchNorm2dConfig::new(3).init(&device);
        let conv = crate::conv::conv2d(3, 3, 1, 1, 1, &device);
        let values: Vec<f32> = (0..48).map(|i| (i % 7) as f32 - 3.0).collect();
        let x = Tensor::<4>::from_data(TensorData::new(values, [2, 3, 2, 4]), &device);
        for frozen in [false, true] {
            // A fresh copy each time: backward consumes the casts' graph.
            let (layer_copy, conv_copy) = cast_floats((layer.clone(), conv.clone()), DType::BF16);
            assert_eq!(layer_copy.weight.val().dtype(), DType::F32);
            assert_eq!(conv_copy.weight.val().dtype(), DType::BF16);
            let layer_copy = layer_copy.with_frozen_statistics(frozen);
            let y = layer_copy.forward(crate::conv::forward(
                &conv_copy,
                in_dtype(x.clone(), DType::BF16),
            ));
            assert_eq!(y.dtype(), DType::BF16, "frozen statistics {frozen}");
            let gradients = in_dtype(y, DType::F32).sum().backward();
            let weight_grad = layer.weight.grad(&gradients).expect("a weight gradient");
            assert_eq!(weight_grad.dtype(), DType::F32);
            assert!(
                conv.weight.grad(&gradients).is_some(),
                "a convolution gradient"
            );
        }
    }
}
