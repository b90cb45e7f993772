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
