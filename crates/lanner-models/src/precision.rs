//! Mixed precision (`--precision f32|bf16|f16`): the float type a pass computes in. The
//! model's own parameters, BatchNorm statistics and optimizer state stay f32 (the master
//! copy); a pass in bf16 or f16 runs on [`cast_floats`]' copy, through burn's differentiable
//! cast, so the gradients arrive in f32 on the master parameters. Inputs are normalised in f32
//! and then cast; the loss is computed in f32.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};

/// The float type of a training or inference pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

/// `module` with every float parameter cast to `dtype` (BatchNorm running statistics stay
/// f32; the layers cast them as they use them). On an autodiff device the casts are part of the
/// graph: gradients flow back to the original f32 parameters, keyed by the same parameter ids.
pub fn cast_floats<M: Module>(module: M, dtype: DType) -> M {
    module.map(&mut CastFloats(dtype))
}

struct CastFloats(DType);

impl ModuleMapper for CastFloats {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = param.id;
        Param::initialized(id, param.val().cast(self.0))
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
}
