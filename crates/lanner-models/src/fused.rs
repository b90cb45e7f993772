//! Two layers as one operation each, forward and backward, where burn composes them out of
//! several tensor operations: BatchNorm with frozen statistics (the backbone's, always) and
//! MobileNetV3's hard swish.
//!
//! Under burn's autodiff, `x · scale + shift` records two operations forward and, backward, a
//! product for the input's gradient plus a product and a reduction per broadcast dimension for
//! the scale's and the shift's; hard swish records four or five forward and as many backward.
//! On a GPU each is a kernel launch and a pass over the activation. PyTorch runs one kernel
//! each way for both layers (`batch_norm`/`native_batch_norm_backward`, `hardswish`/
//! `hardswish_backward`), and so does the `torch` build through this module.
//!
//! [`FusedOps`] is a burn backend extension: the forward passes, implemented by each backend
//! listed on it and, with a hand-written backward, by burn's `Autodiff`. The backward passes
//! are [`FusedBackward`], whose default bodies compose burn's tensor operations (what burn-flex
//! runs); the `torch` build overrides them with ATen's kernels (vendor/burn-tch,
//! `burn_tch::fused`). Backends not listed (burn-cuda, whose fusion already merges
//! element-wise chains) keep the composite layers: see [`available`].

// burn-tch (LibTorch) is deprecated upstream; Lanner patches and keeps it (vendor/burn-tch).
#![cfg_attr(feature = "torch", allow(deprecated))]

#[cfg(feature = "torch")]
use burn::backend::LibTorch;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
#[allow(unused_imports)] // Named by the code `backend_extension` generates.
use burn::backend::{Autodiff, Dispatch, Flex};
use burn::backend::{Backend, DispatchDevice, Scalar, Shape, TensorMetadata, backend_extension};
use burn::backend::{get_or_init_device_settings, tensor::FloatTensor};
use burn::tensor::{Device, Tensor};

/// Whether tensors on `device` (with or without autodiff) run [`FusedOps`].
pub fn available(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "torch")]
        DispatchDevice::LibTorch(_) => true,
        _ => false,
    }
}

/// BatchNorm over `[batch, channels, height, width]` with the given (frozen) statistics, as
/// one operation; gradients reach `x`, `weight` and `bias`, never the statistics.
/// Only on a device where [`available`] holds.
pub fn frozen_batch_norm(
    x: Tensor<4>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    mean: Tensor<1>,
    variance: Tensor<1>,
    epsilon: f64,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::frozen_batch_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        mean.into_dispatch(),
        variance.into_dispatch(),
        epsilon,
    ))
}

/// `x · relu6(x + 3) / 6` as one operation. Only on a device where [`available`] holds.
pub fn hard_swish<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::hard_swish(x.into_dispatch()))
}

/// The forward passes, one operation each.
#[backend_extension(Flex, LibTorch: cfg(feature = "torch"), Autodiff)]
pub trait FusedOps: Backend {
    /// BatchNorm with fixed statistics: `(x − mean) / √(variance + ε) · weight + bias` per
    /// channel (dimension 1). Defaults to the backend's own `batch_norm`.
    fn frozen_batch_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        Self::batch_norm(x, weight, bias, mean, variance, epsilon)
    }

    /// `x · clamp(x / 6 + 1/2, 0, 1)`.
    fn hard_swish(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let gate = Self::float_clamp(
            Self::float_add_scalar(
                Self::float_mul_scalar(x.clone(), scalar(1.0 / 6.0)),
                0.5.into(),
            ),
            0.0.into(),
            1.0.into(),
        );
        Self::float_mul(x, gate)
    }
}

/// The backward passes of [`FusedOps`], on the backend under autodiff.
pub trait FusedBackward: Backend {
    /// The gradients of [`FusedOps::frozen_batch_norm`] with respect to `x`, `weight` and
    /// `bias` for the output gradient `grad`, each only where `needed` says so.
    fn frozen_batch_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
        needed: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        let shape = x.shape();
        let channels = shape[1];
        let mut broadcast = vec![1; shape.num_dims()];
        broadcast[1] = channels;
        let per_channel = |t| Self::float_reshape(t, Shape::from(broadcast.clone()));
        let reduced: Vec<usize> = (0..shape.num_dims()).filter(|&d| d != 1).collect();
        let sum_per_channel = |t: FloatTensor<Self>| {
            let summed = reduced.iter().fold(t, |t, &d| Self::float_sum_dim(t, d));
            Self::float_reshape(summed, Shape::new([channels]))
        };
        let inverse_std = Self::float_recip(Self::float_sqrt(Self::float_add_scalar(
            variance,
            scalar(epsilon),
        )));
        let x_grad = needed[0].then(|| {
            let scale = Self::float_mul(weight, inverse_std.clone());
            Self::float_mul(grad.clone(), per_channel(scale))
        });
        let weight_grad = needed[1].then(|| {
            let centred = Self::float_sub(x, per_channel(mean));
            let normalised = Self::float_mul(centred, per_channel(inverse_std));
            sum_per_channel(Self::float_mul(grad.clone(), normalised))
        });
        let bias_grad = needed[2].then(|| sum_per_channel(grad));
        [x_grad, weight_grad, bias_grad]
    }

    /// The gradient of [`FusedOps::hard_swish`] at `x` for the output gradient `grad`:
    /// PyTorch's `hardswish_backward` (0 below −3, 1 above 3, `x/3 + 1/2` between).
    fn hard_swish_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let bools = get_or_init_device_settings::<Self>(&x.device()).bool_dtype;
        let below = Self::float_lower_elem(x.clone(), (-3.0).into(), bools);
        let above = Self::float_greater_elem(x.clone(), 3.0.into(), bools);
        let slope =
            Self::float_add_scalar(Self::float_mul_scalar(x, scalar(1.0 / 3.0)), 0.5.into());
        let slope = Self::float_mask_fill(slope, below, 0.0.into());
        let slope = Self::float_mask_fill(slope, above, 1.0.into());
        Self::float_mul(grad, slope)
    }
}

fn scalar(value: f64) -> Scalar {
    value.into()
}

impl FusedOps for Flex {}
impl FusedBackward for Flex {}

#[cfg(feature = "torch")]
mod torch {
    //! ATen's kernels, through Lanner's patch of burn-tch.

    use super::{FloatTensor, FusedBackward, FusedOps, LibTorch};
    use burn_tch::fused::{self, Statistics};

    impl FusedOps for LibTorch {
        fn hard_swish(x: FloatTensor<Self>) -> FloatTensor<Self> {
            fused::hard_swish(&x)
        }
    }

    impl FusedBackward for LibTorch {
        fn frozen_batch_norm_backward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            mean: FloatTensor<Self>,
            variance: FloatTensor<Self>,
            epsilon: f64,
            grad: FloatTensor<Self>,
            needed: [bool; 3],
        ) -> [Option<FloatTensor<Self>>; 3] {
            let statistics = Statistics::Fixed;
            fused::batch_norm_backward(
                &x, &weight, &mean, &variance, epsilon, &grad, statistics, needed,
            )
        }

        fn hard_swish_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            fused::hard_swish_backward(&x, &grad)
        }
    }
}

impl<B: FusedOps + FusedBackward, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn frozen_batch_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FrozenBatchNorm;

        impl<B: FusedBackward> Backward<B, 3> for FrozenBatchNorm {
            /// The input, the weight, the statistics and ε.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                f64,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight, mean, variance, epsilon) = ops.state;
                let needed = ops.parents.each_ref().map(Option::is_some);
                let gradients =
                    B::frozen_batch_norm_backward(x, weight, mean, variance, epsilon, grad, needed);
                for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
                    if let (Some(parent), Some(gradient)) = (parent, gradient) {
                        grads.register::<B>(parent.id, gradient);
                    }
                }
            }
        }

        let (mean, variance) = (mean.into_primitive(), variance.into_primitive());
        match FrozenBatchNorm
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let output = B::frozen_batch_norm(
                    x.clone(),
                    weight.clone(),
                    bias.into_primitive(),
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                );
                prep.finish((x, weight, mean, variance, epsilon), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_batch_norm(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                mean,
                variance,
                epsilon,
            )),
        }
    }

    fn hard_swish(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct HardSwish;

        impl<B: FusedBackward> Backward<B, 1> for HardSwish {
            /// The input.
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let [parent] = ops.parents;
                if let Some(parent) = parent {
                    grads.register::<B>(parent.id, B::hard_swish_backward(ops.state, grad));
                }
            }
        }

        match HardSwish
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let output = B::hard_swish(x.clone());
                prep.finish(x, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::hard_swish(x.into_primitive())),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData, activation};

    use super::*;

    /// BatchNorm with frozen statistics, then hard swish, forward and backward on `device`,
    /// fused or as burn's composites: the output and the gradients of the input (when it
    /// requires one), the weight and the bias.
    fn layers(device: &Device, fused: bool, input_gradient: bool) -> Vec<Vec<f32>> {
        let device = device.clone().autodiff();
        // Irregular values across hard swish's three pieces, never exactly ±3.
        let values = |n: usize, seed: usize, spread: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((((i * 7919 + seed * 104729) % 1009) as f32) / 1009.0 - 0.5) * spread)
                .collect()
        };
        let shape = [2, 3, 4, 5];
        let x = Tensor::<4>::from_data(TensorData::new(values(120, 1, 9.0), shape), &device);
        let x = if input_gradient { x.require_grad() } else { x };
        let channel = |seed, spread, offset: f32| {
            let v: Vec<f32> = values(3, seed, spread).iter().map(|v| v + offset).collect();
            Tensor::<1>::from_data(TensorData::new(v, [3]), &device)
        };
        let weight = channel(2, 2.0, 1.0).require_grad();
        let bias = channel(3, 2.0, 0.0).require_grad();
        let (mean, variance) = (channel(4, 2.0, 0.0), channel(5, 1.0, 1.0));
        let epsilon = 1e-3;
        let output = if fused {
            let normalised = frozen_batch_norm(
                x.clone(),
                weight.clone(),
                bias.clone(),
                mean,
                variance,
                epsilon,
            );
            hard_swish(normalised)
        } else {
            let scale = weight.clone() / variance.add_scalar(epsilon).sqrt();
            let shift = bias.clone() - mean * scale.clone();
            let normalised = x.clone() * scale.reshape([1, 3, 1, 1]) + shift.reshape([1, 3, 1, 1]);
            activation::hard_swish(normalised)
        };
        let weights = Tensor::<4>::from_data(TensorData::new(values(120, 6, 2.0), shape), &device);
        let gradients = (output.clone() * weights).sum().backward();
        let read = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
        let read_1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
        let mut results = vec![
            read(output.inner()),
            read_1(weight.grad(&gradients).unwrap()),
            read_1(bias.grad(&gradients).unwrap()),
        ];
        match x.grad(&gradients) {
            Some(gradient) => results.push(read(gradient)),
            None => assert!(!input_gradient, "no gradient for the input"),
        }
        results
    }

    pub(super) fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: number of results");
        for (index, (a, b)) in got.iter().zip(want).enumerate() {
            assert_eq!(a.len(), b.len(), "{what}, result {index}");
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "{what}, result {index}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn fused_layers_match_burn_composites_forward_and_backward() {
        assert!(available(&Device::flex()) && available(&Device::flex().autodiff()));
        for input_gradient in [true, false] {
            let want = layers(&Device::flex(), false, input_gradient);
            let got = layers(&Device::flex(), true, input_gradient);
            assert_close(&got, &want, &format!("input gradient {input_gradient}"));
        }
    }

    #[test]
    fn fused_layers_without_autodiff_match_burn_composites() {
        let device = Device::flex();
        let x = Tensor::<1>::from_data(
            TensorData::new((0..80).map(|i| i as f32 / 8.0 - 5.05).collect(), [80]),
            &device,
        );
        let got = hard_swish(x.clone())
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let want = activation::hard_swish(x)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_close(&[got], &[want], "hard swish");
    }

    #[cfg(feature = "torch")]
    #[test]
    fn libtorch_kernels_match_burn_composites_on_burn_flex() {
        for input_gradient in [true, false] {
            let want = layers(&Device::flex(), false, input_gradient);
            let got = layers(&Device::libtorch(), true, input_gradient);
            assert_close(
                &got,
                &want,
                &format!("libtorch, input gradient {input_gradient}"),
            );
        }
    }
}
