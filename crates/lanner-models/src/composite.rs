//! The fused layers as burn's own tensor operations: the default bodies of
//! [`crate::fused::FusedOps`] and [`crate::fused::FusedBackward`], which burn-cuda runs (its
//! kernel fusion merges them), and the fallback of backends whose kernels take only some types
//! (burn-flex's take f32: `crate::flex_layers`).

use burn::backend::{Backend, Scalar, Shape, TensorMetadata};
use burn::backend::{get_or_init_device_settings, tensor::FloatTensor};
use burn::tensor::ops::ConvOptions;

/// [`crate::fused::FusedOps::batch_norm_training`]: burn's `batch_norm_train` and the running
/// statistics' update as tensor operations.
#[allow(clippy::type_complexity)]
pub(crate) fn batch_norm_training<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    running_mean: FloatTensor<B>,
    running_var: FloatTensor<B>,
    epsilon: f64,
    momentum: f64,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) {
    let shape = x.shape();
    let count = (shape.num_elements() / shape[1]) as f64;
    let unbiased = if count > 1.0 {
        count / (count - 1.0)
    } else {
        1.0
    };
    let statistics_type = running_mean.dtype();
    let as_statistic = |t: FloatTensor<B>| {
        if t.dtype() == statistics_type {
            t
        } else {
            B::float_cast(t, statistics_type.into())
        }
    };
    let batch = B::batch_norm_train(x, weight, bias, epsilon);
    let inverse_std = B::float_recip(B::float_sqrt(B::float_add_scalar(
        batch.variance.clone(),
        scalar(epsilon),
    )));
    let keep = scalar(1.0 - momentum);
    let mean = B::float_add(
        B::float_mul_scalar(running_mean, keep),
        B::float_mul_scalar(as_statistic(batch.mean.clone()), scalar(momentum)),
    );
    let var = B::float_add(
        B::float_mul_scalar(running_var, keep),
        B::float_mul_scalar(as_statistic(batch.variance), scalar(momentum * unbiased)),
    );
    // Nothing else to save for the backward pass: the inverse standard deviation again.
    let saved = inverse_std.clone();
    (batch.output, batch.mean, inverse_std, mean, var, saved)
}

/// [`crate::fused::FusedOps::hard_swish`]: the product of `x` and its hard sigmoid.
pub(crate) fn hard_swish<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x.clone(), hard_sigmoid_gate::<B>(x))
}

/// [`crate::fused::FusedOps::hard_sigmoid_gate`]: a product, a sum and a clamp.
pub(crate) fn hard_sigmoid_gate<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_clamp(
        B::float_add_scalar(B::float_mul_scalar(x, scalar(1.0 / 6.0)), 0.5.into()),
        0.0.into(),
        1.0.into(),
    )
}

/// [`crate::fused::FusedOps::global_average_pool`]: two means.
pub(crate) fn global_average_pool<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mean_dim(B::float_mean_dim(x, 2), 3)
}

/// [`crate::fused::FusedBackward::frozen_batch_norm_backward`] as tensor operations.
pub(crate) fn frozen_batch_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    mean: FloatTensor<B>,
    variance: FloatTensor<B>,
    epsilon: f64,
    grad: FloatTensor<B>,
    needed: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let channels = Channels::of(&x.shape());
    let per_channel = |t| channels.broadcast::<B>(t);
    let sum_per_channel = |t| channels.sum::<B>(t);
    let inverse_std = B::float_recip(B::float_sqrt(B::float_add_scalar(
        variance,
        scalar(epsilon),
    )));
    let x_grad = needed[0].then(|| {
        let scale = B::float_mul(weight, inverse_std.clone());
        B::float_mul(grad.clone(), per_channel(scale))
    });
    let weight_grad = needed[1].then(|| {
        let centred = B::float_sub(x, per_channel(mean));
        let normalised = B::float_mul(centred, per_channel(inverse_std));
        sum_per_channel(B::float_mul(grad.clone(), normalised))
    });
    let bias_grad = needed[2].then(|| sum_per_channel(grad));
    [x_grad, weight_grad, bias_grad]
}

/// BatchNorm's output from its batch statistics, `(x − mean)·inverse_std·weight + bias` per
/// channel, for [`crate::fused::FusedBackward::batch_norm_training_activated_backward`].
pub(crate) fn normalise<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    mean: FloatTensor<B>,
    inverse_std: FloatTensor<B>,
) -> FloatTensor<B> {
    let channels = Channels::of(&x.shape());
    let per_channel = |t| channels.broadcast::<B>(t);
    let centred = B::float_sub(x, per_channel(mean));
    let scale = B::float_mul(weight, inverse_std);
    B::float_add(B::float_mul(centred, per_channel(scale)), per_channel(bias))
}

/// [`crate::fused::FusedBackward::batch_norm_training_backward`] as tensor operations.
pub(crate) fn batch_norm_training_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    mean: FloatTensor<B>,
    inverse_std: FloatTensor<B>,
    grad: FloatTensor<B>,
    needed: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let channels = Channels::of(&x.shape());
    let count = channels.count as f64;
    let per_channel = |t| channels.broadcast::<B>(t);
    let sum_per_channel = |t| channels.sum::<B>(t);
    let centred = B::float_sub(x, per_channel(mean));
    let normalised = B::float_mul(centred, per_channel(inverse_std.clone()));
    let bias_grad = sum_per_channel(grad.clone());
    let weight_grad = sum_per_channel(B::float_mul(grad.clone(), normalised.clone()));
    let x_grad = needed[0].then(|| {
        let scale = B::float_mul_scalar(B::float_mul(weight, inverse_std), scalar(1.0 / count));
        let inner = B::float_sub(
            B::float_sub(
                B::float_mul_scalar(grad, scalar(count)),
                per_channel(bias_grad.clone()),
            ),
            B::float_mul(normalised, per_channel(weight_grad.clone())),
        );
        B::float_mul(inner, per_channel(scale))
    });
    [
        x_grad,
        needed[1].then_some(weight_grad),
        needed[2].then_some(bias_grad),
    ]
}

/// [`crate::fused::FusedBackward::hard_swish_backward`]: comparisons, masks and a product.
pub(crate) fn hard_swish_backward<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let bools = get_or_init_device_settings::<B>(&x.device()).bool_dtype;
    let below = B::float_lower_elem(x.clone(), (-3.0).into(), bools);
    let above = B::float_greater_elem(x.clone(), 3.0.into(), bools);
    let slope = B::float_add_scalar(B::float_mul_scalar(x, scalar(1.0 / 3.0)), 0.5.into());
    let slope = B::float_mask_fill(slope, below, 0.0.into());
    let slope = B::float_mask_fill(slope, above, 1.0.into());
    B::float_mul(grad, slope)
}

/// [`crate::fused::FusedBackward::hard_sigmoid_gate_backward`]: comparisons, a mask and a product.
pub(crate) fn hard_sigmoid_gate_backward<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let bools = get_or_init_device_settings::<B>(&x.device()).bool_dtype;
    let outside = B::bool_or(
        B::float_lower_equal_elem(x.clone(), (-3.0).into(), bools),
        B::float_greater_equal_elem(x, 3.0.into(), bools),
    );
    let grad = B::float_mul_scalar(grad, scalar(1.0 / 6.0));
    B::float_mask_fill(grad, outside, 0.0.into())
}

/// [`crate::fused::FusedBackward::global_average_pool_backward`]: an expansion and a product.
pub(crate) fn global_average_pool_backward<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = x.shape();
    let area = (shape[2] * shape[3]) as f64;
    B::float_mul_scalar(B::float_expand(grad, shape), scalar(1.0 / area))
}

/// [`crate::fused::FusedBackward::max_pool_backward`]: the pooling again with the maxima's
/// indices, then burn's backward pass from them.
pub(crate) fn max_pool_backward<B: Backend>(
    x: FloatTensor<B>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let int_dtype = get_or_init_device_settings::<B>(&x.device()).int_dtype;
    let pooled =
        B::max_pool2d_with_indices(x.clone(), kernel, stride, padding, [1, 1], false, int_dtype);
    B::max_pool2d_with_indices_backward(
        x,
        kernel,
        stride,
        padding,
        [1, 1],
        false,
        grad,
        pooled.indices,
    )
    .x_grad
}

/// The channel dimension (1) of `[batch, channels, …]` tensors of one shape, for the
/// per-channel parameters of a composite BatchNorm backward.
struct Channels {
    /// `[1, channels, 1, …]`.
    broadcast: Shape,
    /// Every dimension but the channels'.
    reduced: Vec<usize>,
    /// `[channels]`.
    vector: Shape,
    /// Values per channel.
    count: usize,
}

impl Channels {
    fn of(shape: &Shape) -> Self {
        let channels = shape[1];
        let mut broadcast = vec![1; shape.num_dims()];
        broadcast[1] = channels;
        Self {
            broadcast: Shape::from(broadcast),
            reduced: (0..shape.num_dims()).filter(|&d| d != 1).collect(),
            vector: Shape::new([channels]),
            count: shape.num_elements() / channels,
        }
    }

    /// A `[channels]` tensor shaped to broadcast against the full one.
    fn broadcast<B: Backend>(&self, t: FloatTensor<B>) -> FloatTensor<B> {
        B::float_reshape(t, self.broadcast.clone())
    }

    /// The sum of a full tensor over everything but the channels, as `[channels]`.
    fn sum<B: Backend>(&self, t: FloatTensor<B>) -> FloatTensor<B> {
        let summed = self.reduced.iter().fold(t, |t, &d| B::float_sum_dim(t, d));
        B::float_reshape(summed, self.vector.clone())
    }
}

fn scalar(value: f64) -> Scalar {
    value.into()
}

/// [`crate::fused::FusedBackward::convolution_backward`]: burn's three gradient operations.
pub(crate) fn convolution_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    grad: FloatTensor<B>,
    options: ConvOptions<2>,
    needed: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let x_grad = needed[0]
        .then(|| B::conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), options.clone()));
    let weight_grad =
        needed[1].then(|| B::conv2d_weight_backward(x.clone(), weight, grad.clone(), options));
    let bias_grad = match bias {
        Some(bias) if needed[2] => Some(B::conv2d_bias_backward(x, bias, grad)),
        _ => None,
    };
    [x_grad, weight_grad, bias_grad]
}
