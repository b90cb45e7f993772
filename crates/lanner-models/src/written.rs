//! Output buffers set once, in the tasks that compute them, without zeroing them first.
//!
//! `vec![0.0; n]` asks the allocator for zeroed memory. For a block it hands out again (every
//! large buffer after the first training step) that is a `memset` of the whole buffer on the
//! calling thread while the other threads wait for the parallel work that follows: 7% of
//! MobileNetV3-Large's from-scratch training step on two threads, one pass over memory as
//! long as the pass that then writes the values. [`written_by_chunks`] hands out a new
//! vector's memory chunk by chunk instead, and each chunk is set where it is computed:
//!
//! - wholly, by a kernel that only writes (BatchNorm's passes,
//!   [`crate::folded::kernels::matmul_strided_into`]), which asserts that the chunk is as long
//!   as what it writes;
//! - or first [`filled`] with zeros or a bias, when the kernel adds into it: a pass over a
//!   chunk that is about to be written again, so it is still in the core's cache.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// `len` values set by `write(scratch, index, chunk)`, chunk by chunk (`chunk` values each,
/// the last one shorter when `chunk` does not divide `len`): in parallel when `parallel`, else
/// in order on this thread. Each thread's `scratch` (working memory the kernel keeps between
/// chunks) comes from `scratch()`.
///
/// # Safety
/// `write` must set every value of every chunk it is given.
pub(crate) unsafe fn written_by_chunks<S>(
    len: usize,
    chunk: usize,
    parallel: bool,
    scratch: impl Fn() -> S + Sync + Send,
    write: impl Fn(&mut S, usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    if len == 0 {
        return Vec::new();
    }
    let mut values = Vec::with_capacity(len);
    let unset = &mut values.spare_capacity_mut()[..len];
    if parallel {
        unset
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each_init(scratch, |scratch, (index, chunk)| {
                write(scratch, index, chunk)
            });
    } else {
        let mut scratch = scratch();
        for (index, chunk) in unset.chunks_mut(chunk).enumerate() {
            write(&mut scratch, index, chunk);
        }
    }
    // SAFETY: `write` set every value of the first `len` (the caller's promise).
    unsafe { values.set_len(len) };
    values
}

/// [`written_by_chunks`] plane by plane (`plane` values each) in parallel, with no scratch.
///
/// # Safety
/// `write` must set every value of every plane it is given.
pub(crate) unsafe fn written_by_planes(
    len: usize,
    plane: usize,
    write: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    // SAFETY: `write` sets every value of its plane (the caller's promise).
    unsafe { written_by_chunks(len, plane, true, || (), |(), index, out| write(index, out)) }
}

/// `values`, each set to `value`, as the set values they now are.
pub(crate) fn filled(values: &mut [MaybeUninit<f32>], value: f32) -> &mut [f32] {
    values.fill(MaybeUninit::new(value));
    // SAFETY: every value was set just above, and `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `values` as rows of `values.len() / row_values.len()` values, row `r` set to
/// `row_values[r]` (a bias per output channel), as the set values they now are.
pub(crate) fn filled_by_rows<'a>(
    values: &'a mut [MaybeUninit<f32>],
    row_values: &[f32],
) -> &'a mut [f32] {
    let row_len = values.len() / row_values.len().max(1);
    assert_eq!(values.len(), row_len * row_values.len(), "whole rows");
    for (row, &value) in values.chunks_exact_mut(row_len.max(1)).zip(row_values) {
        row.fill(MaybeUninit::new(value));
    }
    // SAFETY: the rows cover `values` (asserted above) and each was set just above.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_written_once_at_its_place_in_order_or_in_parallel() {
        for parallel in [false, true] {
            // 10 values in chunks of 4: the last chunk holds 2.
            // SAFETY: `filled` sets every value of each chunk.
            let values = unsafe {
                written_by_chunks(
                    10,
                    4,
                    parallel,
                    || (),
                    |(), index, chunk| {
                        let chunk = filled(chunk, 0.0);
                        for (offset, value) in chunk.iter_mut().enumerate() {
                            *value += (index * 4 + offset) as f32;
                        }
                    },
                )
            };
            let expected: Vec<f32> = (0..10).map(|v| v as f32).collect();
            assert_eq!(values, expected, "parallel: {parallel}");
        }
    }
}
