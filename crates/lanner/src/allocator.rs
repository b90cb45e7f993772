//! The process's memory allocator: mimalloc, told to keep the memory it frees for reuse.
//!
//! A training step on the CPU allocates and frees tensors of tens of megabytes (activations
//! and their gradients) hundreds of times. glibc's malloc maps each one above 32 MB afresh
//! and unmaps it when freed, and mimalloc by default hands freed pages back after a delay (1 s), so
//! every step paid the kernel for page faults, zeroing fresh pages and TLB shootdowns: about
//! 40% of a from-scratch MobileNetV3-Large step on 2 cores. Keeping freed memory (mimalloc's
//! `purge_delay` of -1), as TensorFlow's BFC allocator does, made that step 1.8x faster for
//! 19% more peak memory (bench/RESULTS.md). `MIMALLOC_PURGE_DELAY` in the environment still
//! overrides it (in milliseconds; 0 hands memory back at once).

use libmimalloc_sys::{mi_option_set_default, mi_option_t};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc's `mimalloc.h` (the 16th option in v2 and v3), which
/// the Rust bindings do not name.
const PURGE_DELAY: mi_option_t = 15;

/// Keep freed memory in the process, unless `MIMALLOC_PURGE_DELAY` says otherwise. Call
/// first thing in `main`.
pub fn keep_freed_memory() {
    // SAFETY: sets an option's default; mimalloc reads options behind its own lock.
    unsafe { mi_option_set_default(PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libmimalloc_sys::mi_option_get;

    /// The purge delay in force, in milliseconds (-1: never).
    fn purge_delay() -> i64 {
        // SAFETY: reads an option.
        unsafe { mi_option_get(PURGE_DELAY) }
    }

    #[test]
    fn the_option_set_is_the_purge_delay_and_the_environment_overrides_it() {
        // mimalloc v3's default purge delay is 1000 ms (src/options.c): the option read is that
        // one.
        let from_environment = std::env::var("MIMALLOC_PURGE_DELAY").ok();
        match from_environment.as_deref().map(str::parse::<i64>) {
            Some(Ok(delay)) => {
                keep_freed_memory();
                assert_eq!(purge_delay(), delay);
            }
            _ => {
                assert_eq!(purge_delay(), 1000);
                keep_freed_memory();
                assert_eq!(purge_delay(), -1);
            }
        }
    }
}
