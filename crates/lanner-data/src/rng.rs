//! A small, fast, seedable random number generator (SplitMix64). Every random choice of the
//! pipeline is derived from `(seed, epoch, sample)`, so results never depend on which worker
//! thread did the work or in what order.

/// SplitMix64 (Steele, Lea & Flood, 2014): one 64-bit state, good enough statistics for
/// shuffling and augmentation, and trivially seekable by hashing the stream's coordinates.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for one `(seed, stream, index)` coordinate, independent of the others.
    pub fn for_stream(seed: u64, stream: u64, index: u64) -> Self {
        let mut mix = SplitMix64(seed ^ 0x6a09_e667_f3bc_c908);
        let a = mix.next_u64() ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut mix = SplitMix64(a);
        SplitMix64(mix.next_u64() ^ index.wrapping_mul(0xbf58_476d_1ce4_e5b9))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our sizes).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}
