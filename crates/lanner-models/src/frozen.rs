//! [`FrozenPrefix`]: the first units of a backbone that a training phase (or inference) does
//! not train, run once per batch without autodiff. On the CPU it is the folded channels-last
//! network of [`crate::folded`]; on other devices the backbone's own modules in inference
//! mode.

use std::ops::Range;

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor};

use crate::backbone::Backbone;
use crate::folded::{FeatureMap, FoldedBackbone, TileUnit};
use crate::head::global_average_pool;
use crate::precision::{Precision, cast_floats, in_dtype};
use crate::registry::Normalization;

/// The frozen first `units` units of a backbone. See the module docs.
pub struct FrozenPrefix {
    units: usize,
    total: usize,
    runner: Runner,
}

enum Runner {
    Folded(FoldedBackbone),
    /// The modules, with their float type (inputs are normalised in f32, then cast to it).
    Modules(Box<Backbone>, DType),
}

/// What computes bf16 products on this CPU: AMX tiles (Intel Xeon from Sapphire Rapids on),
/// or `None` where the CPU has none and bf16 would be slower than f32.
pub fn cpu_bf16() -> Option<TileUnit> {
    TileUnit::detect()
}

/// Whether `device` is the CPU, where the folded network runs.
pub fn is_cpu(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

impl FrozenPrefix {
    /// The first `units` units of `backbone` (its current weights), to run on `device`.
    pub fn new(backbone: &Backbone, units: usize, device: &Device) -> Self {
        let total = backbone.unit_count();
        let units = units.min(total);
        let runner = if is_cpu(device) {
            Runner::Folded(FoldedBackbone::new(backbone, units))
        } else {
            Runner::Modules(Box::new(backbone.valid()), DType::F32)
        };
        Self {
            units,
            total,
            runner,
        }
    }

    /// The first `units` units as the backbone's own modules, on any device, computing in
    /// `precision`: how a GPU runs them, and what the CPU's folded network is checked against.
    pub fn with_modules(backbone: &Backbone, units: usize, precision: Precision) -> Self {
        let total = backbone.unit_count();
        let modules = if precision.is_f32() {
            backbone.valid()
        } else {
            cast_floats(backbone.valid(), precision.dtype())
        };
        Self {
            units: units.min(total),
            total,
            runner: Runner::Modules(Box::new(modules), precision.dtype()),
        }
    }

    /// The whole backbone, for inference.
    pub fn whole(backbone: &Backbone, device: &Device) -> Self {
        Self::new(backbone, backbone.unit_count(), device)
    }

    /// The first `units` units of `backbone` folded for the CPU, their dense and 1x1
    /// convolutions computing in bf16 on `unit` ([`cpu_bf16`] says whether this CPU can).
    pub fn in_bf16(backbone: &Backbone, units: usize, unit: TileUnit) -> Self {
        let total = backbone.unit_count();
        let units = units.min(total);
        Self {
            units,
            total,
            runner: Runner::Folded(FoldedBackbone::new(backbone, units).in_bf16(unit)),
        }
    }

    /// The whole backbone folded for inference on the CPU, computing in bf16 on `unit` (see
    /// [`Self::in_bf16`]).
    pub fn whole_in_bf16(backbone: &Backbone, unit: TileUnit) -> Self {
        Self::in_bf16(backbone, backbone.unit_count(), unit)
    }

    /// How many units run here; the trainable rest starts at this unit.
    pub fn units(&self) -> usize {
        self.units
    }

    /// The units this prefix leaves to the trainable model.
    pub fn rest(&self) -> Range<usize> {
        self.units..self.total
    }

    /// Whether the prefix is the whole backbone.
    pub fn is_whole(&self) -> bool {
        self.units == self.total
    }

    /// The activations after the prefix `[batch, channels, h, w]` for pixels
    /// `[batch, 3, height, width]` in `0..=255` (no autodiff).
    pub fn features(&self, pixels: Tensor<4>, normalization: &Normalization) -> Tensor<4> {
        match &self.runner {
            Runner::Folded(folded) => {
                let device = pixels.device();
                folded.forward(pixels, normalization).to_tensor(&device)
            }
            Runner::Modules(backbone, dtype) => {
                let input = in_dtype(normalization.apply(pixels), *dtype);
                backbone.forward_units(input, 0..self.units)
            }
        }
    }

    /// The activations after the prefix, channels-last, where the prefix runs folded (on the
    /// CPU); `None` elsewhere.
    pub fn feature_map(
        &self,
        pixels: Tensor<4>,
        normalization: &Normalization,
    ) -> Option<FeatureMap> {
        match &self.runner {
            Runner::Folded(folded) => Some(folded.forward(pixels, normalization)),
            Runner::Modules(..) => None,
        }
    }

    /// The pooled features `[batch, channels]` of a prefix that is the whole backbone.
    pub fn pooled(&self, pixels: Tensor<4>, normalization: &Normalization) -> Tensor<2> {
        assert!(self.is_whole(), "pooled features need the whole backbone");
        match &self.runner {
            Runner::Folded(folded) => folded.pooled(pixels, normalization),
            Runner::Modules(..) => global_average_pool(self.features(pixels, normalization)),
        }
    }
}
