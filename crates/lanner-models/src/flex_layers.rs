//! The fused layers on burn-flex (the CPU device), written for f32 `[batch, channels, …]`
//! data: BatchNorm with batch statistics, hard swish, hard sigmoid, global average pooling and
//! max pooling ([`crate::max_pool`]), depthwise convolutions ([`crate::depthwise_conv`]) and
//! dense ones ([`crate::dense_conv`]), forward and backward. Other types take burn's
//! composites ([`crate::composite`]).
//!
//! burn-flex runs each tensor operation as a pass over memory into a new tensor, and reduces
//! NCHW data per channel by first swapping the channels to the front, a copy. Here each layer
//! is one or two passes, in loops compiled for the best instruction set the CPU has:
//! - BatchNorm's statistics read each plane (one image's channel) once: its mean and squared
//!   deviations while it is in cache, combined over the planes with Chan's pairwise formula
//!   (in f64), as PyTorch combines per-thread Welford statistics. The output is one more pass.
//! - BatchNorm's backward pass reads the gradient and the input once for two sums per channel,
//!   and once more to write the input's gradient, `a·grad + b·x + c` per channel.
//! - A ReLU or hard swish after BatchNorm ([`FusedOps::batch_norm_training_activated`]) is
//!   applied in BatchNorm's output pass; backward, its slope at `x·scale + shift` is computed
//!   again in both of BatchNorm's passes. BatchNorm's own output is never written.
//! - The activations and pooling are one pass each way.
//!
//! The layers match burn's composites within float rounding (`crate::fused`'s tests).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use burn::backend::ops::{ActivationOps, ModuleOps};
use burn::backend::{Flex, Shape, TensorMetadata, tensor::FloatTensor};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use crate::activation::Activation;
use crate::composite;
use crate::dense_conv::Dense;
use crate::depthwise_conv::Depthwise;
use crate::folded::kernels::{dispatch, fma};
use crate::fused::{FusedBackward, FusedOps};
use crate::max_pool::MaxPool;
use crate::written::written_by_planes;

/// Values per task of the element-wise passes.
const CHUNK: usize = 1 << 14;

/// Independent partial sums per reduction: enough for the vector units to run unhindered.
const LANES: usize = 16;

/// The six tensors of [`FusedOps::batch_norm_training`].
type BatchNormOutputs = (
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
    FlexTensor,
);

impl FusedOps for Flex {
    fn batch_norm_training(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        epsilon: f64,
        momentum: f64,
    ) -> BatchNormOutputs {
        let inputs = [x, weight, bias, running_mean, running_var];
        batch_norm_training(inputs, epsilon, momentum, None)
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
    ) -> BatchNormOutputs {
        let inputs = [x, weight, bias, running_mean, running_var];
        batch_norm_training(inputs, epsilon, momentum, Some(activation))
    }

    fn convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        convolution(x, weight, None, options)
    }

    fn biased_convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        convolution(x, weight, Some(bias), options)
    }

    fn hard_swish(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match contiguous_f32(&x) {
            Some(xs) => element_wise(&xs, hard_swish_into),
            None => composite::hard_swish::<Self>(x),
        }
    }

    fn hard_sigmoid_gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match contiguous_f32(&x) {
            Some(xs) => element_wise(&xs, hard_sigmoid_into),
            None => composite::hard_sigmoid_gate::<Self>(x),
        }
    }

    fn global_average_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = x.shape();
        let (Some(xs), 4) = (contiguous_f32(&x), shape.num_dims()) else {
            return composite::global_average_pool::<Self>(x);
        };
        let area = shape[2] * shape[3];
        if area == 0 {
            return composite::global_average_pool::<Self>(x);
        }
        let means = values(&xs)
            .par_chunks(area)
            .map(|plane| {
                let mut sum = 0.0;
                plane_sum(plane, &mut sum);
                (sum / area as f64) as f32
            })
            .collect();
        tensor(means, Shape::new([shape[0], shape[1], 1, 1]))
    }

    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        match (
            MaxPool::of(&x.shape(), kernel, stride, padding),
            contiguous_f32(&x),
        ) {
            (Some(pool), Some(xs)) => tensor(
                pool.forward(values(&xs)),
                Shape::from(pool.output_shape().to_vec()),
            ),
            _ => <Self as ModuleOps<Self>>::max_pool2d(x, kernel, stride, padding, [1, 1], false),
        }
    }
}

/// [`FusedOps::batch_norm_training`] on f32 tensors, then `activation` where there is one
/// ([`FusedOps::batch_norm_training_activated`]); burn's composites for other types.
/// `inputs`: `x`, the weight, the bias, the running mean and variance.
fn batch_norm_training(
    inputs: [FlexTensor; 5],
    epsilon: f64,
    momentum: f64,
    activation: Option<Activation>,
) -> BatchNormOutputs {
    let planes = Planes::of(&inputs[0].shape());
    let [x, weight, bias, running_mean, running_var] = inputs;
    let contiguous = [&x, &weight, &bias, &running_mean, &running_var].map(contiguous_f32);
    let (Some(planes), [Some(xs), Some(weight), Some(bias), Some(mean), Some(var)]) =
        (planes, contiguous)
    else {
        let (output, mean, inverse_std, running_mean, running_var, saved) =
            composite::batch_norm_training::<Flex>(
                x,
                weight,
                bias,
                running_mean,
                running_var,
                epsilon,
                momentum,
            );
        let output = match activation {
            None => output,
            Some(Activation::Relu) => Flex::relu(output),
            Some(Activation::HardSwish) => Flex::hard_swish(output),
        };
        return (output, mean, inverse_std, running_mean, running_var, saved);
    };
    let xs = values(&xs);
    let of_planes: Vec<Moments> = xs.par_chunks(planes.plane).map(Moments::of_plane).collect();
    let moments: Vec<Moments> = (0..planes.channels)
        .map(|channel| {
            planes
                .of_channel(&of_planes, channel)
                .fold(Moments::default(), |all, plane| all.merge(*plane))
        })
        .collect();
    let count = planes.per_channel() as f64;
    let unbiased = if count > 1.0 {
        count / (count - 1.0)
    } else {
        1.0
    };
    let batch_mean: Vec<f32> = moments.iter().map(|m| m.mean as f32).collect();
    let inverse_std: Vec<f32> = moments
        .iter()
        .map(|m| (1.0 / (m.squares / count + epsilon).sqrt()) as f32)
        .collect();
    let (scale, shift) =
        scale_and_shift_of(values(&weight), values(&bias), &batch_mean, &inverse_std);
    // SAFETY: `normalise` sets every value of the plane it is given (it asserts that `x` is
    // as long).
    let output = unsafe {
        written_by_planes(xs.len(), planes.plane, |index, out| {
            let x = &xs[index * planes.plane..][..planes.plane];
            let channel = index % planes.channels;
            normalise(out, x, scale[channel], shift[channel], activation);
        })
    };
    let (running_mean, running_var) = (values(&mean), values(&var));
    let moved = |running: &[f32], batch: &dyn Fn(&Moments) -> f64| -> Vec<f32> {
        running
            .iter()
            .zip(&moments)
            .map(|(&r, m)| (f64::from(r) * (1.0 - momentum) + batch(m) * momentum) as f32)
            .collect()
    };
    let new_mean = moved(running_mean, &|m| m.mean);
    let new_var = moved(running_var, &|m| m.squares / count * unbiased);
    let vector = || Shape::new([planes.channels]);
    let inverse_std = tensor(inverse_std, vector());
    (
        tensor(output, x.shape()),
        tensor(batch_mean, vector()),
        inverse_std.clone(),
        tensor(new_mean, vector()),
        tensor(new_var, vector()),
        // Nothing else to save for the backward pass.
        inverse_std,
    )
}

/// [`FusedBackward::batch_norm_training_backward`] on f32 tensors, or, with an activation and
/// BatchNorm's bias, [`FusedBackward::batch_norm_training_activated_backward`]: the gradient
/// reaching BatchNorm's output is then the activation's slope at `x·scale + shift` times
/// `grad`, computed where it is used rather than stored. burn's composites for other types.
/// `inputs`: `x`, the weight, the batch mean and inverse standard deviation, and the output
/// gradient.
fn batch_norm_training_backward(
    inputs: [FlexTensor; 5],
    activated: Option<(Activation, FlexTensor)>,
    needed: [bool; 3],
) -> [Option<FlexTensor>; 3] {
    let [x, weight, mean, inverse_std, grad] = inputs;
    let planes = Planes::of(&x.shape()).filter(|_| x.shape() == grad.shape());
    let contiguous = [&x, &weight, &mean, &inverse_std, &grad].map(contiguous_f32);
    let bias = activated.as_ref().map(|(_, bias)| contiguous_f32(bias));
    let (
        Some(planes),
        [
            Some(xs),
            Some(weight),
            Some(means),
            Some(inverse),
            Some(grads),
        ],
        None | Some(Some(_)),
    ) = (planes, contiguous, &bias)
    else {
        return match activated {
            None => composite::batch_norm_training_backward::<Flex>(
                x,
                weight,
                mean,
                inverse_std,
                grad,
                needed,
            ),
            Some((activation, bias)) => {
                let normalised = composite::normalise::<Flex>(
                    x.clone(),
                    weight.clone(),
                    bias,
                    mean.clone(),
                    inverse_std.clone(),
                );
                let grad = match activation {
                    Activation::Relu => Flex::relu_backward(normalised, grad),
                    Activation::HardSwish => Flex::hard_swish_backward(normalised, grad),
                };
                composite::batch_norm_training_backward::<Flex>(
                    x,
                    weight,
                    mean,
                    inverse_std,
                    grad,
                    needed,
                )
            }
        };
    };
    let activation = activated.map(|(activation, _)| activation);
    let bias = bias.flatten();
    let (xs, grads) = (values(&xs), values(&grads));
    let (weight, means, inverse) = (values(&weight), values(&means), values(&inverse));
    // The activation's input, `x·scale + shift`, exactly as the forward pass computed it.
    let (scale, shift) = match &bias {
        Some(bias) => scale_and_shift_of(weight, values(bias), means, inverse),
        None => (Vec::new(), Vec::new()),
    };
    // Per channel: Σ grad and Σ grad·(x − mean), `grad` being the gradient that reaches
    // BatchNorm's output; plane by plane in memory order, then added up image by image.
    let mut of_planes = vec![[0.0f64; 2]; planes.count];
    of_planes
        .par_iter_mut()
        .zip(
            grads
                .par_chunks(planes.plane)
                .zip(xs.par_chunks(planes.plane)),
        )
        .enumerate()
        .for_each(|(index, (plane_sums, (grad, x)))| {
            let channel = index % planes.channels;
            let slope = activation.map(|a| (a, scale[channel], shift[channel]));
            gradient_sums(grad, x, means[channel], slope, plane_sums);
        });
    let sums: Vec<[f64; 2]> = (0..planes.channels)
        .map(|channel| {
            let mut sums = [0.0; 2];
            for plane_sums in planes.of_channel(&of_planes, channel) {
                sums[0] += plane_sums[0];
                sums[1] += plane_sums[1];
            }
            sums
        })
        .collect();
    let x_grad = needed[0].then(|| {
        // weight·inverse_std · (grad − Σgrad/N − (x − mean)·inverse_std²·Σgrad·(x − mean)/N)
        let count = planes.per_channel() as f64;
        let terms: Vec<[f32; 3]> = (0..planes.channels)
            .map(|c| {
                let inverse = f64::from(inverse[c]);
                let a = f64::from(weight[c]) * inverse;
                let b = -a * inverse * inverse * sums[c][1] / count;
                let offset = -a * sums[c][0] / count - b * f64::from(means[c]);
                [a as f32, b as f32, offset as f32]
            })
            .collect();
        // SAFETY: `input_gradient` sets every value of the plane it is given (it asserts that
        // `grad` and `x` are as long).
        let x_grad = unsafe {
            written_by_planes(xs.len(), planes.plane, |index, out| {
                let at = index * planes.plane..(index + 1) * planes.plane;
                let channel = index % planes.channels;
                let slope = activation.map(|a| (a, scale[channel], shift[channel]));
                input_gradient(out, &grads[at.clone()], &xs[at], terms[channel], slope);
            })
        };
        tensor(x_grad, x.shape())
    });
    let vector = |values: Vec<f32>| tensor(values, Shape::new([planes.channels]));
    let weight_grad = needed[1].then(|| {
        vector(
            (0..planes.channels)
                .map(|c| (sums[c][1] * f64::from(inverse[c])) as f32)
                .collect(),
        )
    });
    let bias_grad = needed[2].then(|| vector(sums.iter().map(|s| s[0] as f32).collect()));
    [x_grad, weight_grad, bias_grad]
}

/// Per channel, BatchNorm's `scale = weight·inverse_std` and `shift = bias − mean·scale`, so
/// that its output is `x·scale + shift`: the same values forward and backward.
fn scale_and_shift_of(
    weight: &[f32],
    bias: &[f32],
    mean: &[f32],
    inverse_std: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = weight.iter().zip(inverse_std).map(|(w, i)| w * i).collect();
    let shift = bias
        .iter()
        .zip(mean.iter().zip(&scale))
        .map(|(b, (m, s))| b - m * s)
        .collect();
    (scale, shift)
}

impl FusedBackward for Flex {
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
        // burn-flex saves nothing else, and needs no ε: `inverse_std` already holds it.
        let _ = (saved, epsilon);
        let inputs = [x, weight, mean, inverse_std, grad];
        batch_norm_training_backward(inputs, None, needed)
    }

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
        let _ = (saved, epsilon);
        let inputs = [x, weight, mean, inverse_std, grad];
        batch_norm_training_backward(inputs, Some((activation, bias)), needed)
    }

    fn hard_swish_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        match (contiguous_f32(&x), contiguous_f32(&grad)) {
            (Some(xs), Some(grads)) if x.shape() == grad.shape() => {
                element_wise_gradient(&xs, &grads, hard_swish_gradient_into)
            }
            _ => composite::hard_swish_backward::<Self>(x, grad),
        }
    }

    fn hard_sigmoid_gate_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match (contiguous_f32(&x), contiguous_f32(&grad)) {
            (Some(xs), Some(grads)) if x.shape() == grad.shape() => {
                element_wise_gradient(&xs, &grads, hard_sigmoid_gradient_into)
            }
            _ => composite::hard_sigmoid_gate_backward::<Self>(x, grad),
        }
    }

    fn global_average_pool_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = x.shape();
        let pooled = shape.num_dims() == 4 && grad.shape().as_slice() == [shape[0], shape[1], 1, 1];
        let (Some(grads), true) = (contiguous_f32(&grad), pooled) else {
            return composite::global_average_pool_backward::<Self>(x, grad);
        };
        let area = shape[2] * shape[3];
        let mut x_grad = vec![0.0f32; shape.num_elements()];
        if area > 0 {
            x_grad
                .par_chunks_mut(area)
                .zip(values(&grads).par_iter())
                .for_each(|(plane, &g)| plane.fill(g / area as f32));
        }
        tensor(x_grad, shape)
    }

    fn max_pool_backward(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let pool = MaxPool::of(&x.shape(), kernel, stride, padding)
            .filter(|pool| grad.shape().as_slice() == pool.output_shape());
        match (pool, contiguous_f32(&x), contiguous_f32(&grad)) {
            (Some(pool), Some(xs), Some(grads)) => {
                tensor(pool.backward(values(&xs), values(&grads)), x.shape())
            }
            _ => composite::max_pool_backward::<Self>(x, kernel, stride, padding, grad),
        }
    }

    fn convolution_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
        needed: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        let all_f32 = [&x, &weight, &grad].iter().all(|t| t.dtype() == DType::F32);
        let direct = DirectConvolution::of(&x.shape(), &weight.shape(), &options)
            .filter(|direct| all_f32 && direct.output_shape()[..] == grad.shape()[..]);
        let Some(direct) = direct else {
            return composite::convolution_backward::<Self>(x, weight, bias, grad, options, needed);
        };
        let (x_shape, weight_shape) = (x.shape(), weight.shape());
        let (grads, weights) = (grad.to_contiguous(), weight.to_contiguous());
        let x_grad = needed[0].then(|| {
            let x_grad = direct.input_gradient(values(&grads), values(&weights));
            tensor(x_grad, x_shape)
        });
        let weight_grad = needed[1].then(|| {
            let xs = x.to_contiguous();
            tensor(
                direct.weight_gradient(values(&xs), values(&grads)),
                weight_shape,
            )
        });
        let bias_grad = match bias {
            Some(bias) if needed[2] => Some(
                <Self as burn::backend::ops::ModuleOps<Self>>::conv2d_bias_backward(x, bias, grad),
            ),
            _ => None,
        };
        [x_grad, weight_grad, bias_grad]
    }
}

/// A convolution of f32 data: depthwise and dense ones by Lanner's loops
/// ([`DirectConvolution`]), others (grouped, dilated) by burn-flex's `conv2d`.
fn convolution(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: ConvOptions<2>,
) -> FlexTensor {
    let direct = DirectConvolution::of(&x.shape(), &weight.shape(), &options);
    let biases = bias.as_ref().map(contiguous_f32);
    let (Some(direct), Some(xs), Some(weights), None | Some(Some(_))) =
        (direct, contiguous_f32(&x), contiguous_f32(&weight), &biases)
    else {
        return <Flex as burn::backend::ops::ModuleOps<Flex>>::conv2d(x, weight, bias, options);
    };
    let bias = biases.flatten();
    let out = direct.forward(values(&xs), values(&weights), bias.as_ref().map(values));
    tensor(out, Shape::from(direct.output_shape().to_vec()))
}

/// `t` as contiguous values (itself when already contiguous), when it holds f32.
fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

/// The values of a contiguous f32 tensor.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Contiguous `[batch, channels, …]` data as planes, the values of one image's channel.
#[derive(Clone, Copy, Debug)]
struct Planes {
    channels: usize,
    /// Values per plane.
    plane: usize,
    /// Planes in all.
    count: usize,
}

impl Planes {
    /// The planes of a tensor of `shape`; none for fewer than two dimensions or no values.
    fn of(shape: &Shape) -> Option<Self> {
        let dims = shape.as_slice();
        let (&[batch, channels], rest) = (dims.get(..2)?, &dims[2..]) else {
            return None;
        };
        let plane = rest.iter().product::<usize>();
        (batch * channels * plane > 0).then_some(Self {
            channels,
            plane,
            count: batch * channels,
        })
    }

    /// Values per channel, over the batch.
    fn per_channel(&self) -> usize {
        self.count / self.channels * self.plane
    }

    /// Of one value per plane (`[batch, channels]`), those of `channel`, image by image.
    fn of_channel<'a, T>(&self, per_plane: &'a [T], channel: usize) -> impl Iterator<Item = &'a T> {
        per_plane.iter().skip(channel).step_by(self.channels)
    }
}

/// The count, mean and sum of squared deviations from the mean of some values.
#[derive(Clone, Copy, Debug, Default)]
struct Moments {
    count: f64,
    mean: f64,
    squares: f64,
}

impl Moments {
    /// One plane's, from two passes over it (the second while it is in cache).
    fn of_plane(plane: &[f32]) -> Self {
        let (mut sum, mut squares) = (0.0, 0.0);
        plane_sum(plane, &mut sum);
        let count = plane.len() as f64;
        let mean = sum / count;
        squared_deviations(plane, mean as f32, &mut squares);
        // Deviations from the rounded mean overcount by count · (rounding)².
        let rounding = f64::from(mean as f32) - mean;
        let squares = (squares - count * rounding * rounding).max(0.0);
        Self {
            count,
            mean,
            squares,
        }
    }

    /// Both sets' together (Chan, Golub and LeVeque's pairwise update).
    fn merge(self, other: Self) -> Self {
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Self {
            count,
            mean: self.mean + delta * other.count / count,
            squares: self.squares
                + other.squares
                + delta * delta * self.count * other.count / count,
        }
    }
}

/// The convolutions that burn-flex runs with Lanner's own loops, forward and backward.
enum DirectConvolution {
    Depthwise(Depthwise),
    Dense(Dense),
}

impl DirectConvolution {
    fn of(x_shape: &[usize], weight_shape: &[usize], options: &ConvOptions<2>) -> Option<Self> {
        Depthwise::of(x_shape, weight_shape, options)
            .map(Self::Depthwise)
            .or_else(|| Dense::of(x_shape, weight_shape, options).map(Self::Dense))
    }

    fn output_shape(&self) -> [usize; 4] {
        match self {
            Self::Depthwise(depthwise) => depthwise.output_shape(),
            Self::Dense(dense) => dense.output_shape(),
        }
    }

    fn forward(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        match self {
            Self::Depthwise(depthwise) => depthwise.forward(x, weight, bias),
            Self::Dense(dense) => dense.forward(x, weight, bias),
        }
    }

    fn input_gradient(&self, grad: &[f32], weight: &[f32]) -> Vec<f32> {
        match self {
            Self::Depthwise(depthwise) => depthwise.input_gradient(grad, weight),
            Self::Dense(dense) => dense.input_gradient(grad, weight),
        }
    }

    fn weight_gradient(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        match self {
            Self::Depthwise(depthwise) => depthwise.weight_gradient(x, grad),
            Self::Dense(dense) => dense.weight_gradient(x, grad),
        }
    }
}

/// `kernel(out, x)` over `xs` in parallel chunks, into a new tensor of its shape.
fn element_wise(xs: &FlexTensor, kernel: fn(&mut [f32], &[f32])) -> FlexTensor {
    let x = values(xs);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(out, x)| kernel(out, x));
    tensor(out, xs.shape())
}

/// `kernel(out, x, grad)` over `xs` and `grads` (one shape) in parallel chunks.
fn element_wise_gradient(
    xs: &FlexTensor,
    grads: &FlexTensor,
    kernel: fn(&mut [f32], &[f32], &[f32]),
) -> FlexTensor {
    let (x, grad) = (values(xs), values(grads));
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
        .for_each(|(out, (x, grad))| kernel(out, x, grad));
    tensor(out, xs.shape())
}

dispatch!(plane_sum(values: &[f32], total: &mut f64) => plane_sum_generic);

/// `total = Σ values`, in [`LANES`] f32 partial sums added up in f64.
#[inline(always)]
fn plane_sum_generic<const FMA: bool>(values: &[f32], total: &mut f64) {
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().expect("LANES values");
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += *v;
        }
    }
    *total = lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + rest;
}

dispatch!(squared_deviations(values: &[f32], mean: f32, total: &mut f64) => squared_deviations_generic);

/// `total = Σ (value − mean)²`, as [`plane_sum_generic`].
#[inline(always)]
fn squared_deviations_generic<const FMA: bool>(values: &[f32], mean: f32, total: &mut f64) {
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v - mean).powi(2))
        .sum();
    for chunk in chunks {
        let chunk: &[f32; LANES] = chunk.try_into().expect("LANES values");
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            let deviation = *v - mean;
            *lane = fma::<FMA>(deviation, deviation, *lane);
        }
    }
    *total = lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + rest;
}

/// The slope of an activation at `x·scale + shift`: what turns the gradient of the activation's
/// output into that of BatchNorm's in [`gradient_sums`] and [`input_gradient`].
type Slope = Option<(Activation, f32, f32)>;

dispatch!(gradient_sums(grad: &[f32], x: &[f32], mean: f32, slope: Slope, sums: &mut [f64; 2]) => gradient_sums_generic);

/// `sums = [Σ g, Σ g·(x − mean)]` over one plane, as [`plane_sum_generic`]; `g` is `grad`,
/// or with a `slope`, the gradient reaching BatchNorm's output through the activation at
/// `x·scale + shift`.
#[inline(always)]
fn gradient_sums_generic<const FMA: bool>(
    grad: &[f32],
    x: &[f32],
    mean: f32,
    slope: Slope,
    sums: &mut [f64; 2],
) {
    *sums = match slope {
        None => gradient_sums_through::<FMA>(grad, x, mean, |g, _| g),
        Some((Activation::Relu, scale, shift)) => {
            gradient_sums_through::<FMA>(grad, x, mean, |g, x| {
                relu_gradient(fma::<FMA>(x, scale, shift), g)
            })
        }
        Some((Activation::HardSwish, scale, shift)) => {
            gradient_sums_through::<FMA>(grad, x, mean, |g, x| {
                hard_swish_gradient(fma::<FMA>(x, scale, shift), g)
            })
        }
    }
}

#[inline(always)]
fn gradient_sums_through<const FMA: bool>(
    grad: &[f32],
    x: &[f32],
    mean: f32,
    through: impl Fn(f32, f32) -> f32,
) -> [f64; 2] {
    let (mut plain, mut centred) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (grads, xs) = (grad.chunks_exact(LANES), x.chunks_exact(LANES));
    let mut rest = [0.0f64; 2];
    for (g, x) in grads.remainder().iter().zip(xs.remainder()) {
        let g = f64::from(through(*g, *x));
        rest[0] += g;
        rest[1] += g * f64::from(*x - mean);
    }
    for (g, x) in grads.zip(xs) {
        let g: &[f32; LANES] = g.try_into().expect("LANES values");
        let x: &[f32; LANES] = x.try_into().expect("LANES values");
        for lane in 0..LANES {
            let g = through(g[lane], x[lane]);
            plain[lane] += g;
            centred[lane] = fma::<FMA>(g, x[lane] - mean, centred[lane]);
        }
    }
    let total = |lanes: [f32; LANES]| lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
    [total(plain) + rest[0], total(centred) + rest[1]]
}

dispatch!(normalise(out: &mut [MaybeUninit<f32>], x: &[f32], scale: f32, shift: f32, activation: Option<Activation>) => normalise_generic);

/// `out = x · scale + shift`, then `activation` where there is one: every value of `out`.
#[inline(always)]
fn normalise_generic<const FMA: bool>(
    out: &mut [MaybeUninit<f32>],
    x: &[f32],
    scale: f32,
    shift: f32,
    activation: Option<Activation>,
) {
    assert_eq!(out.len(), x.len());
    let pairs = out.iter_mut().zip(x);
    match activation {
        None => pairs.for_each(|(out, x)| {
            out.write(fma::<FMA>(*x, scale, shift));
        }),
        Some(Activation::Relu) => pairs.for_each(|(out, x)| {
            out.write(relu(fma::<FMA>(*x, scale, shift)));
        }),
        Some(Activation::HardSwish) => pairs.for_each(|(out, x)| {
            out.write(hard_swish(fma::<FMA>(*x, scale, shift)));
        }),
    }
}

dispatch!(input_gradient(out: &mut [MaybeUninit<f32>], grad: &[f32], x: &[f32], terms: [f32; 3], slope: Slope) => input_gradient_generic);

/// `out = a·g + b·x + c` with `[a, b, c] = terms`, `g` as in [`gradient_sums_generic`]:
/// BatchNorm's input gradient over one plane, every value of `out`.
#[inline(always)]
fn input_gradient_generic<const FMA: bool>(
    out: &mut [MaybeUninit<f32>],
    grad: &[f32],
    x: &[f32],
    terms: [f32; 3],
    slope: Slope,
) {
    match slope {
        None => input_gradient_through::<FMA>(out, grad, x, terms, |g, _| g),
        Some((Activation::Relu, scale, shift)) => {
            input_gradient_through::<FMA>(out, grad, x, terms, |g, x| {
                relu_gradient(fma::<FMA>(x, scale, shift), g)
            })
        }
        Some((Activation::HardSwish, scale, shift)) => {
            input_gradient_through::<FMA>(out, grad, x, terms, |g, x| {
                hard_swish_gradient(fma::<FMA>(x, scale, shift), g)
            })
        }
    }
}

#[inline(always)]
fn input_gradient_through<const FMA: bool>(
    out: &mut [MaybeUninit<f32>],
    grad: &[f32],
    x: &[f32],
    [a, b, c]: [f32; 3],
    through: impl Fn(f32, f32) -> f32,
) {
    assert!(out.len() == grad.len() && out.len() == x.len());
    for (out, (g, x)) in out.iter_mut().zip(grad.iter().zip(x)) {
        out.write(fma::<FMA>(a, through(*g, *x), fma::<FMA>(b, *x, c)));
    }
}

dispatch!(hard_swish_into(out: &mut [f32], x: &[f32]) => hard_swish_generic);

/// `out = x · clamp(x / 6 + 1/2, 0, 1)`, as [`composite::hard_swish`] computes it.
#[inline(always)]
fn hard_swish_generic<const FMA: bool>(out: &mut [f32], x: &[f32]) {
    for (out, x) in out.iter_mut().zip(x) {
        *out = hard_swish(*x);
    }
}

dispatch!(hard_sigmoid_into(out: &mut [f32], x: &[f32]) => hard_sigmoid_generic);

/// `out = clamp(x / 6 + 1/2, 0, 1)`.
#[inline(always)]
fn hard_sigmoid_generic<const FMA: bool>(out: &mut [f32], x: &[f32]) {
    for (out, x) in out.iter_mut().zip(x) {
        *out = (*x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0);
    }
}

dispatch!(hard_swish_gradient_into(out: &mut [f32], x: &[f32], grad: &[f32]) => hard_swish_gradient_generic);

/// `out = grad · slope(x)`: 0 below −3, 1 above 3, `x/3 + 1/2` between (PyTorch's
/// `hardswish_backward`).
#[inline(always)]
fn hard_swish_gradient_generic<const FMA: bool>(out: &mut [f32], x: &[f32], grad: &[f32]) {
    for (out, (x, g)) in out.iter_mut().zip(x.iter().zip(grad)) {
        *out = hard_swish_gradient(*x, *g);
    }
}

/// `x · clamp(x / 6 + 1/2, 0, 1)`, as [`composite::hard_swish`] computes it.
#[inline(always)]
fn hard_swish(x: f32) -> f32 {
    x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0)
}

/// `grad` times hard swish's slope at `x`: 0 below −3, 1 above 3, `x/3 + 1/2` between
/// (PyTorch's `hardswish_backward`).
#[inline(always)]
fn hard_swish_gradient(x: f32, grad: f32) -> f32 {
    let slope = if x < -3.0 {
        0.0
    } else if x > 3.0 {
        1.0
    } else {
        x * (1.0 / 3.0) + 0.5
    };
    grad * slope
}

/// `max(0, x)`, NaN kept (as burn-flex's `relu`).
#[inline(always)]
fn relu(x: f32) -> f32 {
    if x.is_nan() || x > 0.0 { x } else { 0.0 }
}

/// `grad` where ReLU's input `x` is above 0 (or NaN, as burn-flex's `relu_backward` keeps it),
/// else 0.
#[inline(always)]
fn relu_gradient(x: f32, grad: f32) -> f32 {
    if x.is_nan() || x > 0.0 { grad } else { 0.0 }
}

dispatch!(hard_sigmoid_gradient_into(out: &mut [f32], x: &[f32], grad: &[f32]) => hard_sigmoid_gradient_generic);

/// `out = grad / 6` strictly between −3 and 3, else 0 (PyTorch's `hardsigmoid_backward`).
#[inline(always)]
fn hard_sigmoid_gradient_generic<const FMA: bool>(out: &mut [f32], x: &[f32], grad: &[f32]) {
    for (out, (x, g)) in out.iter_mut().zip(x.iter().zip(grad)) {
        let inside = *x > -3.0 && *x < 3.0;
        *out = if inside { *g * (1.0 / 6.0) } else { 0.0 };
    }
}
