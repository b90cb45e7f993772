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
//!
//! Here: the layers' functions and the two traits; `autodiff` implements [`FusedOps`] for
//! burn's `Autodiff` (each operation and the backward step it records), `torch` both traits
//! for the `torch` build, `tests` checks every fused layer against burn's composites.

// burn-tch (LibTorch) is deprecated upstream; Lanner patches and keeps it (vendor/burn-tch).
#![cfg_attr(feature = "torch", allow(deprecated))]

#[cfg(feature = "torch")]
use burn::backend::LibTorch;

use burn::backend::tensor::FloatTensor;
#[allow(unused_imports)] // Named by the code `backend_extension` generates.
use burn::backend::{Autodiff, Dispatch, Flex};
use burn::backend::{Backend, DispatchDevice, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::activation::Activation;
use crate::composite;
use crate::sync_batch_norm::Exchange;

static ENABLED: AtomicBool = AtomicBool::new(true);

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

#[cfg(feature = "torch")]
mod torch;

mod autodiff;

#[cfg(test)]
mod tests;
