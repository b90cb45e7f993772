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
        variance: *const torch_sys::C_tensor,
        epsilon: f64,
        training: bool,
        needed: *const bool,
        out: *mut *mut torch_sys::C_tensor,
        error: *mut std::ffi::c_char,
        error_size: usize,
    ) -> bool;
}

/// Which statistics a batch normalisation normalised with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistics {
    /// The batch's own (biased variance), so the output depends on every row of the batch.
    Batch,
    /// Fixed ones (running statistics, PyTorch's eval mode).
    Fixed,
}

/// The gradients of batch normalisation with respect to its input, weight and bias for the
/// output gradient `output_grad`, from ATen's `native_batch_norm_backward` (one kernel for the
/// input's, one reduction for the other two on a GPU). Only those that `needed` asks for are
/// computed; the others are `None`.
pub fn batch_norm_backward(
    x: &TchTensor,
    weight: &TchTensor,
    mean: &TchTensor,
    variance: &TchTensor,
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
            variance.tensor.as_ptr(),
            epsilon,
            statistics == Statistics::Batch,
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
