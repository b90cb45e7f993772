//! Lanner's patch (see LANNER.md): host-to-GPU copies on a stream of their own, so that the
//! next batch's copy runs while the GPU still computes the step before it (PyTorch's
//! `DataLoader(pin_memory=True)` with a side-stream prefetcher, as NVIDIA's examples do).

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Copy to GPUs on a stream of their own (the default), or on the current stream after the
/// work queued there (`false`: to measure what the overlap gains).
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

unsafe extern "C" {
    // src/lanner_ops.cpp.
    fn lanner_copy_to_gpu(
        host: *const torch_sys::C_tensor,
        device_index: i64,
        error: *mut std::ffi::c_char,
        error_size: usize,
    ) -> *mut torch_sys::C_tensor;
}

/// `host` (a tensor in pinned host memory) copied to GPU `index` without blocking, on this
/// thread's copy stream for that GPU; the stream that is current waits for the copy before
/// running anything queued on it afterwards. With [`set_enabled`]`(false)`, on the current
/// stream.
pub(crate) fn copy_to_gpu(host: &tch::Tensor, index: usize) -> tch::Tensor {
    if !ENABLED.load(Ordering::Relaxed) {
        let device = tch::Device::Cuda(index);
        return host.to_device_(device, host.kind(), true, false);
    }
    let mut error = [0u8; 512];
    // SAFETY: a live tch tensor (a pointer to at::Tensor) and `error` with its size.
    let copy = unsafe {
        lanner_copy_to_gpu(
            host.as_ptr(),
            index as i64,
            error.as_mut_ptr().cast(),
            error.len(),
        )
    };
    if copy.is_null() {
        // The copy stream is an optimisation: say once why it is off, and copy as before.
        static WARNED: std::sync::Once = std::sync::Once::new();
        let reason = crate::ops::shim_error(&error);
        WARNED.call_once(|| {
            eprintln!(
                "warning: copies to GPU {index} run on the compute stream, as a stream of \
                 their own failed: {reason}"
            )
        });
        set_enabled(false);
        return copy_to_gpu(host, index);
    }
    // SAFETY: a new at::Tensor that the returned tch tensor owns (and frees on drop).
    unsafe { tch::Tensor::from_ptr(copy) }
}
