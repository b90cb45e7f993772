//! What the `cuda` build needs at run time, found before burn-cuda looks for it, so that a
//! missing piece is one clear sentence instead of a panic deep inside the first kernel launch:
//!
//! - the NVIDIA driver (`/proc/driver/nvidia/version`) and its library `libcuda.so.1`;
//! - NVRTC (`libnvrtc.so.*`), which compiles burn's kernels at run time;
//! - the CUDA headers NVRTC includes (`$CUDA_PATH/include`, default `/usr/local/cuda`).
//!
//! A library that is installed but not on the loader's search path (the CUDA toolkit's
//! `targets/x86_64-linux/lib`, or `/usr/local/nvidia/lib64` in NVIDIA's containers) is loaded
//! here by its full path; the loader then hands that same library to burn-cuda, which asks for
//! it by name.
//!
//! It also points CubeCL's kernel cache at a folder that outlives the process
//! ([`kernel_cache_dir`]): compiled kernels and autotune results are kept there, so only the
//! first run on a machine (or in a container image that does not carry the folder) pays for
//! compiling them.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Where compiled kernels and autotune results are kept: `$LANNER_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/lanner/kernels`, else `~/.cache/lanner/kernels`.
pub fn kernel_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LANNER_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("lanner").join("kernels")
}

/// Check the driver, NVRTC and the headers, and set up the kernel cache. `Err` says, in one
/// sentence, what is missing and how to provide it.
pub fn prepare() -> Result<(), String> {
    if !Path::new("/proc/driver/nvidia/version").exists() {
        return Err(
            "no NVIDIA driver is loaded on this machine (/proc/driver/nvidia/version \
                    is missing)"
                .into(),
        );
    }
    load_library(
        &["libcuda.so.1", "libcuda.so"],
        &driver_dirs(),
        "the NVIDIA driver library libcuda.so.1 was not found; add its folder to \
         LD_LIBRARY_PATH",
    )?;
    let cuda = cuda_path();
    load_library(
        &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
        &toolkit_library_dirs(cuda.as_deref()),
        "NVRTC (libnvrtc.so), which compiles Lanner's GPU kernels, was not found; install the \
         CUDA toolkit's NVRTC and set CUDA_PATH to the toolkit folder or add its lib folder to \
         LD_LIBRARY_PATH",
    )?;
    match &cuda {
        Some(root) if root.join("include").join("cuda_fp16.h").exists() => {}
        _ => {
            return Err(format!(
                "the CUDA headers NVRTC needs (include/cuda_fp16.h) are not in {}; set CUDA_PATH \
                 to the CUDA toolkit folder",
                cuda.as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "/usr/local/cuda (CUDA_PATH is not set)".into())
            ));
        }
    }
    configure_kernel_cache();
    Ok(())
}

/// How many GPUs the driver shows this process (after `CUDA_VISIBLE_DEVICES`). Call after
/// [`prepare`], which loads the driver library.
pub fn device_count() -> Result<usize, String> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    let symbol = |name: &str| {
        let name = CString::new(name).expect("no NUL in a symbol name");
        // SAFETY: dlsym with a valid C string over the libraries loaded with RTLD_GLOBAL.
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
    };
    let (init, get_count) = (symbol("cuInit"), symbol("cuDeviceGetCount"));
    if init.is_null() || get_count.is_null() {
        return Err("the NVIDIA driver library does not export cuInit and cuDeviceGetCount".into());
    }
    // SAFETY: both symbols come from libcuda, with these C signatures (CUDA driver API).
    let (init, get_count) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, CuInit>(init),
            std::mem::transmute::<*mut libc::c_void, CuDeviceGetCount>(get_count),
        )
    };
    let mut count = 0i32;
    // SAFETY: cuInit takes flags 0; cuDeviceGetCount writes one int.
    let status = unsafe { init(0) };
    if status != 0 {
        return Err(format!(
            "the NVIDIA driver did not start (cuInit returned {status})"
        ));
    }
    let status = unsafe { get_count(&mut count) };
    if status != 0 {
        return Err(format!(
            "the NVIDIA driver cannot count its GPUs (error {status})"
        ));
    }
    Ok(count.max(0) as usize)
}

/// The CUDA toolkit folder as cubecl-cuda finds it: `$CUDA_PATH`, else `/usr/local/cuda`.
fn cuda_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CUDA_PATH") {
        return Some(PathBuf::from(path));
    }
    ["/usr/local/cuda", "/opt/cuda"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn driver_dirs() -> Vec<PathBuf> {
    [
        "/usr/local/nvidia/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
    ]
    .iter()
    .map(PathBuf::from)
    .collect()
}

fn toolkit_library_dirs(cuda: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(root) = cuda {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("targets/x86_64-linux/lib"));
    }
    for root in [
        "/usr/local/cuda",
        "/usr/local/cuda-13.0",
        "/usr/local/cuda-12",
    ] {
        dirs.push(Path::new(root).join("targets/x86_64-linux/lib"));
        dirs.push(Path::new(root).join("lib64"));
    }
    dirs
}

/// Load the first of `names` the loader finds by name, or else from one of `dirs`, and keep it
/// loaded for the process's lifetime.
fn load_library(names: &[&str], dirs: &[PathBuf], missing: &str) -> Result<(), String> {
    let by_name = names.iter().map(|name| name.to_string());
    let by_path = dirs.iter().flat_map(|dir| {
        names
            .iter()
            .map(move |name| dir.join(name))
            .filter(|path| path.exists())
            .map(|path| path.display().to_string())
    });
    for candidate in by_name.chain(by_path) {
        let Ok(c_name) = CString::new(candidate) else {
            continue;
        };
        // SAFETY: dlopen with a valid C string; the handle is deliberately never closed, so
        // the library stays loaded for burn-cuda, which opens it again by name.
        let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            return Ok(());
        }
    }
    Err(missing.to_string())
}

/// Keep compiled kernels and autotune results in [`kernel_cache_dir`]. CubeCL reads its
/// configuration once; `cubecl.toml` and the `CUBECL_*` variables still apply on top of this.
fn configure_kernel_cache() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};

    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.compilation.cache = true;
    let dir = kernel_cache_dir();
    if std::fs::create_dir_all(&dir).is_ok() {
        config.environment.path = CacheConfig::Directory(dir);
    }
    // Set once per process; a second device in the same process keeps the first setting.
    let _ = CubeClRuntimeConfig::try_set(config);
}
