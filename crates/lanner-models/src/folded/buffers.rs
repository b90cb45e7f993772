//! Scratch buffers that outlive a forward pass: each thread keeps the buffers it used, so a
//! second image (or batch) reuses memory the first one already touched instead of asking the
//! kernel for fresh pages (page faults and TLB shootdowns were a fifth of a pass's time).
//!
//! A training step keeps hundreds of buffers alive until its backward pass, so the pool holds
//! up to [`KEEP_BYTES`] per thread (memory the step used anyway), found by size in a map.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};

/// Idle buffers by capacity, and their total size in floats.
#[derive(Default)]
struct Pool {
    by_len: BTreeMap<usize, Vec<Vec<f32>>>,
    floats: usize,
}

thread_local! {
    static FREE: RefCell<Pool> = RefCell::new(Pool::default());
}

/// At most this many bytes of idle buffers stay with a thread.
const KEEP_BYTES: usize = 1 << 30;

/// A buffer is taken for a request when at most `1 / WASTE` of it would go unused.
const WASTE: usize = 4;

impl Pool {
    /// The smallest idle buffer of at least `len` floats that wastes little of itself, else
    /// the largest smaller one (it grows once). A much larger buffer stays for a request of
    /// its own size: a training step keeps hundreds of buffers until its backward pass, and
    /// one taken for a tenth of its size holds the rest of it, touched and resident, as long.
    fn take(&mut self, len: usize) -> Option<Vec<f32>> {
        let fits = self.by_len.range(len..=len + len / WASTE).next();
        let key = match fits {
            Some((&key, _)) => key,
            None => *self.by_len.range(..len).next_back()?.0,
        };
        let list = self.by_len.get_mut(&key).expect("present");
        let data = list.pop().expect("lists are never empty");
        if list.is_empty() {
            self.by_len.remove(&key);
        }
        self.floats -= data.len();
        Some(data)
    }

    fn give(&mut self, data: Vec<f32>) {
        if (self.floats + data.len()) * size_of::<f32>() > KEEP_BYTES {
            return;
        }
        self.floats += data.len();
        self.by_len.entry(data.len()).or_default().push(data);
    }
}

/// A buffer of `len` floats from the thread's pool, given back when dropped. Its contents are
/// whatever the last user left (always initialised); kernels overwrite what they read.
pub struct Buffer {
    data: Vec<f32>,
    len: usize,
}

impl Buffer {
    /// A buffer of `len` floats.
    pub fn new(len: usize) -> Self {
        let reused = FREE.with(|free| free.borrow_mut().take(len));
        let mut data = reused.unwrap_or_default();
        if data.len() < len {
            data.resize(len, 0.0);
        }
        Self { data, len }
    }

    /// A buffer of `len` zeros.
    pub fn zeros(len: usize) -> Self {
        let mut buffer = Self::new(len);
        buffer.fill(0.0);
        buffer
    }

    /// A buffer holding a copy of `values`.
    pub fn from_slice(values: &[f32]) -> Self {
        let mut buffer = Self::new(values.len());
        buffer.copy_from_slice(values);
        buffer
    }
}

impl Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[..self.len]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.len]
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        if !data.is_empty() {
            FREE.with(|free| free.borrow_mut().give(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_by_the_next_one_that_fits() {
        let first = Buffer::new(1000);
        let address = first.as_ptr();
        drop(first);
        let second = Buffer::new(800);
        assert_eq!(second.as_ptr(), address);
        assert_eq!(second.len(), 800);
        let third = Buffer::from_slice(&[1.0, 2.0]);
        assert_eq!(&third[..], &[1.0, 2.0]);
        assert!(Buffer::zeros(3000).iter().all(|v| *v == 0.0));
    }

    #[test]
    fn a_much_larger_idle_buffer_is_left_for_a_request_of_its_size() {
        // Run on a thread of its own: the pool is the thread's.
        std::thread::spawn(|| {
            let large = Buffer::new(10_000);
            let address = large.as_ptr();
            drop(large);
            // A tenth of it would hold the rest resident for as long as the small one lives.
            let small = Buffer::new(1_000);
            assert_ne!(small.as_ptr(), address);
            // A buffer a little larger than asked for is taken.
            let close = Buffer::new(9_000);
            assert_eq!(close.as_ptr(), address);
            drop((small, close));
            // With nothing large enough, the largest smaller one grows.
            let grown = Buffer::new(12_000);
            assert_eq!(grown.len(), 12_000);
        })
        .join()
        .unwrap();
    }
}
