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

impl Pool {
    /// The smallest idle buffer of at least `len` floats, else the largest (it grows once).
    fn take(&mut self, len: usize) -> Option<Vec<f32>> {
        let key = match self.by_len.range(len..).next() {
            Some((&key, _)) => key,
            None => *self.by_len.keys().next_back()?,
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
}
