//! NumPy's legacy `RandomState` (MT19937) and its `shuffle`, so that a seeded
//! `--validation-split` selects exactly the files Keras' `image_dataset_from_directory` selects.

/// The Mersenne Twister as NumPy seeds it from an integer (`init_genrand`).
pub struct RandomState {
    state: [u32; 624],
    index: usize,
}

impl RandomState {
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        RandomState { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// NumPy's `random_interval(max)`: uniform in `0..=max` by masked rejection.
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16] {
            mask |= mask >> shift;
        }
        loop {
            let value = self.next_u32() & mask;
            if value <= max {
                return value;
            }
        }
    }

    /// `RandomState.shuffle(list)`: Fisher–Yates from the end, as NumPy does it.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.interval(i as u32) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_numpy_mt19937_outputs() {
        // np.random.RandomState(5489).randint(0, 2**32, size=2, dtype=np.uint64)
        let mut rng = RandomState::new(5489);
        assert_eq!(rng.next_u32(), 3_499_211_612);
        assert_eq!(rng.next_u32(), 581_869_302);
    }

    #[test]
    fn shuffle_matches_numpy() {
        // rng = np.random.RandomState(42); x = list(range(10)); rng.shuffle(x)
        let mut items: Vec<u32> = (0..10).collect();
        RandomState::new(42).shuffle(&mut items);
        assert_eq!(items, vec![8, 1, 5, 0, 7, 2, 9, 4, 3, 6]);

        // rng = np.random.RandomState(7); x = list(range(1000)); rng.shuffle(x)
        let mut items: Vec<u32> = (0..1000).collect();
        RandomState::new(7).shuffle(&mut items);
        assert_eq!(&items[..8], &[778, 334, 271, 802, 216, 408, 812, 94]);
        assert_eq!(&items[997..], &[537, 196, 175]);
    }
}
