//! Lanner's patch (see LANNER.md): ATen kernels for operations that burn composes out of
//! several tensor operations and that burn's backend traits have no operation for, so that
//! Lanner's backend extension (`lanner_models::fused`) can run each as what PyTorch runs.

use crate::TchTensor;

unsafe extern "C" {
    // src/lanner_ops.cpp.
    fn lanner_batch_norm_backward(
        grad_output: *const torch_sys::C_tensor,
        input: *const torch_sys::C_tensor,
        weight: *const torch_sys::C_tensor,
        mean: *const torch_sys::C_tensor,
        spread: *const torch_sys::C_tensor,
        epsilon: f64,
        statistics: i64,
        needed: *const bool,
        out: *mut *mut torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_size: usize,
    ) -> bool;
    fn lanner_batch_norm_training(
        input: *const torch_sys::C_tensor,
        weight: *const torch_sys::C_tensor,
        bias: *const torch_sys::C_tensor,
        running_mean: *const torch_sys::C_tensor,
        running_var: *const torch_sys::C_tensor,
        momentum: f64,
        epsilon: f64,
        kernels: i64,
        out: *mut *mut torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_size: usize,
    ) -> bool;
    fn lanner_batch_norm_training_backward(
        grad_output: *const torch_sys::C_tensor,
        input: *const torch_sys::C_tensor,
        weight: *const torch_sys::C_tensor,
        mean: *const torch_sys::C_tensor,
        inverse_std: *const torch_sys::C_tensor,
        saved: *const torch_sys::C_tensor,
        epsilon: f64,
        needed: *const bool,
        out: *mut *mut torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_size: usize,
    ) -> bool;
}

/// Which statistics a batch normalisation normalised with, and so what the two statistics
/// passed to [`batch_norm_backward`] are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistics {
    /// Fixed ones (running statistics, PyTorch's eval mode): the mean and the variance.
    Fixed = 0,
    /// The batch's own, so the output depends on every row of the batch: the mean and the
    /// biased variance.
    Batch = 1,
}

/// The gradients of batch normalisation with respect to its input, weight and bias for the
/// output gradient `output_grad`, from ATen's `native_batch_norm_backward` (one kernel for the
/// input's, one reduction for the other two on a GPU). `mean` and `spread` are the statistics
/// `statistics` names. Only those that `needed` asks for are computed; the others are `None`.
pub fn batch_norm_backward(
    x: &TchTensor,
    weight: &TchTensor,
    mean: &TchTensor,
    spread: &TchTensor,
    epsilon: f64,
    output_grad: &TchTensor,
    statistics: Statistics,
    needed: [bool; 3],
) -> [Option<TchTensor>; 3] {
    let mut out = [std::ptr::null_mut(); 3];
    let mut error = [0u8; 512];
    // SAFETY: live tch tensors (pointers to at::Tensor), three flags, room for the three
    // results, and `error` with the size passed with it.
    let done = unsafe {
        lanner_batch_norm_backward(
            output_grad.tensor.as_ptr(),
            x.tensor.as_ptr(),
            weight.tensor.as_ptr(),
            mean.tensor.as_ptr(),
            spread.tensor.as_ptr(),
            epsilon,
            statistics as i64,
            needed.as_ptr(),
            out.as_mut_ptr(),
            error.as_mut_ptr().cast(),
            error.len(),
        )
    };
    if !done {
        panic!(
            "native_batch_norm_backward failed: {}",
            crate::ops::shim_error(&error)
        );
    }
    // SAFETY: each non-null pointer is a new at::Tensor that its TchTensor now owns (tch
    // frees it on drop).
    out.map(|tensor| {
        (!tensor.is_null()).then(|| TchTensor::new(unsafe { tch::Tensor::from_ptr(tensor) }))
    })
}

/// Which kernels [`batch_norm_training`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchNormKernels {
    /// Those PyTorch's `batch_norm` chooses (ATen's `_batch_norm_impl_index`): cuDNN's where
    /// PyTorch runs them, else ATen's own.
    PyTorchs = 0,
    /// ATen's own `native_batch_norm` and its backward, everywhere.
    Aten = 1,
}

/// Batch normalisation while training, as PyTorch's `BatchNorm2d` runs it in train mode:
/// `x` normalised with the batch's own statistics, and copies of the running statistics moved
/// toward them by `momentum` (the weight of the batch; the variance unbiased), by the
/// `kernels` chosen. The weight and bias are taken in the running statistics' type (float:
/// the mixed-precision case for bf16 and f16 inputs). Returns the output, the batch mean and
/// inverse standard deviation, the new running mean and variance, and what
/// [`batch_norm_training_backward`] needs besides (cuDNN's reserve space where cuDNN ran).
pub fn batch_norm_training(
    x: &TchTensor,
    weight: &TchTensor,
    bias: &TchTensor,
    running_mean: &TchTensor,
    running_var: &TchTensor,
    momentum: f64,
    epsilon: f64,
    kernels: BatchNormKernels,
) -> [TchTensor; 6] {
    let mut out = [std::ptr::null_mut(); 6];
    let mut error = [0u8; 512];
    // SAFETY: live tch tensors (pointers to at::Tensor), room for the six results, and
    // `error` with the size passed with it.
    let done = unsafe {
        lanner_batch_norm_training(
            x.tensor.as_ptr(),
            weight.tensor.as_ptr(),
            bias.tensor.as_ptr(),
            running_mean.tensor.as_ptr(),
            running_var.tensor.as_ptr(),
            momentum,
            epsilon,
            kernels as i64,
            out.as_mut_ptr(),
            error.as_mut_ptr().cast(),
            error.len(),
        )
    };
    if !done {
        panic!("batch_norm failed: {}", crate::ops::shim_error(&error));
    }
    // SAFETY: six new at::Tensor, each now owned by its TchTensor (tch frees it on drop).
    out.map(|tensor| TchTensor::new(unsafe { tch::Tensor::from_ptr(tensor) }))
}

/// The gradients of [`batch_norm_training`] with respect to its input, weight and bias for
/// the output gradient `output_grad`, by the kernels its forward pass ran, from the `mean`,
/// `inverse_std` and `saved` it returned and the same `epsilon`. Only those that `needed`
/// asks for are returned; the others are `None`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_training_backward(
    x: &TchTensor,
    weight: &TchTensor,
    mean: &TchTensor,
    inverse_std: &TchTensor,
    saved: &TchTensor,
    epsilon: f64,
    output_grad: &TchTensor,
    needed: [bool; 3],
) -> [Option<TchTensor>; 3] {
    let mut out = [std::ptr::null_mut(); 3];
    let mut error = [0u8; 512];
    // SAFETY: live tch tensors (pointers to at::Tensor), three flags, room for the three
    // results, and `error` with the size passed with it.
    let done = unsafe {
        lanner_batch_norm_training_backward(
            output_grad.tensor.as_ptr(),
            x.tensor.as_ptr(),
            weight.tensor.as_ptr(),
            mean.tensor.as_ptr(),
            inverse_std.tensor.as_ptr(),
            saved.tensor.as_ptr(),
            epsilon,
            needed.as_ptr(),
            out.as_mut_ptr(),
            error.as_mut_ptr().cast(),
            error.len(),
        )
    };
    if !done {
        panic!(
            "batch_norm backward failed: {}",
            crate::ops::shim_error(&error)
        );
    }
    // SAFETY: each non-null pointer is a new at::Tensor that its TchTensor now owns (tch
    // frees it on drop).
    out.map(|tensor| {
        (!tensor.is_null()).then(|| TchTensor::new(unsafe { tch::Tensor::from_ptr(tensor) }))
    })
}

/// The gradients of a 2-D convolution with respect to its input, weight and bias for the
/// output gradient `output_grad`, each only where `needed` says so, from one call of ATen's
/// `convolution_backward` (PyTorch's autograd makes the same call; cuDNN runs one kernel per
/// gradient). burn's autodiff asks for each gradient separately.
pub fn conv2d_backward(
    x: TchTensor,
    weight: &TchTensor,
    output_grad: &TchTensor,
    options: burn_backend::ops::ConvOptions<2>,
    needed: [bool; 3],
) -> [Option<TchTensor>; 3] {
    crate::ops::conv2d_gradients(x, weight, output_grad, options, needed)
}

/// MobileNetV3's hard swish, `x · relu6(x + 3) / 6`, as ATen's one-kernel `hardswish`.
pub fn hard_swish(x: &TchTensor) -> TchTensor {
    TchTensor::new(x.tensor.hardswish())
}

/// The gradient of [`hard_swish`] at `x` for the output gradient `output_grad`, as ATen's
/// one-kernel `hardswish_backward` (0 below −3, 1 above 3, `x/3 + 1/2` between).
pub fn hard_swish_backward(x: &TchTensor, output_grad: &TchTensor) -> TchTensor {
    TchTensor::new(x.tensor.hardswish_backward(&output_grad.tensor))
}

/// MobileNetV3's hard sigmoid, `relu6(x + 3) / 6`, as ATen's one-kernel `hardsigmoid`.
pub fn hard_sigmoid(x: &TchTensor) -> TchTensor {
    TchTensor::new(x.tensor.hardsigmoid())
}

/// The gradient of [`hard_sigmoid`] at `x` for the output gradient `output_grad`, as ATen's
/// one-kernel `hardsigmoid_backward` (1/6 strictly between −3 and 3, else 0).
pub fn hard_sigmoid_backward(x: &TchTensor, output_grad: &TchTensor) -> TchTensor {
    TchTensor::new(x.tensor.hardsigmoid_backward(&output_grad.tensor))
}
