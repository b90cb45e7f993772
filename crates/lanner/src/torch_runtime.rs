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
    forbid_tf32()
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
