//! How a backbone without pretrained weights starts (`--init`, for `--weights none`).
//!
//! The registry builds every backbone with timm's initialisation: convolution kernels normal
//! with variance `2 / fan_out` (timm's `_init_weight_goog`). Keras' applications, which the
//! seed's users train with, draw every convolution kernel from Glorot's uniform distribution
//! instead (`glorot_uniform`, the default `kernel_initializer` of `Conv2D`, `DepthwiseConv2D`
//! and `SeparableConv2D`): uniform in `±√(6 / (fan_in + fan_out))`. For a 1x1 convolution of
//! `c` channels to `c` that is half timm's variance; for a depthwise kernel it is about `c`
//! times smaller, since timm counts one output channel per group and Keras every input
//! channel. With BatchNorm after every convolution the smaller kernels compute the same
//! functions, but the optimizer's steps are larger relative to them. Trained from scratch on
//! the README's small data set, timm's start ended 2–9 points of validation accuracy below
//! Keras' in PyTorch and in Lanner alike, and Glorot's closed the gap (`bench/RESULTS.md`), so
//! Keras' is the default.
//!
//! Fans follow Keras' `compute_fans` on its kernel layout, read off burn's
//! `[out, in / groups, kh, kw]`: `fan_in = in / groups · kh · kw` and `fan_out = out · kh · kw`
//! for a dense or pointwise kernel; a depthwise kernel (`[c, 1, kh, kw]`, Keras' `(kh, kw, c,
//! 1)`) gets Keras' `c · kh · kw` and `kh · kw`, the same sum. The values come from a
//! generator of their own seeded by `--seed`, so a seed gives the same start on every device.
//!
//! Keras' start also includes its BatchNorm epsilon, 1e-3 ([`KERAS_BATCH_NORM_EPSILON`]), where
//! timm's layers add 1e-5 to the variance. Trained from scratch on the README's data over six
//! seeds, Lanner with Glorot's kernels and timm's epsilon ended at 0.92–0.99 validation
//! accuracy (mean 0.963), with Keras' epsilon at 0.967–0.987 (mean 0.976), and Keras itself at
//! 0.947–0.987 (mean 0.979) (`bench/RESULTS.md`): the larger epsilon damps the normalisation
//! of channels whose batch variance is tiny, which a random start has many of. The model card
//! records the epsilon, so a reloaded model normalises as it trained.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};
use lanner_data::rng::SplitMix64;
use lanner_models::Backbone;
use serde::{Deserialize, Serialize};

/// The epsilon of Keras' `BatchNormalization` layers in its applications: `MobileNetV3`
/// passes 1e-3, `Xception` keeps the layer's default, also 1e-3.
pub const KERAS_BATCH_NORM_EPSILON: f64 = 1e-3;

/// The initialisation of a backbone's convolution kernels (and, for Keras', its BatchNorm
/// epsilon) when no weights are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initialisation {
    /// Glorot uniform and BatchNorm epsilon 1e-3, as Keras' applications (the default).
    Keras,
    /// Normal with variance `2 / fan_out`, as timm's models.
    Timm,
}

impl Initialisation {
    /// What a model card written before `--init` existed was trained with.
    pub fn before_the_option() -> Self {
        Self::Timm
    }

    /// `backbone`, freshly built by the registry (timm's initialisation), with its
    /// convolution kernels drawn as this initialisation draws them from `seed` (and for
    /// Keras', its BatchNorm epsilon).
    pub fn apply(self, backbone: Backbone, seed: u64) -> Backbone {
        match self {
            Self::Timm => backbone,
            Self::Keras => backbone
                .map(&mut GlorotKernels {
                    random: SplitMix64::for_stream(seed, INIT_STREAM, 0),
                })
                .with_batch_norm_epsilon(KERAS_BATCH_NORM_EPSILON),
        }
    }
}

impl FromStr for Initialisation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keras" => Ok(Self::Keras),
            "timm" => Ok(Self::Timm),
            _ => Err(format!("`{s}` is not an initialisation; use keras or timm")),
        }
    }
}

impl fmt::Display for Initialisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Keras => "keras",
            Self::Timm => "timm",
        })
    }
}

/// The random stream of the initial kernels, apart from the data pipeline's and dropout's.
const INIT_STREAM: u64 = 0x1417;

/// Glorot's limit `√(6 / (fan_in + fan_out))` of a kernel of burn's shape
/// `[out, in / groups, kh, kw]`, with Keras' fans (see the module's notes): they sum to
/// `(out + in / groups) · kh · kw` for dense, pointwise and depthwise kernels alike.
fn glorot_limit(dims: [usize; 4]) -> f32 {
    let [out, per_group, kh, kw] = dims;
    (6.0 / ((out + per_group) * kh * kw) as f64).sqrt() as f32
}

/// Redraws every rank-4 parameter (the convolution kernels; BatchNorm's vectors and the
/// biases keep their values), in the module's order.
struct GlorotKernels {
    random: SplitMix64,
}

impl ModuleMapper for GlorotKernels {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D != 4 {
            return param;
        }
        let random = &mut self.random;
        param.map(|kernel| {
            let dims = kernel.dims();
            let limit = glorot_limit([dims[0], dims[1], dims[2], dims[3]]);
            let values: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|_| (random.next_f32() * 2.0 - 1.0) * limit)
                .collect();
            let fresh = Tensor::from_data(TensorData::new(values, dims), &kernel.device());
            if kernel.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use lanner_models::find;

    /// Every convolution kernel of `backbone`, flattened, in module order.
    fn kernels(backbone: &Backbone) -> Vec<(Vec<usize>, Vec<f32>)> {
        struct Collect(Vec<(Vec<usize>, Vec<f32>)>);
        impl burn::module::ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if D == 4 {
                    let value = param.val();
                    let data = value.to_data();
                    self.0
                        .push((value.dims().to_vec(), data.try_to_vec::<f32>().unwrap()));
                }
            }
        }
        let mut collect = Collect(Vec::new());
        backbone.visit(&mut collect);
        collect.0
    }

    #[test]
    fn keras_kernels_are_glorot_uniform_with_keras_fans() {
        let entry = find("mobilenet_v3_small_050").unwrap();
        let device = Device::flex();
        let backbone = Initialisation::Keras.apply(entry.init_backbone(&device), 7);
        let mut depthwise = 0;
        for (dims, values) in kernels(&backbone) {
            let taps = dims[2] * dims[3];
            let (fan_in, fan_out) = if dims[1] == 1 && dims[0] > 1 {
                depthwise += 1;
                (dims[0] * taps, taps)
            } else {
                (dims[1] * taps, dims[0] * taps)
            };
            let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
            let n = values.len() as f64;
            assert!(
                values.iter().all(|v| f64::from(v.abs()) <= limit),
                "{dims:?}"
            );
            // Uniform in ±limit: mean 0 and variance limit² / 3, within sampling error.
            let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let variance = values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n;
            let expected = limit * limit / 3.0;
            if n >= 1000.0 {
                assert!(mean.abs() < 0.1 * limit, "{dims:?}: mean {mean}");
                assert!(
                    (variance / expected - 1.0).abs() < 0.1,
                    "{dims:?}: variance {variance}, expected {expected}"
                );
            }
        }
        assert!(depthwise > 5, "the backbone has depthwise kernels");
    }

    #[test]
    fn the_seed_decides_the_keras_kernels_and_timm_leaves_the_registrys() {
        let entry = find("mobilenet_v3_small_050").unwrap();
        let device = Device::flex();
        let draw = |seed| kernels(&Initialisation::Keras.apply(entry.init_backbone(&device), seed));
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));

        let registry = entry.init_backbone(&device);
        let before = kernels(&registry);
        assert_eq!(kernels(&Initialisation::Timm.apply(registry, 3)), before);
    }

    #[test]
    fn keras_start_takes_keras_batch_norm_epsilon_and_timms_keeps_its_own() {
        let device = Device::flex();
        for name in ["mobilenet_v3_small_050", "xception"] {
            let backbone = || find(name).unwrap().init_backbone(&device);
            let keras = Initialisation::Keras.apply(backbone(), 1);
            assert_eq!(
                keras.batch_norm_epsilon(),
                KERAS_BATCH_NORM_EPSILON,
                "{name}"
            );
            let timm = Initialisation::Timm.apply(backbone(), 1);
            assert_eq!(timm.batch_norm_epsilon(), 1e-5, "{name}");
        }
    }

    #[test]
    fn parameters_that_train_still_train() {
        let entry = find("mobilenet_v3_small_050").unwrap();
        let device = Device::flex().autodiff();
        let backbone = Initialisation::Keras.apply(entry.init_backbone(&device), 1);
        struct AllTrain(usize);
        impl burn::module::ModuleVisitor for AllTrain {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if D == 4 {
                    assert!(param.val().is_require_grad());
                    self.0 += 1;
                }
            }
        }
        let mut all = AllTrain(0);
        backbone.visit(&mut all);
        assert!(all.0 > 0);
    }

    #[test]
    fn names_parse_and_print() {
        for init in [Initialisation::Keras, Initialisation::Timm] {
            assert_eq!(init.to_string().parse::<Initialisation>(), Ok(init));
        }
        let error = "glorot".parse::<Initialisation>().unwrap_err();
        assert_eq!(
            error,
            "`glorot` is not an initialisation; use keras or timm"
        );
    }
}
