//! Scratch buffers that outlive a forward pass: each thread keeps the buffers it used, so a
//! second image (or batch) reuses memory the first one already touched instead of asking the
//! kernel for fresh pages (page faults and TLB shootdowns were a fifth of a pass's time).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// At most this many idle buffers stay with a thread; the network needs a handful at once.
const KEEP: usize = 16;

/// A buffer of `len` floats from the thread's pool, given back when dropped. Its contents are
/// whatever the last user left (always initialised); kernels overwrite what they read.
pub struct Buffer {
    data: Vec<f32>,
    len: usize,
}

impl Buffer {
    /// A buffer of `len` floats.
    pub fn new(len: usize) -> Self {
        let reused = FREE.with(|free| {
            let mut free = free.borrow_mut();
            // The smallest idle buffer that fits, else the largest (it grows once).
            let fits = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            let pick = fits.or_else(|| {
                free.iter()
                    .enumerate()
                    .max_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i)
            });
            pick.map(|i| free.swap_remove(i))
        });
        let mut data = reused.unwrap_or_default();
        if data.len() < len {
            data.resize(len, 0.0);
        }
        Self { data, len }
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
        if data.is_empty() {
            return;
        }
        FREE.with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < KEEP {
                free.push(data);
            } else if let Some(smallest) = free.iter_mut().min_by_key(|b| b.len())
                && smallest.len() < data.len()
            {
                *smallest = data;
            }
        });
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
    }
}
