//! What the `torch` build needs at run time to reach a GPU, checked before burn-tch first
//! touches CUDA, so that a missing piece is one clear sentence instead of a panic:
//!
//! - the NVIDIA driver (`/proc/driver/nvidia/version`);
//! - PyTorch's CUDA library, `libtorch_cuda.so`. The binary links libtorch's CPU libraries
//!   (`libtorch_cpu.so`, `libc10.so`, found through `LD_LIBRARY_PATH`), but the linker drops
//!   `libtorch_cuda.so` because no symbol of it is named; CUDA is only registered with libtorch
//!   once that library is loaded. It is loaded here: by name, else from the folder
//!   `libtorch_cpu.so` was loaded from (a pip-installed PyTorch's `torch/lib`, whose own
//!   search path finds the `nvidia-*` packages' cuDNN and cuBLAS);
//! - a GPU that those libraries can use (`torch::cuda::is_available()`).
//!
//! Two of libtorch's global switches are set as the PyTorch baseline in `bench/gpu_torch.py`
//! sets them: cuDNN's autotuner on (`torch.backends.cudnn.benchmark`: the first step of each
//! shape tries cuDNN's algorithms, later steps use the fastest), and TF32 off for convolutions
//! and matrix products (`allow_tf32`), so that `--precision f32` computes in f32 as it does on
//! the CPU; bf16 and f16 are what `--precision` is for.

use std::ffi::{CStr, CString};

use lanner_models::precision::Precision;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Load PyTorch's CUDA support and check that it sees a GPU (once per process). `Err` says,
/// in one sentence, what is missing and how to provide it.
pub fn prepare_cuda() -> Result<(), String> {
    static PREPARED: OnceLock<Result<(), String>> = OnceLock::new();
    PREPARED.get_or_init(load_cuda).clone()
}

/// How many GPUs libtorch sees (after `CUDA_VISIBLE_DEVICES`).
pub fn gpu_count() -> usize {
    tch::Cuda::device_count().max(0) as usize
}

fn load_cuda() -> Result<(), String> {
    if !Path::new("/proc/driver/nvidia/version").exists() {
        return Err(
            "no NVIDIA driver is loaded on this machine (/proc/driver/nvidia/version is missing)"
                .into(),
        );
    }
    let by_name = open_global("libtorch_cuda.so");
    if let Err(first_error) = by_name {
        let beside_cpu = libtorch_folder().map(|dir| dir.join("libtorch_cuda.so"));
        match beside_cpu {
            Some(path) if path.exists() => {
                open_global(&path.to_string_lossy()).map_err(|error| {
                    format!(
                        "PyTorch's CUDA library {} did not load ({error})",
                        path.display()
                    )
                })?
            }
            _ => {
                return Err(format!(
                    "PyTorch's CUDA library libtorch_cuda.so was not found next to the \
                     libtorch this binary runs with ({first_error}); point LD_LIBRARY_PATH at \
                     the torch/lib folder of a CUDA build of PyTorch"
                ));
            }
        }
    }
    if !tch::Cuda::is_available() {
        return Err(
            "PyTorch's CUDA libraries loaded but see no usable GPU (torch::cuda::is_available() \
             is false): the driver may be older than the CUDA version PyTorch was built for"
                .into(),
        );
    }
    tch::Cuda::cudnn_set_benchmark(true);
    forbid_tf32()?;
    report_synchronisations()
}

/// `LANNER_CUDA_SYNC_DEBUG=warn` (or `error`): libtorch warns about (or refuses) every
/// operation that makes the host wait for the GPU, as `torch.cuda.set_sync_debug_mode` does in
/// Python; a diagnostic for a training step that should queue its work without waiting. tch
/// does not wrap it: the mode is the one member (an `int`-sized enum: 0 disabled, 1 warn,
/// 2 error) of c10's `WarningState`, the static `c10::cuda::warning_state()` returns, which
/// libc10_cuda.so exports as a unique symbol.
fn report_synchronisations() -> Result<(), String> {
    let Ok(value) = std::env::var("LANNER_CUDA_SYNC_DEBUG") else {
        return Ok(());
    };
    let mode: i32 = match value.trim() {
        "" | "0" | "off" => return Ok(()),
        "warn" | "1" => 1,
        "error" | "2" => 2,
        _ => {
            return Err(format!(
                "LANNER_CUDA_SYNC_DEBUG={value} is not a mode; set it to warn or error, or unset it"
            ));
        }
    };
    let name = c"_ZZN3c104cuda13warning_stateEvE14warning_state_";
    // SAFETY: dlsym with a valid C string over the libraries this process has loaded.
    let state = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if state.is_null() {
        return Err(
            "LANNER_CUDA_SYNC_DEBUG needs c10's CUDA warning state, which the libtorch this \
             binary runs with does not export; unset it"
                .into(),
        );
    }
    // SAFETY: the symbol is `static c10::cuda::WarningState warning_state_`, whose only member
    // is `SyncDebugMode sync_debug_mode` (an enum class with int as its underlying type).
    unsafe { std::ptr::write_volatile(state.cast::<i32>(), mode) };
    Ok(())
}

/// Choose the memory order of convolution inputs (burn-tch's patch, vendor/burn-tch/src/
/// memory_format.rs) and return its name: `LANNER_MEMORY_FORMAT` (`channels-last` or `nchw`)
/// when set, else NCHW for f32 on a GPU (as `bench/gpu_torch.py` runs PyTorch's f32 rows) and
/// channels-last otherwise: for bf16 and f16 on a GPU, cuDNN's tensor-core kernels read and
/// write channels-last (PyTorch's mixed-precision recipe converts models to it), and on the
/// CPU oneDNN's convolutions are faster with it (MobileNetV3-Large, batch 32, 2 cores:
/// 1.5x frozen, 1.1x fine-tune, 1.5x full training, 1.4x inference).
#[allow(
    deprecated,
    reason = "burn 0.22 deprecates burn-tch, which the `torch` build is"
)]
pub fn set_memory_format(on_gpu: bool, precision: Precision) -> Result<&'static str, String> {
    let channels_last = match std::env::var("LANNER_MEMORY_FORMAT") {
        Ok(value) => match value.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "channels-last" | "nhwc" => true,
            "nchw" | "contiguous" => false,
            _ => {
                return Err(format!(
                    "LANNER_MEMORY_FORMAT={value} is not a memory format; set it to \
                     channels-last or nchw, or unset it"
                ));
            }
        },
        Err(_) => !(on_gpu && precision.is_f32()),
    };
    burn_tch::memory_format::set_channels_last(channels_last);
    Ok(if channels_last {
        "channels-last"
    } else {
        "nchw"
    })
}

/// `at::globalContext().setAllowTF32CuDNN(false)` and `…CuBLAS(false)`, which tch does not
/// wrap: the two member functions are called through their exported (Itanium-mangled) symbols,
/// `this` first, as the C++ ABI passes it.
fn forbid_tf32() -> Result<(), String> {
    type GlobalContext = unsafe extern "C" fn() -> *mut libc::c_void;
    type SetFlag = unsafe extern "C" fn(*mut libc::c_void, bool);
    let symbol = |name: &str| {
        let c_name = CString::new(name).expect("no NUL in a symbol name");
        // SAFETY: dlsym with a valid C string over the libraries this process has loaded.
        let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c_name.as_ptr()) };
        if found.is_null() {
            Err(format!(
                "the libtorch this binary runs with has no {name}, which Lanner calls to keep \
                 f32 convolutions in f32; run it with the PyTorch version it was built against"
            ))
        } else {
            Ok(found)
        }
    };
    let context = symbol("_ZN2at13globalContextEv")?;
    let setters = [
        symbol("_ZN2at7Context17setAllowTF32CuDNNEb")?,
        symbol("_ZN2at7Context18setAllowTF32CuBLASEb")?,
    ];
    // SAFETY: the symbols are `at::Context& at::globalContext()` and two
    // `void at::Context::set…(bool)` members; on x86-64 the member's `this` is its first
    // argument, in the C calling convention.
    unsafe {
        let context = std::mem::transmute::<*mut libc::c_void, GlobalContext>(context)();
        for setter in setters {
            std::mem::transmute::<*mut libc::c_void, SetFlag>(setter)(context, false);
        }
    }
    Ok(())
}

/// `dlopen` with `RTLD_NOW | RTLD_GLOBAL`; `Err` is the loader's message.
fn open_global(name: &str) -> Result<(), String> {
    let c_name = CString::new(name).map_err(|_| format!("{name} has a NUL byte"))?;
    // SAFETY: dlopen with a valid C string; the handle is kept open for the process' life.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a C string valid until the next dl* call.
        let message = unsafe { libc::dlerror() };
        return Err(if message.is_null() {
            format!("{name} did not load")
        } else {
            unsafe { CStr::from_ptr(message) }
                .to_string_lossy()
                .into_owned()
        });
    }
    Ok(())
}

/// The folder this process loaded `libtorch_cpu.so` from, read from `/proc/self/maps`.
fn libtorch_folder() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent().map(Path::to_path_buf))
}

#[cfg(test)]
#[allow(
    deprecated,
    reason = "burn 0.22 deprecates burn-tch, which the `torch` build is"
)]
mod tests {
    use burn::tensor::module::{batch_norm_train, conv2d};
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;

    /// Three convolutions as the backbones have them (depthwise, then BatchNorm with the
    /// batch's statistics; strided with asymmetric padding, as Keras' "same" pads; pointwise),
    /// forward and backward on `device`: the output, the batch statistics, and the gradients
    /// of BatchNorm's weight and bias, of the input and of each convolution's weight.
    fn convolutions(device: &Device) -> Vec<Vec<f32>> {
        let device = device.clone().autodiff();
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed) % 97) as f32 - 48.0) / 50.0)
                .collect()
        };
        let tensor = |shape: [usize; 4], seed: usize| {
            let n = shape.iter().product();
            Tensor::<4>::from_data(TensorData::new(values(n, seed), shape), &device).require_grad()
        };
        let x = tensor([2, 4, 10, 10], 1);
        let depthwise = tensor([4, 1, 3, 3], 2);
        let strided = tensor([6, 4, 3, 3], 3);
        let pointwise = tensor([5, 6, 1, 1], 4);
        let hidden = conv2d(
            x.clone(),
            depthwise.clone(),
            None,
            ConvOptions::new([1, 1], [1, 1], [1, 1], 4),
        );
        // BatchNorm with the batch's statistics, as `--from-scratch` trains it.
        let gamma =
            Tensor::<1>::from_data(TensorData::new(values(4, 5), [4]), &device).require_grad();
        let beta =
            Tensor::<1>::from_data(TensorData::new(values(4, 6), [4]), &device).require_grad();
        let normalized = batch_norm_train(hidden, gamma.clone(), beta.clone(), 1e-3);
        let hidden = normalized.output;
        let hidden = conv2d(
            hidden,
            strided.clone(),
            None,
            ConvOptions::new_with_padding([2, 2], [(1, 2), (2, 1)], [1, 1], 1),
        );
        let output = conv2d(
            hidden,
            pointwise.clone(),
            None,
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
        );
        let gradients = (output.clone() * output.clone()).sum().backward();
        let read = |t: Tensor<4>| t.into_data().to_vec::<f32>().unwrap();
        let read_1 = |t: Tensor<1>| t.into_data().to_vec::<f32>().unwrap();
        let mut results = vec![
            read(output.inner()),
            read_1(normalized.mean.inner()),
            read_1(normalized.variance.inner()),
            read_1(gamma.grad(&gradients).unwrap()),
            read_1(beta.grad(&gradients).unwrap()),
        ];
        for input in [x, depthwise, strided, pointwise] {
            results.push(read(input.grad(&gradients).unwrap()));
        }
        results
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
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
    fn libtorch_convolutions_and_batch_norm_match_burn_flex_in_both_memory_orders() {
        let want = convolutions(&Device::flex());
        // SAFETY of the global switch: this is the only test of this binary that sets it.
        unsafe { std::env::remove_var("LANNER_MEMORY_FORMAT") };
        assert_eq!(
            set_memory_format(false, Precision::F32),
            Ok("channels-last")
        );
        assert_close(&convolutions(&Device::libtorch()), &want, "channels-last");
        assert_eq!(set_memory_format(true, Precision::F32), Ok("nchw"));
        assert_close(&convolutions(&Device::libtorch()), &want, "nchw");
        assert_eq!(
            set_memory_format(true, Precision::Bf16),
            Ok("channels-last")
        );
        burn_tch::memory_format::set_channels_last(false);
    }

    #[test]
    fn hard_activations_match_burn_flex() {
        let run = |device: &Device| {
            let values: Vec<f32> = (0..80).map(|i| i as f32 / 8.0 - 5.0).collect();
            let x = Tensor::<1>::from_data(TensorData::new(values, [80]), device);
            [
                burn::tensor::activation::hard_sigmoid(x.clone(), 1.0 / 6.0, 0.5),
                burn::tensor::activation::hard_sigmoid(x.clone(), 0.2, 0.5),
                burn::tensor::activation::hard_swish(x),
            ]
            .map(|t| t.into_data().to_vec::<f32>().unwrap())
        };
        let want = run(&Device::flex());
        for (got, want) in run(&Device::libtorch()).iter().zip(&want) {
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
            }
        }
    }
}
