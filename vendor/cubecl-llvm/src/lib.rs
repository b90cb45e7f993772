//! The types of cubecl-llvm 0.11.3 that cubecl-cuda names, without LLVM. With cubecl-cuda's
//! `cpp` feature (which Lanner always enables) the LLVM backend is never selected, so nothing
//! here is ever asked to compile a kernel; if it were, it would produce nothing
//! ([`PlironArtifact::Unavailable`]) and cubecl-cuda would stop with its own message.

use cubecl_core::ir::nvidia::SmArch;
use cubecl_core::prelude::KernelDefinition;
use cubecl_server::compiler::CompilationError;
use cubecl_server::kernel::BufferIOAttr;

pub mod nvptx {
    pub mod ptx_version {
        /// A PTX ISA version; the LLVM backend would emit the newest the driver loads.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct PtxVersion {
            pub major: u32,
            pub minor: u32,
        }

        impl PtxVersion {
            /// No PTX is emitted without LLVM, so no version is chosen.
            pub fn for_driver(_driver_version: i32) -> Option<Self> {
                None
            }
        }

        impl core::fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{}.{}", self.major, self.minor)
            }
        }
    }
}

pub mod shared {
    pub mod lowered_features {
        /// The GPU family the LLVM backend would target.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            Nvptx,
            Amdgpu,
        }

        /// Only called when the LLVM backend is selected, which it never is here.
        pub fn restrict_features<T>(_properties: &mut T, _target: GpuTarget) {}
    }
}

/// Which LLVM target a [`PlironCompiler`] emits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlvmTarget {
    Nvptx,
    Amdgpu,
}

/// The LLVM-backed kernel compiler, absent from this build.
#[derive(Clone, Debug)]
pub struct PlironCompiler {
    pub target: LlvmTarget,
}

/// Options of a [`PlironCompiler`] run.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    pub arch: Option<String>,
    pub sm_arch: Option<SmArch>,
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    pub grid_constants: bool,
}

/// A compiled PTX module.
#[derive(Debug)]
pub struct NvptxModule {
    /// NUL-terminated PTX text, as the CUDA driver loads it.
    pub ptx: Vec<std::ffi::c_char>,
    pub ir: String,
    pub shared_memory_size: usize,
    pub io: Vec<BufferIOAttr>,
}

/// What a [`PlironCompiler`] produces.
pub enum PlironArtifact {
    NvptxCode(NvptxModule),
    /// This build has no LLVM: nothing was produced.
    Unavailable,
}

impl PlironCompiler {
    /// The language tag cubecl records for kernels of this backend.
    pub fn lang_tag(&self) -> &'static str {
        "llvm"
    }

    /// Never called with cubecl-cuda's `cpp` feature; produces nothing if it is.
    pub fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Ok(PlironArtifact::Unavailable)
    }
}
