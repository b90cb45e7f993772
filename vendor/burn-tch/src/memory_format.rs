//! Lanner's patch (see LANNER.md): the memory order of 4-D convolution inputs.
//!
//! burn-tch hands libtorch contiguous (NCHW) tensors. On NVIDIA GPUs, cuDNN's fastest bf16
//! and f16 convolutions read and write channels-last (NHWC) memory, and for NCHW input it
//! transposes around each convolution. With [`set_channels_last`] on, every 2-D convolution
//! (forward, input gradient, weight gradient) takes its input in channels-last order (still
//! NCHW-shaped: only the strides change, as PyTorch's `memory_format=torch.channels_last`
//! does). Convolutions return the order of their input and elementwise operations keep it,
//! so after the first convolution the network stays channels-last and the conversion is a
//! no-op. Results are the same up to float rounding.

use std::sync::atomic::{AtomicBool, Ordering};

static CHANNELS_LAST: AtomicBool = AtomicBool::new(false);

/// Whether 2-D convolutions take channels-last input from now on (default: no).
pub fn set_channels_last(on: bool) {
    CHANNELS_LAST.store(on, Ordering::Relaxed);
}

/// Whether [`set_channels_last`] is on.
pub fn channels_last() -> bool {
    CHANNELS_LAST.load(Ordering::Relaxed)
}

/// `tensor` as a convolution should read it: unchanged unless channels-last is on and it is a
/// 4-D tensor in another order, else a channels-last copy.
pub(crate) fn for_convolution(tensor: &tch::Tensor) -> tch::Tensor {
    if !channels_last() || tensor.dim() != 4 {
        return tensor.shallow_clone();
    }
    let nhwc = tensor.permute([0, 2, 3, 1]);
    if nhwc.is_contiguous() {
        return tensor.shallow_clone();
    }
    nhwc.contiguous().permute([0, 3, 1, 2])
}

