//! A backbone's frozen layers as a fast CPU inference network.
//!
//! The recipe never trains some layers: the whole backbone in phase 1, the layers below
//! `--fine-tune-layer` in phase 2, everything at inference. Their BatchNorms use running
//! statistics, so each folds into the convolution before it; no gradient flows through them,
//! so nothing needs to be kept for a backward pass. [`FoldedBackbone`] runs such a prefix of a
//! backbone:
//!
//! - channels-last (`[h][w][c]`) activations, so a 1x1 convolution is one matrix product
//!   (the `gemm` crate) and a depthwise convolution vectorises over channels;
//! - BatchNorm folded into the convolution's weights and bias, activations applied in the same
//!   pass, residual additions folded into the product's initial value;
//! - one image per thread through the whole network (activations stay in the core's cache),
//!   with buffers that each thread keeps between images.
//!
//! Its outputs equal the burn modules' to float rounding (tested, relative error ≤ 1e-4).

pub(crate) mod bf16;
mod buffers;
mod from_burn;
pub(crate) mod kernels;
mod training;
mod units;

use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::Normalization;
use crate::backbone::Backbone;
pub use bf16::TileUnit;
use buffers::Buffer;
pub use training::{Activations, ParamGradient, TrainableUnits};
use units::{Image, Unit};

/// The first units of a backbone, folded for CPU inference. See the module docs.
pub struct FoldedBackbone {
    units: Vec<Unit>,
}

/// Activations of a batch, channels-last: `values[((n · height + y) · width + x) · channels + c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap {
    /// Images.
    pub batch: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Channels.
    pub channels: usize,
    /// The values.
    pub values: Vec<f32>,
}

impl FeatureMap {
    /// The same values as a burn tensor `[batch, channels, height, width]` on `device`.
    pub fn to_tensor(&self, device: &Device) -> Tensor<4> {
        let (n, h, w, c) = (self.batch, self.height, self.width, self.channels);
        let mut nchw = vec![0.0f32; self.values.len()];
        for b in 0..n {
            let image = &self.values[b * h * w * c..][..h * w * c];
            let out = &mut nchw[b * h * w * c..][..h * w * c];
            for (pixel, values) in image.chunks_exact(c).enumerate() {
                for (ch, v) in values.iter().enumerate() {
                    out[ch * h * w + pixel] = *v;
                }
            }
        }
        Tensor::from_data(TensorData::new(nchw, [n, c, h, w]), device)
    }
}

impl FoldedBackbone {
    /// The first `units` units of `backbone` (at most [`Backbone::unit_count`]), folded.
    pub fn new(backbone: &Backbone, units: usize) -> Self {
        let units = match backbone {
            Backbone::MobileNetV3(model) => from_burn::mobilenet_v3(model, units),
            Backbone::Xception(model) => from_burn::xception(model, units),
        };
        Self { units }
    }

    /// The same network with its dense and 1x1 convolutions computing in bf16 (f32 sums) on
    /// `unit`; depthwise convolutions, pooling and activations stay f32. The products round both operands to bf16 and sum in f32, as PyTorch's CPU
    /// autocast does.
    pub fn in_bf16(mut self, unit: TileUnit) -> Self {
        self.units.iter_mut().for_each(|u| u.use_bf16(unit));
        self
    }

    /// Every unit of `backbone`, folded: the whole feature extractor.
    pub fn whole(backbone: &Backbone) -> Self {
        Self::new(backbone, backbone.unit_count())
    }

    /// How many units this network runs.
    pub fn unit_count(&self) -> usize {
        self.units.len()
    }

    /// The activations after the last unit, for pixels `[batch, 3, height, width]` in
    /// `0..=255` (a CPU tensor), normalised with `normalization` first.
    pub fn forward(&self, pixels: Tensor<4>, normalization: &Normalization) -> FeatureMap {
        self.run(pixels, normalization, false)
    }

    /// The global average of each channel after the last unit, `[batch, channels]`: the
    /// pooled features the classifier head takes.
    pub fn pooled(&self, pixels: Tensor<4>, normalization: &Normalization) -> Tensor<2> {
        let device = pixels.device();
        let map = self.run(pixels, normalization, true);
        Tensor::from_data(
            TensorData::new(map.values, [map.batch, map.channels]),
            &device,
        )
    }

    fn run(&self, pixels: Tensor<4>, normalization: &Normalization, pool: bool) -> FeatureMap {
        let [batch, channels, height, width] = pixels.dims();
        assert_eq!(channels, 3, "RGB pixels");
        let pixels = pixels
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("converted to f32");
        let (h, w, c) = self
            .units
            .iter()
            .fold((height, width, 3), |(h, w, _), unit| {
                unit.output_shape((h, w))
            });
        let per_image = if pool { c } else { h * w * c };
        let mut values = vec![0.0f32; batch * per_image];
        // Fewer images than threads: the matrix products split instead.
        let threads = batch < rayon::current_num_threads();
        let plane = height * width;
        values
            .par_chunks_mut(per_image)
            .zip(pixels.par_chunks(3 * plane))
            .for_each(|(out, image)| {
                let mut x = normalized_image(image, (height, width), normalization);
                for unit in &self.units {
                    x = unit.forward(x, threads);
                }
                if pool {
                    kernels::mean_over_pixels(&x.data, x.height * x.width, out);
                } else {
                    out.copy_from_slice(&x.data);
                }
            });
        let (height, width) = if pool { (1, 1) } else { (h, w) };
        FeatureMap {
            batch,
            height,
            width,
            channels: c,
            values,
        }
    }
}

/// One image's planes `[3][h][w]` in 0..=255 as normalised channels-last values.
fn normalized_image(planes: &[f32], (h, w): (usize, usize), n: &Normalization) -> Image {
    let plane = h * w;
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * n.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| -n.mean[c] / n.std[c]);
    let mut data = Buffer::new(plane * 3);
    for (p, rgb) in data.chunks_exact_mut(3).enumerate() {
        for c in 0..3 {
            rgb[c] = planes[c * plane + p] * scale[c] + shift[c];
        }
    }
    Image {
        data,
        height: h,
        width: w,
        channels: 3,
    }
}

#[cfg(test)]
mod tests;
