//! Layers as one operation each, forward and backward, where burn composes them out of several
//! tensor operations: BatchNorm with frozen statistics (the backbone's, always), MobileNetV3's
//! hard swish and hard sigmoid, and global average pooling; and, for training every layer,
//! BatchNorm with batch statistics and the convolutions' backward pass; on burn-flex, max
//! pooling ([`max_pool`]).
//!
//! Under burn's autodiff, `x · scale + shift` records two operations forward and, backward, a
//! product for the input's gradient plus a product and a reduction per broadcast dimension for
//! the scale's and the shift's; hard swish and hard sigmoid record four or five each way, and a
//! mean over height then width two forward and eight backward. On a GPU each is a kernel
//! launch, and most a pass over the activation. PyTorch runs one operation forward and one or
//! two backward for each of these layers (`batch_norm`/`native_batch_norm_backward`,
//! `hardswish`/`hardswish_backward`, `hardsigmoid`/`hardsigmoid_backward`, `mean`/`expand` and
//! `div`), and so does the `torch` build through this module (pooling as ATen's
//! `adaptive_avg_pool2d` and its backward).
//!
//! BatchNorm with batch statistics is burn's `batch_norm_train` plus the running statistics'
//! update as tensor operations (eight per layer, and two more to invert the variance for the
//! backward pass); PyTorch's train-mode BatchNorm is one operation (cuDNN's or ATen's
//! `native_batch_norm`, as `batch_norm` chooses), which updates the running statistics in the
//! same kernel, and so is the `torch` build's (on copies of them: two small copies). On
//! burn-flex the ReLU or hard swish after it joins that operation
//! ([`FusedOps::batch_norm_training_activated`], see [`activates_in_batch_norm`]). burn's autodiff asks for a convolution's input, weight and bias gradients
//! one call each; [`conv2d`] asks for them in one, as PyTorch's `convolution_backward` does.
//! [`gather_across_replicas`] collects a vector from every replica of a data-parallel step,
//! forward and backward, for BatchNorm statistics over the whole batch
//! ([`crate::sync_batch_norm`]).
//!
//! [`FusedOps`] is a burn backend extension: the forward passes, implemented by each backend
//! listed on it and, with a hand-written backward, by burn's `Autodiff`. The backward passes
//! are [`FusedBackward`]. The default bodies of both compose burn's tensor operations
//! (`crate::composite`); burn-flex overrides them with Lanner's own loops for f32
//! (`crate::flex_layers`), the `torch` build with ATen's kernels (vendor/burn-tch,
//! `burn_tch::fused`). burn-cuda, whose fusion already merges element-wise chains, keeps the
//! composite layers (see [`available`]) and implements the extension for
//! [`gather_across_replicas`] alone, which every backend needs for data-parallel training.

// burn-tch (LibTorch) is deprecated upstream; Lanner patches and keeps it (vendor/burn-tch).
#![cfg_attr(feature = "torch", allow(deprecated))]

#[cfg(feature = "torch")]
use burn::backend::LibTorch;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
#[allow(unused_imports)] // Named by the code `backend_extension` generates.
use burn::backend::{Autodiff, Dispatch, Flex};
use burn::backend::{AutodiffBackend, Backend, DispatchDevice, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::activation::Activation;
use crate::composite;
use crate::sync_batch_norm::Exchange;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Hands each tracked parent of a backward step its gradient, where there is one.
macro_rules! register {
    ($parents:expr, $gradients:expr, $grads:expr) => {
        for (parent, gradient) in $parents.into_iter().zip($gradients) {
            if let (Some(parent), Some(gradient)) = (parent, gradient) {
                $grads.register::<B>(parent.id, gradient);
            }
        }
    };
}

/// Turn the fused layers off (burn's composites everywhere) or back on, for the whole process:
/// to compare the two on the same machine (`LANNER_FUSED_LAYERS`).
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether tensors on `device` (with or without autodiff) run [`FusedOps`]: on burn-flex and
/// libtorch devices, unless [`set_enabled`] turned them off.
pub fn available(device: &Device) -> bool {
    if !ENABLED.load(Ordering::Relaxed) {
        return false;
    }
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "torch")]
        DispatchDevice::LibTorch(_) => true,
        _ => false,
    }
}

/// Whether BatchNorm on `device` takes its weight, bias and statistics in f32 whatever the
/// input's type, as PyTorch's autocast leaves BatchNorm: on libtorch with the fused layers,
/// whose ATen kernels normalise bf16 and f16 inputs with f32 parameters. Elsewhere a bf16 or
/// f16 pass casts them to its own type.
pub fn batch_norm_in_f32(device: &Device) -> bool {
    #[cfg(feature = "torch")]
    if available(device) {
        return matches!(
            device.clone().inner().as_dispatch(),
            DispatchDevice::LibTorch(_)
        );
    }
    let _ = device;
    false
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

/// BatchNorm over `[batch, channels, height, width]` while training, with the batch's own
/// statistics, then `activation` where there is one: returns the output and the running
/// statistics moved toward the batch's by `momentum` (PyTorch's convention: the weight of the
/// batch; the variance unbiased), in the running statistics' type. One operation forward and
/// one backward: on libtorch PyTorch's train-mode `BatchNorm2d`; on burn-flex also with the
/// activation, whose input (the normalised values) is then neither written out nor kept for
/// the backward pass. Gradients reach `x`, `weight` and `bias`; the running statistics
/// returned carry none. Only on a device where [`available`] holds, and with an activation
/// only where [`activates_in_batch_norm`] does.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_training(
    x: Tensor<4>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    running_mean: Tensor<1>,
    running_var: Tensor<1>,
    epsilon: f64,
    momentum: f64,
    activation: Option<Activation>,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let inputs = [
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        running_mean.into_dispatch(),
        running_var.into_dispatch(),
    ];
    let (output, _, _, mean, var, _) =
        batch_norm_training_on::<Dispatch>(inputs, epsilon, momentum, activation);
    (
        Tensor::from_dispatch(output),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(var),
    )
}

/// Whether [`batch_norm_training`] takes an activation on `device`: on burn-flex
/// (`crate::flex_layers`), unless [`set_enabled`] turned the fused layers off. Elsewhere the
/// activation follows BatchNorm as a layer of its own (ATen's kernels on libtorch, as PyTorch
/// runs them).
pub fn activates_in_batch_norm(device: &Device) -> bool {
    on_flex(device)
}

/// burn's `conv2d`, whose gradients come from one backward operation (ATen's
/// `convolution_backward` on libtorch, as in PyTorch's autograd) where burn's autodiff makes
/// one call per gradient. Only on a device where [`available`] holds.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(bias) => {
            <Dispatch as FusedOps>::biased_convolution(x, weight, bias.into_dispatch(), options)
        }
        None => <Dispatch as FusedOps>::convolution(x, weight, options),
    })
}

/// `x · relu6(x + 3) / 6` as one operation. Only on a device where [`available`] holds.
pub fn hard_swish<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::hard_swish(x.into_dispatch()))
}

/// `relu6(x + 3) / 6` (PyTorch's `hardsigmoid`) as one operation. Only on a device where
/// [`available`] holds.
pub fn hard_sigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::hard_sigmoid_gate(x.into_dispatch()))
}

/// The mean over height and width, `[batch, channels, height, width]` → `[batch, channels, 1,
/// 1]`, as one operation each way on libtorch. Only on a device where [`available`] holds.
pub fn global_average_pool(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::global_average_pool(
        x.into_dispatch(),
    ))
}

/// Max pooling over height and width (dilation 1, output sizes rounded down: PyTorch's
/// `max_pool2d`), as one operation each way; its backward pass finds each window's maximum
/// again in the input rather than keeping indices. Only on burn-flex devices (see
/// [`pools_directly`]).
pub fn max_pool(
    x: Tensor<4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::max_pool(
        x.into_dispatch(),
        kernel,
        stride,
        padding,
    ))
}

/// Whether [`max_pool`] runs on `device`: on burn-flex, where it replaces burn-flex's general
/// pooling loop and its indices (`crate::max_pool`), unless [`set_enabled`] turned the fused
/// layers off. Elsewhere burn's own max pooling keeps its indices for the backward pass, as
/// PyTorch's does.
pub fn pools_directly(device: &Device) -> bool {
    on_flex(device)
}

/// Whether `device` is a burn-flex device and the fused layers are on.
fn on_flex(device: &Device) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && matches!(
            device.clone().inner().as_dispatch(),
            DispatchDevice::Flex(_)
        )
}

/// Every replica's `x` (one vector each, the same length) as the rows of a `[replicas,
/// length]` tensor in rank order, on `x`'s device: an all-gather over the replicas of a
/// data-parallel step. Each replica's rows feed its own loss, so the gradient of `x` is the
/// sum of its row's gradients over the replicas. Only inside [`crate::sync_batch_norm::join`];
/// on every backend, with or without the other fused layers.
pub fn gather_across_replicas(x: Tensor<1>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::gather_across_replicas(
        x.into_dispatch(),
    ))
}

/// The forward passes, one operation each.
#[backend_extension(
    Flex,
    LibTorch: cfg(feature = "torch"),
    Cube: cfg(feature = "cuda"),
    Fusion: cfg(all(feature = "cuda", feature = "fusion")),
    Autodiff
)]
pub trait FusedOps: Backend {
    /// BatchNorm with fixed statistics: `(x − mean) / √(variance + ε) · weight + bias` per
    /// channel (dimension 1). Defaults to the backend's own `batch_norm`.
    #[fusion(default)]
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

    /// BatchNorm with the batch's own statistics, and the running statistics moved toward
    /// them by `momentum` (the weight of the batch; the variance unbiased, as PyTorch keeps
    /// it). Returns the output, the batch mean and inverse standard deviation `1/√(variance
    /// + ε)` (what the backward pass takes), the new running mean and variance in the
    /// running statistics' type, and whatever else the backend's backward pass needs (libtorch:
    /// cuDNN's reserve space where cuDNN ran; others need nothing and return the inverse
    /// standard deviation again). Defaults to the backend's `batch_norm_train` and the update
    /// as tensor operations.
    #[allow(clippy::type_complexity)]
    #[fusion(default)]
    fn batch_norm_training(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        epsilon: f64,
        momentum: f64,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        composite::batch_norm_training::<Self>(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            epsilon,
            momentum,
        )
    }

    /// [`Self::batch_norm_training`], then `activation` on the output; returns the same six
    /// tensors. Defaults to the two operations.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    #[fusion(default)]
    fn batch_norm_training_activated(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        epsilon: f64,
        momentum: f64,
        activation: Activation,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (output, mean, inverse_std, running_mean, running_var, saved) =
            Self::batch_norm_training(
                x,
                weight,
                bias,
                running_mean,
                running_var,
                epsilon,
                momentum,
            );
        let output = match activation {
            Activation::Relu => Self::relu(output),
            Activation::HardSwish => Self::hard_swish(output),
        };
        (output, mean, inverse_std, running_mean, running_var, saved)
    }

    /// A 2-D convolution without bias: the backend's `conv2d`.
    #[fusion(default)]
    fn convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, options)
    }

    /// A 2-D convolution with a bias: the backend's `conv2d`.
    #[fusion(default)]
    fn biased_convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, Some(bias), options)
    }

    /// `x · clamp(x / 6 + 1/2, 0, 1)`.
    #[fusion(default)]
    fn hard_swish(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::hard_swish::<Self>(x)
    }

    /// `clamp(x / 6 + 1/2, 0, 1)`: PyTorch's `hardsigmoid`, the squeeze-excitation gate of
    /// MobileNetV3 (burn's own `hard_sigmoid` takes the slope and offset as arguments).
    #[fusion(default)]
    fn hard_sigmoid_gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::hard_sigmoid_gate::<Self>(x)
    }

    /// The mean over dimensions 2 and 3, kept as size 1.
    #[fusion(default)]
    fn global_average_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::global_average_pool::<Self>(x)
    }

    /// Max pooling, dilation 1, output sizes rounded down: the backend's `max_pool2d`.
    #[fusion(default)]
    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        Self::max_pool2d(x, kernel, stride, padding, [1, 1], false)
    }

    /// See [`gather_across_replicas`]: every replica's `x`, moved to this one's device, as
    /// the rows of a matrix.
    #[fusion(default)]
    fn gather_across_replicas(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Exchange::next().gather::<Self>(x)
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
        composite::frozen_batch_norm_backward::<Self>(
            x, weight, mean, variance, epsilon, grad, needed,
        )
    }

    /// The gradients of [`FusedOps::batch_norm_training`] with respect to `x`, `weight` and
    /// `bias` for the output gradient `grad`, from the batch statistics its forward pass
    /// returned, each only where `needed` says so. With `x̂ = (x − mean)·inverse_std` and `N`
    /// values per channel: `bias' = Σ grad`, `weight' = Σ grad·x̂`, and
    /// `x' = weight·inverse_std/N · (N·grad − bias' − x̂·weight')`. `saved` and `epsilon`
    /// are the forward pass' (the composite needs neither).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_training_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        inverse_std: FloatTensor<Self>,
        saved: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
        needed: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        let _ = (saved, epsilon);
        composite::batch_norm_training_backward::<Self>(x, weight, mean, inverse_std, grad, needed)
    }

    /// The gradients of [`FusedOps::batch_norm_training_activated`], as
    /// [`Self::batch_norm_training_backward`]'s for the gradient that reaches BatchNorm's
    /// output through `activation`. That gradient needs the normalised values, which are
    /// computed again from `x` (with `bias`): `(x − mean)·inverse_std·weight + bias`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_training_activated_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        inverse_std: FloatTensor<Self>,
        saved: FloatTensor<Self>,
        epsilon: f64,
        activation: Activation,
        grad: FloatTensor<Self>,
        needed: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        let normalised = composite::normalise::<Self>(
            x.clone(),
            weight.clone(),
            bias,
            mean.clone(),
            inverse_std.clone(),
        );
        // ReLU's gradient is masked where its output is ≤ 0, which is where its input is.
        let grad = match activation {
            Activation::Relu => Self::relu_backward(normalised, grad),
            Activation::HardSwish => Self::hard_swish_backward(normalised, grad),
        };
        Self::batch_norm_training_backward(
            x,
            weight,
            mean,
            inverse_std,
            saved,
            epsilon,
            grad,
            needed,
        )
    }

    /// The gradients of [`FusedOps::convolution`] with respect to `x`, `weight` and `bias`
    /// for the output gradient `grad`, each only where `needed` says so: the backend's own
    /// backward operations, one per gradient.
    fn convolution_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
        needed: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        composite::convolution_backward::<Self>(x, weight, bias, grad, options, needed)
    }

    /// The gradient of [`FusedOps::hard_swish`] at `x` for the output gradient `grad`:
    /// PyTorch's `hardswish_backward` (0 below −3, 1 above 3, `x/3 + 1/2` between).
    fn hard_swish_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::hard_swish_backward::<Self>(x, grad)
    }

    /// The gradient of [`FusedOps::hard_sigmoid_gate`] at `x` for the output gradient `grad`:
    /// PyTorch's `hardsigmoid_backward` (1/6 strictly between −3 and 3, else 0).
    fn hard_sigmoid_gate_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composite::hard_sigmoid_gate_backward::<Self>(x, grad)
    }

    /// The gradient of [`FusedOps::global_average_pool`] with respect to `x` for the output
    /// gradient `grad` (`[batch, channels, 1, 1]`): `grad / (height · width)` everywhere.
    fn global_average_pool_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composite::global_average_pool_backward::<Self>(x, grad)
    }

    /// The gradient of [`FusedOps::max_pool`] with respect to `x` for the output gradient
    /// `grad`: each output's gradient added at its window's maximum.
    fn max_pool_backward(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composite::max_pool_backward::<Self>(x, kernel, stride, padding, grad)
    }
}

// burn-cuda: the composed defaults. Only the exchange between replicas runs there ([`available`]
// is false on its devices: burn's fusion already merges the composite layers' element-wise
// chains into few kernels).
#[cfg(feature = "cuda")]
impl FusedOps for burn_cubecl::CubeBackend {}
#[cfg(feature = "cuda")]
impl FusedBackward for burn_cubecl::CubeBackend {}
#[cfg(all(feature = "cuda", feature = "fusion"))]
impl<B: burn::backend::fusion::FusionBackend + FusedBackward> FusedBackward
    for burn::backend::fusion::Fusion<B>
{
}

#[cfg(feature = "torch")]
mod torch {
    //! ATen's kernels, through Lanner's patch of burn-tch.

    use super::{ConvOptions, FloatTensor, FusedBackward, FusedOps, LibTorch};
    use burn::backend::ops::ModuleOps;
    use burn_tch::fused::{self, BatchNormKernels, Statistics};
    use std::sync::OnceLock;

    /// The kernels of BatchNorm with batch statistics: those PyTorch's `batch_norm` chooses
    /// (cuDNN's where it runs them), or ATen's own everywhere with
    /// `LANNER_BATCH_NORM_KERNELS=aten`, to compare.
    fn batch_norm_kernels() -> BatchNormKernels {
        static KERNELS: OnceLock<BatchNormKernels> = OnceLock::new();
        *KERNELS.get_or_init(
            || match std::env::var("LANNER_BATCH_NORM_KERNELS").as_deref() {
                Ok("aten") => BatchNormKernels::Aten,
                _ => BatchNormKernels::PyTorchs,
            },
        )
    }

    impl FusedOps for LibTorch {
        fn batch_norm_training(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: FloatTensor<Self>,
            running_mean: FloatTensor<Self>,
            running_var: FloatTensor<Self>,
            epsilon: f64,
            momentum: f64,
        ) -> (
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
        ) {
            let [output, mean, inverse_std, running_mean, running_var, saved] =
                fused::batch_norm_training(
                    &x,
                    &weight,
                    &bias,
                    &running_mean,
                    &running_var,
                    momentum,
                    epsilon,
                    batch_norm_kernels(),
                );
            (output, mean, inverse_std, running_mean, running_var, saved)
        }

        fn hard_swish(x: FloatTensor<Self>) -> FloatTensor<Self> {
            fused::hard_swish(&x)
        }

        fn hard_sigmoid_gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
            fused::hard_sigmoid(&x)
        }

        fn global_average_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
            Self::adaptive_avg_pool2d(x, [1, 1])
        }
    }

    impl FusedBackward for LibTorch {
        fn batch_norm_training_backward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            mean: FloatTensor<Self>,
            inverse_std: FloatTensor<Self>,
            saved: FloatTensor<Self>,
            epsilon: f64,
            grad: FloatTensor<Self>,
            needed: [bool; 3],
        ) -> [Option<FloatTensor<Self>>; 3] {
            fused::batch_norm_training_backward(
                &x,
                &weight,
                &mean,
                &inverse_std,
                &saved,
                epsilon,
                &grad,
                needed,
            )
        }

        fn convolution_backward(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            _bias: Option<FloatTensor<Self>>,
            grad: FloatTensor<Self>,
            options: ConvOptions<2>,
            needed: [bool; 3],
        ) -> [Option<FloatTensor<Self>>; 3] {
            fused::conv2d_backward(x, &weight, &grad, options, needed)
        }

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

        fn hard_sigmoid_gate_backward(
            x: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            fused::hard_sigmoid_backward(&x, &grad)
        }

        fn global_average_pool_backward(
            x: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            Self::adaptive_avg_pool2d_backward(x, grad)
        }
    }
}

impl<B: FusedOps + FusedBackward, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn batch_norm_training(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        epsilon: f64,
        momentum: f64,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let inputs = [x, weight, bias, running_mean, running_var];
        tracked_batch_norm_training::<B, C>(inputs, epsilon, momentum, None)
    }

    fn batch_norm_training_activated(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        epsilon: f64,
        momentum: f64,
        activation: Activation,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let inputs = [x, weight, bias, running_mean, running_var];
        tracked_batch_norm_training::<B, C>(inputs, epsilon, momentum, Some(activation))
    }

    fn convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        convolution::<B, C>(x, weight, None, options)
    }

    fn biased_convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        convolution::<B, C>(x, weight, Some(bias), options)
    }

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
                register!(ops.parents, gradients, grads);
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
        unary::<B, C>(x, Unary::HardSwish)
    }

    fn hard_sigmoid_gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, Unary::HardSigmoidGate)
    }

    fn global_average_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, Unary::GlobalAveragePool)
    }

    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        unary::<B, C>(
            x,
            Unary::MaxPool {
                kernel,
                stride,
                padding,
            },
        )
    }

    fn gather_across_replicas(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let exchange = Exchange::next();
        match GatherAcrossReplicas
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = exchange.gather::<B>(x.into_primitive());
                prep.finish(exchange, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(exchange.gather::<B>(x.into_primitive())),
        }
    }
}

/// The backward pass of [`FusedOps::gather_across_replicas`]: each replica's output feeds its
/// own loss, so the input's gradient is the sum over the replicas of its row's gradient.
#[derive(Debug)]
struct GatherAcrossReplicas;

impl<B: Backend> Backward<B, 1> for GatherAcrossReplicas {
    type State = Exchange;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        // Every replica takes part in the sum, whether or not its input needs the gradient:
        // the others wait for it.
        let summed = ops.state.gather_backward::<B>(grad);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            grads.register::<B>(parent.id, summed);
        }
    }
}

/// `B`'s [`FusedOps::batch_norm_training`], or with an activation its
/// [`FusedOps::batch_norm_training_activated`]. `inputs`: `x`, the weight, the bias, the
/// running mean and variance.
#[allow(clippy::type_complexity)]
fn batch_norm_training_on<B: FusedOps>(
    inputs: [FloatTensor<B>; 5],
    epsilon: f64,
    momentum: f64,
    activation: Option<Activation>,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) {
    let [x, weight, bias, running_mean, running_var] = inputs;
    match activation {
        None => B::batch_norm_training(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            epsilon,
            momentum,
        ),
        Some(activation) => B::batch_norm_training_activated(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            epsilon,
            momentum,
            activation,
        ),
    }
}

/// [`FusedOps::batch_norm_training`] under autodiff, followed by `activation` where there is
/// one ([`FusedOps::batch_norm_training_activated`]); the backward pass is the matching one of
/// [`FusedBackward`]. `inputs`: `x`, the weight, the bias, the running mean and variance.
#[allow(clippy::type_complexity)]
fn tracked_batch_norm_training<B: FusedOps + FusedBackward, C: CheckpointStrategy>(
    inputs: [FloatTensor<Autodiff<B, C>>; 5],
    epsilon: f64,
    momentum: f64,
    activation: Option<Activation>,
) -> (
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
) {
    #[derive(Debug)]
    struct BatchNormTraining;

    /// What the backward pass takes: the input, the weight, the batch mean and inverse
    /// standard deviation, what else the backend saved, ε, and the activation with the bias
    /// (which recomputes the activation's input).
    type State<B> = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
        Option<(Activation, FloatTensor<B>)>,
    );

    impl<B: FusedBackward> Backward<B, 3> for BatchNormTraining {
        type State = State<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<B>(&ops.node);
            let (x, weight, mean, inverse_std, saved, epsilon, activated) = ops.state;
            let needed = ops.parents.each_ref().map(Option::is_some);
            let gradients = match activated {
                None => B::batch_norm_training_backward(
                    x,
                    weight,
                    mean,
                    inverse_std,
                    saved,
                    epsilon,
                    grad,
                    needed,
                ),
                Some((activation, bias)) => B::batch_norm_training_activated_backward(
                    x,
                    weight,
                    bias,
                    mean,
                    inverse_std,
                    saved,
                    epsilon,
                    activation,
                    grad,
                    needed,
                ),
            };
            register!(ops.parents, gradients, grads);
        }
    }

    let forward = |x, weight, bias, running_mean, running_var| {
        let inputs = [x, weight, bias, running_mean, running_var];
        batch_norm_training_on::<B>(inputs, epsilon, momentum, activation)
    };
    let [x, weight, bias, running_mean, running_var] = inputs;
    let running_mean = running_mean.into_primitive();
    let running_var = running_var.into_primitive();
    let untracked = <Autodiff<B, C> as AutodiffBackend>::from_inner;
    let prepared = BatchNormTraining
        .prepare::<C>([x.node(), weight.node(), bias.node()])
        .compute_bound()
        .stateful();
    let (x, weight, bias) = (
        x.into_primitive(),
        weight.into_primitive(),
        bias.into_primitive(),
    );
    match prepared {
        OpsKind::Tracked(prep) => {
            let kept_bias = activation.map(|activation| (activation, bias.clone()));
            let (output, mean, inverse_std, running_mean, running_var, saved) =
                forward(x.clone(), weight.clone(), bias, running_mean, running_var);
            let state = (
                x,
                weight,
                mean.clone(),
                inverse_std.clone(),
                saved.clone(),
                epsilon,
                kept_bias,
            );
            (
                prep.finish(state, output),
                untracked(mean),
                untracked(inverse_std),
                untracked(running_mean),
                untracked(running_var),
                untracked(saved),
            )
        }
        OpsKind::UnTracked(prep) => {
            let (output, mean, inverse_std, running_mean, running_var, saved) =
                forward(x, weight, bias, running_mean, running_var);
            (
                prep.finish(output),
                untracked(mean),
                untracked(inverse_std),
                untracked(running_mean),
                untracked(running_var),
                untracked(saved),
            )
        }
    }
}

/// [`FusedOps::convolution`] (without `bias`) or [`FusedOps::biased_convolution`] under
/// autodiff, with [`FusedBackward::convolution_backward`] as its backward.
fn convolution<B: FusedOps + FusedBackward, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    bias: Option<FloatTensor<Autodiff<B, C>>>,
    options: ConvOptions<2>,
) -> FloatTensor<Autodiff<B, C>> {
    /// With a bias (`N` = 3: input, weight, bias) or without (`N` = 2).
    #[derive(Debug)]
    struct Convolution<const N: usize>;

    impl<B: FusedBackward, const N: usize> Backward<B, N> for Convolution<N> {
        /// The input, the weight, the bias and the options.
        type State = (
            FloatTensor<B>,
            FloatTensor<B>,
            Option<FloatTensor<B>>,
            ConvOptions<2>,
        );

        fn backward(
            self,
            ops: Ops<Self::State, N>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<B>(&ops.node);
            let (x, weight, bias, options) = ops.state;
            let needed = [0, 1, 2].map(|i| ops.parents.get(i).is_some_and(Option::is_some));
            let gradients = B::convolution_backward(x, weight, bias, grad, options, needed);
            register!(ops.parents, gradients, grads);
        }
    }

    fn forward<B: FusedOps>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<B> {
        match bias {
            Some(bias) => B::biased_convolution(x, weight, bias, options),
            None => B::convolution(x, weight, options),
        }
    }

    macro_rules! convolve {
        ($parents:literal, $nodes:expr) => {
            match Convolution::<$parents>
                .prepare::<C>($nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (x, weight) = (x.into_primitive(), weight.into_primitive());
                    let bias = bias.map(|bias| bias.into_primitive());
                    let (input, kernel) = (x.clone(), weight.clone());
                    let output = forward::<B>(input, kernel, bias.clone(), options.clone());
                    prep.finish((x, weight, bias, options), output)
                }
                OpsKind::UnTracked(prep) => prep.finish(forward::<B>(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.map(|bias| bias.into_primitive()),
                    options,
                )),
            }
        };
    }

    match bias.as_ref().map(|bias| bias.node()) {
        Some(bias_node) => convolve!(3, [x.node(), weight.node(), bias_node]),
        None => convolve!(2, [x.node(), weight.node()]),
    }
}

/// The one-input operations of [`FusedOps`], with their settings.
#[derive(Clone, Copy, Debug)]
enum Unary {
    HardSwish,
    HardSigmoidGate,
    GlobalAveragePool,
    MaxPool {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    },
}

impl Unary {
    fn forward<B: FusedOps>(self, x: FloatTensor<B>) -> FloatTensor<B> {
        match self {
            Self::HardSwish => B::hard_swish(x),
            Self::HardSigmoidGate => B::hard_sigmoid_gate(x),
            Self::GlobalAveragePool => B::global_average_pool(x),
            Self::MaxPool {
                kernel,
                stride,
                padding,
            } => B::max_pool(x, kernel, stride, padding),
        }
    }

    fn backward<B: FusedBackward>(self, x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        match self {
            Self::HardSwish => B::hard_swish_backward(x, grad),
            Self::HardSigmoidGate => B::hard_sigmoid_gate_backward(x, grad),
            Self::GlobalAveragePool => B::global_average_pool_backward(x, grad),
            Self::MaxPool {
                kernel,
                stride,
                padding,
            } => B::max_pool_backward(x, kernel, stride, padding, grad),
        }
    }
}

impl<B: FusedBackward> Backward<B, 1> for Unary {
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
            grads.register::<B>(parent.id, Unary::backward::<B>(self, ops.state, grad));
        }
    }
}

/// `operation` on `x` under autodiff, keeping `x` for the backward pass.
fn unary<B: FusedOps + FusedBackward, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    operation: Unary,
) -> FloatTensor<Autodiff<B, C>> {
    match operation
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = x.into_primitive();
            let output = operation.forward::<B>(x.clone());
            prep.finish(x, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(operation.forward::<B>(x.into_primitive())),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::{self, relu};
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::*;

    /// A MobileNetV3 block's tail on `device`, forward and backward, with the fused layers or
    /// burn's composites: BatchNorm with frozen statistics, hard swish, then squeeze-excitation
    /// (global average pool, a 1x1 convolution with bias, ReLU, hard sigmoid, the product).
    /// Returns the output and the gradients of the input (when it requires one), BatchNorm's
    /// weight and bias, and the convolution's weight and bias.
    fn layers(device: &Device, fused: bool, input_gradient: bool) -> Vec<Vec<f32>> {
        let device = device.clone().autodiff();
        // Irregular values across the activations' pieces, never exactly ±3.
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
        let conv_weight = TensorData::new(values(9, 7, 8.0), [3, 3, 1, 1]);
        let conv_weight = Tensor::<4>::from_data(conv_weight, &device).require_grad();
        let conv_bias = channel(8, 2.0, 0.0).require_grad();
        let epsilon = 1e-3;
        let hidden = if fused {
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
        let squeezed = if fused {
            global_average_pool(hidden.clone())
        } else {
            hidden.clone().mean_dims(&[2, 3])
        };
        let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        let gate = relu(conv2d(
            squeezed,
            conv_weight.clone(),
            Some(conv_bias.clone()),
            options,
        ));
        let gate = if fused {
            hard_sigmoid(gate)
        } else {
            activation::hard_sigmoid(gate, 1.0 / 6.0, 0.5)
        };
        let output = hidden * gate;
        let weights = Tensor::<4>::from_data(TensorData::new(values(120, 6, 2.0), shape), &device);
        let gradients = (output.clone() * weights).sum().backward();
        let read = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
        let read_1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
        let mut results = vec![
            read(output.inner()),
            read_1(weight.grad(&gradients).unwrap()),
            read_1(bias.grad(&gradients).unwrap()),
            read(conv_weight.grad(&gradients).unwrap()),
            read_1(conv_bias.grad(&gradients).unwrap()),
        ];
        match x.grad(&gradients) {
            Some(gradient) => results.push(read(gradient)),
            None => assert!(!input_gradient, "no gradient for the input"),
        }
        results
    }

    /// A training step's convolution and BatchNorm on `device`, forward and backward, with
    /// the fused layers or burn's own: BatchNorm with batch statistics (updating running
    /// statistics), a strided convolution with asymmetric padding and a bias, then a
    /// depthwise convolution without bias. Returns the output, the new running mean and variance, and
    /// the gradients of every weight and (when it requires one) of the input.
    fn training_layers(device: &Device, fused: bool, input_gradient: bool) -> Vec<Vec<f32>> {
        use burn::tensor::module::batch_norm_train;

        let device = device.clone().autodiff();
        let values = |n: usize, seed: usize, spread: f32, offset: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((((i * 7919 + seed * 104729) % 1009) as f32) / 1009.0 - 0.5) * spread)
                .map(|v| v + offset)
                .collect()
        };
        let tensor_4 = |shape: [usize; 4], seed, spread| {
            let n = shape.iter().product();
            Tensor::<4>::from_data(
                TensorData::new(values(n, seed, spread, 0.0), shape),
                &device,
            )
        };
        let tensor_1 = |n: usize, seed, spread, offset| {
            Tensor::<1>::from_data(
                TensorData::new(values(n, seed, spread, offset), [n]),
                &device,
            )
        };
        let x = tensor_4([2, 3, 7, 6], 1, 4.0);
        let x = if input_gradient { x.require_grad() } else { x };
        let bn_weight = tensor_1(3, 4, 1.0, 1.0).require_grad();
        let bn_bias = tensor_1(3, 5, 1.0, 0.0).require_grad();
        let (running_mean, running_var) = (tensor_1(3, 6, 1.0, 0.0), tensor_1(3, 7, 1.0, 1.0));
        let conv_weight = tensor_4([4, 3, 3, 3], 2, 1.0).require_grad();
        let conv_bias = tensor_1(4, 3, 1.0, 0.0).require_grad();
        let depthwise = tensor_4([4, 1, 3, 3], 8, 1.0).require_grad();
        let strided = ConvOptions::new_with_padding([2, 2], [(1, 0), (1, 0)], [1, 1], 1);
        let grouped = ConvOptions::new([1, 1], [1, 1], [1, 1], 4);
        let (epsilon, momentum) = (1e-3, 0.1);
        let (output, mean, var) = if fused {
            let (normalised, mean, var) = batch_norm_training(
                x.clone(),
                bn_weight.clone(),
                bn_bias.clone(),
                running_mean,
                running_var,
                epsilon,
                momentum,
                None,
            );
            let bias = Some(conv_bias.clone());
            let hidden = super::conv2d(normalised, conv_weight.clone(), bias, strided);
            (
                super::conv2d(hidden, depthwise.clone(), None, grouped),
                mean,
                var,
            )
        } else {
            let count = (2 * 7 * 6) as f64;
            let batch = batch_norm_train(x.clone(), bn_weight.clone(), bn_bias.clone(), epsilon);
            let mean =
                running_mean.mul_scalar(1.0 - momentum) + batch.mean.detach().mul_scalar(momentum);
            let var = running_var.mul_scalar(1.0 - momentum)
                + batch
                    .variance
                    .detach()
                    .mul_scalar(momentum * count / (count - 1.0));
            let bias = Some(conv_bias.clone());
            let hidden = conv2d(batch.output, conv_weight.clone(), bias, strided);
            (conv2d(hidden, depthwise.clone(), None, grouped), mean, var)
        };
        let weights = tensor_4(output.dims(), 9, 2.0);
        let gradients = (output.clone() * weights).sum().backward();
        let read = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
        let read_1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
        let mut results = vec![
            read(output.inner()),
            read_1(mean.inner()),
            read_1(var.inner()),
            read(conv_weight.grad(&gradients).unwrap()),
            read_1(conv_bias.grad(&gradients).unwrap()),
            read_1(bn_weight.grad(&gradients).unwrap()),
            read_1(bn_bias.grad(&gradients).unwrap()),
            read(depthwise.grad(&gradients).unwrap()),
        ];
        match x.grad(&gradients) {
            Some(gradient) => results.push(read(gradient)),
            None => assert!(!input_gradient, "no gradient for the input"),
        }
        results
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
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
    fn fused_training_batch_norm_and_convolution_match_burn_on_burn_flex() {
        for input_gradient in [true, false] {
            let want = training_layers(&Device::flex(), false, input_gradient);
            let got = training_layers(&Device::flex(), true, input_gradient);
            assert_close(&got, &want, &format!("input gradient {input_gradient}"));
        }
    }

    /// BatchNorm on batch statistics then `activation`, as one operation
    /// ([`batch_norm_training`] with the activation) or as two, in `dtype`, followed by a 1x1
    /// convolution so that the output gradient varies. Returns the output, the running
    /// statistics, and the gradients of BatchNorm's weight and bias, of the convolution and
    /// (when it requires one) of the input.
    fn activated_batch_norm(
        activation: Activation,
        one_operation: bool,
        input_gradient: bool,
        dtype: DType,
    ) -> Vec<Vec<f32>> {
        let device = Device::flex().autodiff();
        let values = |n: usize, seed: usize, spread: f32, offset: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((((i * 7919 + seed * 104729) % 1009) as f32) / 1009.0 - 0.5) * spread)
                .map(|v| v + offset)
                .collect()
        };
        let tensor = |shape: Vec<usize>, seed, spread, offset| {
            let n = shape.iter().product();
            let data = TensorData::new(values(n, seed, spread, offset), shape);
            Tensor::<4>::from_data(data, &device).cast(dtype)
        };
        let vector = |n: usize, seed, spread, offset| {
            let data = TensorData::new(values(n, seed, spread, offset), [n]);
            Tensor::<1>::from_data(data, &device).cast(dtype)
        };
        let channels = 5;
        let x = tensor(vec![3, channels, 6, 7], 1, 6.0, 0.5);
        let x = if input_gradient { x.require_grad() } else { x };
        // Scales up to 3.5 and shifts of ±1.5: the normalised values reach past ±3, every
        // piece of hard swish.
        let weight = vector(channels, 2, 4.0, 1.5).require_grad();
        let bias = vector(channels, 3, 3.0, 0.0).require_grad();
        let running = || (vector(channels, 4, 1.0, 0.0), vector(channels, 5, 1.0, 1.0));
        let (running_mean, running_var) = running();
        let conv_weight = tensor(vec![4, channels, 1, 1], 6, 2.0, 0.0).require_grad();
        let (epsilon, momentum) = (1e-3, 0.1);
        let (normalised, mean, var) = batch_norm_training(
            x.clone(),
            weight.clone(),
            bias.clone(),
            running_mean,
            running_var,
            epsilon,
            momentum,
            one_operation.then_some(activation),
        );
        let activated = match one_operation {
            true => normalised,
            false => activation.forward(normalised),
        };
        let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        let output = super::conv2d(activated, conv_weight.clone(), None, options);
        let weights = tensor(output.dims().to_vec(), 7, 2.0, 0.0);
        let gradients = (output.clone() * weights).sum().backward();
        let floats = |data: TensorData| data.convert::<f32>().try_into_vec::<f32>().unwrap();
        let read = |t: Tensor<4>| floats(t.into_data());
        let read_1 = |t: Tensor<1>| floats(t.into_data());
        let mut results = vec![
            read(output.inner()),
            read_1(mean.inner()),
            read_1(var.inner()),
            read_1(weight.grad(&gradients).unwrap()),
            read_1(bias.grad(&gradients).unwrap()),
            read(conv_weight.grad(&gradients).unwrap()),
        ];
        match x.grad(&gradients) {
            Some(gradient) => results.push(read(gradient)),
            None => assert!(!input_gradient, "no gradient for the input"),
        }
        results
    }

    #[test]
    fn batch_norm_training_activated_matches_batch_norm_then_the_activation() {
        assert!(activates_in_batch_norm(&Device::flex()));
        for activation in [Activation::Relu, Activation::HardSwish] {
            for input_gradient in [true, false] {
                let what = format!("{activation:?}, input gradient {input_gradient}");
                let run = |one, dtype| activated_batch_norm(activation, one, input_gradient, dtype);
                // f32: Lanner's loops (`crate::flex_layers`) against two operations.
                let got = run(true, DType::F32);
                assert_close(&got, &run(false, DType::F32), &what);
                // bf16: burn's composites (what the default bodies of `FusedOps` and
                // `FusedBackward` do), to bf16's precision.
                let (bf16, want) = (run(true, DType::BF16), run(false, DType::BF16));
                assert_eq!(bf16.len(), want.len(), "{what}, bf16");
                for (index, (a, b)) in bf16.iter().zip(&want).enumerate() {
                    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            (x - y).abs() <= 0.05 * scale,
                            "{what}, bf16, result {index}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fused_layers_without_autodiff_match_burn_composites() {
        let device = Device::flex();
        let x = Tensor::<1>::from_data(
            TensorData::new((0..80).map(|i| i as f32 / 8.0 - 5.05).collect(), [80]),
            &device,
        );
        let read = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
        let got = [hard_swish(x.clone()), hard_sigmoid(x.clone())].map(read);
        let want = [
            activation::hard_swish(x.clone()),
            activation::hard_sigmoid(x.clone(), 1.0 / 6.0, 0.5),
        ]
        .map(read);
        assert_close(&got, &want, "hard swish and hard sigmoid");
        let x = x.reshape([2, 4, 2, 5]);
        let got = global_average_pool(x.clone())
            .into_data()
            .try_into_vec::<f32>();
        let want = x.mean_dims(&[2, 3]).into_data().try_into_vec::<f32>();
        assert_close(&[got.unwrap()], &[want.unwrap()], "global average pool");
    }

    #[test]
    fn max_pool_matches_burns_forward_and_backward_on_burn_flex() {
        use burn::tensor::module::max_pool2d;
        use burn::tensor::ops::MaxPoolOptions;
        assert!(pools_directly(&Device::flex().autodiff()));
        let device = Device::flex().autodiff();
        // Xception's pool, (3, 2, 1), on an odd size; values with ties.
        let shape = [2, 3, 9, 7];
        let values: Vec<f32> = (0..378).map(|i| ((i * 37 % 7) as f32) - 3.0).collect();
        let run = |fused: bool| -> Vec<Vec<f32>> {
            let x = Tensor::<4>::from_data(TensorData::new(values.clone(), shape), &device)
                .require_grad();
            let output = if fused {
                max_pool(x.clone(), [3, 3], [2, 2], [1, 1])
            } else {
                let options = MaxPoolOptions::new([3, 3])
                    .with_stride([2, 2])
                    .with_padding([1, 1]);
                max_pool2d(x.clone(), options)
            };
            let weights = Tensor::<4>::from_data(
                TensorData::new(
                    (0..output.dims().iter().product::<usize>())
                        .map(|i| (i % 5) as f32 - 1.5)
                        .collect(),
                    output.dims(),
                ),
                &device,
            );
            let gradients = (output.clone() * weights).sum().backward();
            let read = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
            vec![read(output.inner()), read(x.grad(&gradients).unwrap())]
        };
        let (got, want) = (run(true), run(false));
        assert_eq!(got, want);
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
            let want = training_layers(&Device::flex(), false, input_gradient);
            let got = training_layers(&Device::libtorch(), true, input_gradient);
            let what = format!("libtorch training layers, input gradient {input_gradient}");
            assert_close(&got, &want, &what);
        }
    }
}
