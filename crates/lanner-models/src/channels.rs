//! timm's channel rounding: how a width multiplier turns a reference channel count into the
//! one a layer actually has (`timm.layers.make_divisible`, `round_channels`).

/// Round `value` to the nearest multiple of `divisor` (at least `divisor`), going up one step
/// when rounding down would lose more than 10% — timm's `make_divisible(v, divisor)`.
pub fn make_divisible(value: f64, divisor: usize) -> usize {
    // Python's `int(v + divisor / 2) // divisor * divisor`; `value` is never negative here.
    let rounded = (value + divisor as f64 / 2.0) as usize / divisor * divisor;
    let rounded = rounded.max(divisor);
    if (rounded as f64) < 0.9 * value {
        rounded + divisor
    } else {
        rounded
    }
}

/// A reference channel count scaled by the width `multiplier`, divisible by 8 — timm's
/// `round_channels(channels, multiplier)`.
pub fn round_channels(channels: f64, multiplier: f64) -> usize {
    make_divisible(channels * multiplier, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_timm_make_divisible() {
        // Values printed by timm.layers.make_divisible.
        assert_eq!(make_divisible(4.0, 8), 8);
        assert_eq!(make_divisible(12.0, 8), 16);
        assert_eq!(make_divisible(58.72, 8), 56);
        assert_eq!(make_divisible(88.08, 8), 88);
        assert_eq!(make_divisible(720.0, 8), 720);
        // 0.9 * 27 = 24.3 > 24, so it rounds up instead of down.
        assert_eq!(make_divisible(27.0, 8), 32);
    }

    #[test]
    fn width_multiplier_rounds_channels() {
        assert_eq!(round_channels(960.0, 0.75), 720);
        assert_eq!(round_channels(576.0, 0.5), 288);
        assert_eq!(round_channels(24.0, 0.5), 16);
        assert_eq!(round_channels(40.0, 0.75), 32);
    }
}
