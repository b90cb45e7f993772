//! Whether a training step fits in this machine's memory, checked before training starts: a
//! batch or image size too big for the CPU would otherwise end in the kernel's out-of-memory
//! kill (exit 137, no message, and in a SageMaker container no `output/failure`).
//!
//! The need is the model's measured [`StepMemory`] per input pixel, times the batch's pixels,
//! plus the parameters with their gradients and Adam's two moments, the data loader's batches
//! in flight, and the program itself. A phase that surely needs more than is available is
//! refused; one that may need more is warned about. At larger sizes the estimate runs 10–15%
//! under the measured peak (6.3 GB measured, 5.7 GB estimated for MobileNetV3-Large from
//! scratch at 640x640, batch 16), so a refusal is not a false alarm.

use lanner_data::memory::human_bytes;
use lanner_models::registry::{ModelEntry, StepMemory};

use crate::recipe::{BatchNormMode, Phase, Recipe, Trainable};

/// The program, its libraries and the allocator's working set, measured as the intercept of
/// the same fits that gave [`StepMemory`] (120–170 MB for the MobileNets).
const PROGRAM_BYTES: u64 = 100 << 20;
/// Bytes each trainable-or-not parameter takes while training: the f32 weight, its gradient
/// and Adam's two moments.
const BYTES_PER_PARAMETER: u64 = 16;
/// A batch in the loader: `[batch, 3, size, size]` f32 values.
const LOADER_BYTES_PER_PIXEL: u64 = 3 * 4;
/// A need over `available · REFUSE_ABOVE` is refused: the run would be killed.
const REFUSE_ABOVE: f64 = 1.1;
/// A need over `available · WARN_ABOVE` is warned about: it may be.
const WARN_ABOVE: f64 = 0.8;

/// What a training run is about to do, as far as its memory goes.
#[derive(Clone, Copy, Debug)]
pub struct StepShape<'a> {
    /// The backbone.
    pub entry: &'a ModelEntry,
    /// Images per step.
    pub batch_size: usize,
    /// Height and width of the images.
    pub image_size: usize,
    /// Parameters of the whole classifier.
    pub parameters: usize,
    /// Batches the data loader holds at once (its workers plus its prefetch).
    pub loader_batches: usize,
}

/// The least and the most a phase's step may need, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    /// What it needs at least.
    pub least: u64,
    /// What it may need at most.
    pub most: u64,
}

/// What one step of `phase` needs.
pub fn phase_need(shape: &StepShape, phase: &Phase) -> Need {
    let StepMemory {
        frozen,
        from_scratch,
        fine_tune_all,
    } = shape.entry.step_memory;
    let (least, most) = match (phase.trainable, phase.batch_norm) {
        (Trainable::Head, _) => (frozen, frozen),
        (_, BatchNormMode::Training) => (from_scratch, from_scratch),
        (Trainable::Everything | Trainable::FromKerasLayer(0), BatchNormMode::Frozen) => {
            (fine_tune_all, fine_tune_all)
        }
        // Later fine-tune layers keep fewer activations, down to none of the backbone's.
        (Trainable::FromKerasLayer(_), BatchNormMode::Frozen) => (frozen, fine_tune_all),
    };
    let pixels = (shape.batch_size * shape.image_size * shape.image_size) as u64;
    let fixed = PROGRAM_BYTES
        + BYTES_PER_PARAMETER * shape.parameters as u64
        + LOADER_BYTES_PER_PIXEL * pixels * shape.loader_batches as u64;
    Need {
        least: fixed + u64::from(least) * pixels,
        most: fixed + u64::from(most) * pixels,
    }
}

/// What to do about the memory `recipe` needs when `available` bytes are free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It fits (or the system does not say how much memory is free).
    Fits,
    /// It may not fit: say so and go on.
    Warn(String),
    /// It cannot fit: stop before training, with this sentence.
    Refuse(String),
}

/// Checks every phase of `recipe` against `available` bytes.
pub fn check(shape: &StepShape, recipe: &Recipe, available: Option<u64>) -> Verdict {
    let Some(available) = available else {
        return Verdict::Fits;
    };
    let largest = |pick: fn(&Need) -> u64| {
        recipe
            .phases
            .iter()
            .map(|phase| (pick(&phase_need(shape, phase)), phase))
            .max_by_key(|(bytes, _)| *bytes)
    };
    let settings = format!(
        "{} at --batch-size {} and --image-size {}",
        shape.entry.name, shape.batch_size, shape.image_size
    );
    let fix = "lower --batch-size or --image-size (the need grows with the batch times the \
               image's pixels)";
    if let Some((least, phase)) = largest(|need| need.least)
        && least as f64 > available as f64 * REFUSE_ABOVE
    {
        return Verdict::Refuse(format!(
            "a training step of {settings} needs about {} of memory in its {} phase, more than \
             the {} available; {fix}",
            human_bytes(least),
            phase.name.as_str(),
            human_bytes(available)
        ));
    }
    match largest(|need| need.most) {
        Some((most, phase)) if most as f64 > available as f64 * WARN_ABOVE => {
            Verdict::Warn(format!(
                "warning: a training step of {settings} may need up to {} of memory in its {} \
                 phase, and {} is available; if the run is killed (exit status 137), {fix}",
                human_bytes(most),
                phase.name.as_str(),
                human_bytes(available)
            ))
        }
        _ => Verdict::Fits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyperparameters::Hyperparameters;
    use lanner_models::registry::find;

    fn shape(name: &str, batch_size: usize, image_size: usize) -> StepShape<'static> {
        StepShape {
            entry: find(name).unwrap(),
            batch_size,
            image_size,
            parameters: 4_200_000,
            loader_batches: 4,
        }
    }

    fn recipe(from_scratch: bool) -> Recipe {
        let mut hyperparameters = Hyperparameters::for_model(find("mobilenet_v3_large").unwrap());
        hyperparameters.from_scratch = from_scratch;
        Recipe::for_hyperparameters(&hyperparameters)
    }

    #[test]
    fn the_need_matches_what_was_measured_and_grows_with_batch_and_pixels() {
        // Measured peak: 1.51 GB for MobileNetV3-Large from scratch, 224, batch 32.
        let full = &recipe(true).phases[0];
        let need = phase_need(&shape("mobilenet_v3_large", 32, 224), full);
        assert_eq!(need.least, need.most);
        let gb = need.most as f64 / 1e9;
        assert!((1.4..1.7).contains(&gb), "{gb}");
        let doubled = phase_need(&shape("mobilenet_v3_large", 32, 448), full);
        let growth = (doubled.most - need.most) as f64 / (need.most as f64 - 0.2e9);
        assert!((2.5..3.1).contains(&growth), "{growth}");
        // The seed's recipe: the frozen phase needs little; fine-tuning from layer 100 between
        // that and what fine-tuning from layer 0 needs.
        let mut seed = recipe(false);
        let frozen = phase_need(&shape("mobilenet_v3_large", 32, 224), &seed.phases[0]);
        let fine_tune = phase_need(&shape("mobilenet_v3_large", 32, 224), &seed.phases[1]);
        assert_eq!(frozen.least, frozen.most);
        assert_eq!(fine_tune.least, frozen.least);
        seed.phases[1].trainable = Trainable::FromKerasLayer(0);
        let from_layer_0 = phase_need(&shape("mobilenet_v3_large", 32, 224), &seed.phases[1]);
        assert_eq!(from_layer_0.least, fine_tune.most);
        // With BatchNorm frozen the backward pass keeps one tensor per convolution, less than
        // training BatchNorm's statistics does.
        assert!(fine_tune.most < need.most);
    }

    #[test]
    fn a_step_that_cannot_fit_is_refused_one_that_may_not_is_warned_about() {
        let seed = recipe(false);
        let gb = 1_000_000_000;
        let big = shape("mobilenet_v3_large", 32, 4000);
        let Verdict::Refuse(sentence) = check(&big, &seed, Some(24 * gb)) else {
            panic!("4000x4000 at batch 32 cannot fit in 24 GB");
        };
        assert!(
            sentence.starts_with(
                "a training step of mobilenet_v3_large at --batch-size 32 and --image-size 4000 \
                 needs about "
            ) && sentence.contains("in its fine_tune phase")
                && sentence.contains("more than the 24.0 GB available; lower --batch-size"),
            "{sentence}"
        );
        // Fine-tuning from layer 0 would need ~1.0 GB here, the frozen phase 0.3 GB.
        let usual = shape("mobilenet_v3_large", 32, 224);
        assert_eq!(check(&usual, &seed, Some(24 * gb)), Verdict::Fits);
        let Verdict::Warn(warning) = check(&usual, &seed, Some(gb)) else {
            panic!("fine-tuning may not fit in 1 GB");
        };
        assert!(warning.contains("may need up to 981.3 MB"), "{warning}");
        assert_eq!(check(&big, &seed, None), Verdict::Fits);
        let Verdict::Refuse(huge) = check(&shape("xception", 32, 50_000), &seed, Some(24 * gb))
        else {
            panic!("50000x50000 cannot fit");
        };
        assert!(huge.contains(" TB of memory"), "{huge}");
    }
}
