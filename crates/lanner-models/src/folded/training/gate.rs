//! Squeeze-excitation, trained: its forward values and the gradients of its four parameters.

use super::super::kernels;
use super::super::units::Image;
use super::{Layout, Plan, Sums};
use crate::squeeze_excite::SqueezeExcite;
use burn::nn::conv::Conv2d;

use super::super::from_burn::values;

/// Squeeze-excitation with its four parameters.
pub(super) struct Gate {
    channels: usize,
    reduced: usize,
    /// `[c][r]`, `[r]`, `[r][c]`, `[c]`.
    reduce_w: Vec<f32>,
    reduce_b: Vec<f32>,
    expand_w: Vec<f32>,
    expand_b: Vec<f32>,
    /// The weights the other way round (`[r][c]`, `[c][r]`), for the backward products.
    reduce_w_t: Vec<f32>,
    expand_w_t: Vec<f32>,
    /// Accumulators (also the gradients, in the same layouts) and slots.
    acc: [usize; 4],
    slots: [usize; 4],
}

pub(super) struct GateTape {
    mean: Vec<f32>,
    reduced: Vec<f32>,
    pre: Vec<f32>,
    pub(super) gate: Vec<f32>,
}

impl Gate {
    pub(super) fn new(se: &SqueezeExcite, plan: &mut Plan) -> Self {
        let transpose = |conv: &Conv2d| {
            let [out, cin, _, _] = conv.weight.val().dims();
            let raw = values(conv.weight.val());
            let mut w = vec![0.0; out * cin];
            for o in 0..out {
                for i in 0..cin {
                    w[i * out + o] = raw[o * cin + i];
                }
            }
            w
        };
        let bias = |conv: &Conv2d| values(conv.bias.as_ref().expect("SE convs have a bias").val());
        let [reduced, channels, _, _] = se.conv_reduce.weight.val().dims();
        let (rb, eb) = (
            se.conv_reduce.bias.as_ref().expect("bias"),
            se.conv_expand.bias.as_ref().expect("bias"),
        );
        Self {
            channels,
            reduced,
            reduce_w: transpose(&se.conv_reduce),
            reduce_b: bias(&se.conv_reduce),
            expand_w: transpose(&se.conv_expand),
            expand_b: bias(&se.conv_expand),
            reduce_w_t: values(se.conv_reduce.weight.val()),
            expand_w_t: values(se.conv_expand.weight.val()),
            acc: [
                plan.accumulator(channels * reduced),
                plan.accumulator(reduced),
                plan.accumulator(reduced * channels),
                plan.accumulator(channels),
            ],
            slots: [
                plan.slot(&se.conv_reduce.weight),
                plan.slot(rb),
                plan.slot(&se.conv_expand.weight),
                plan.slot(eb),
            ],
        }
    }

    pub(super) fn forward(&self, x: &Image) -> GateTape {
        let mut mean = vec![0.0; self.channels];
        kernels::mean_over_pixels(&x.data, x.height * x.width, &mut mean);
        let mut reduced = vec![0.0; self.reduced];
        kernels::vector_matmul(&mean, &self.reduce_w, &self.reduce_b, &mut reduced);
        reduced.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut pre = vec![0.0; self.channels];
        kernels::vector_matmul(&reduced, &self.expand_w, &self.expand_b, &mut pre);
        let gate = pre
            .iter()
            .map(|g| (g + 3.0).clamp(0.0, 6.0) / 6.0)
            .collect();
        GateTape {
            mean,
            reduced,
            pre,
            gate,
        }
    }

    /// Given `∂gate` per channel, adds the parameters' gradients and returns `∂mean`.
    pub(super) fn backward(&self, tape: &GateTape, d_gate: &[f32], sums: &mut Sums) -> Vec<f32> {
        let (c, r) = (self.channels, self.reduced);
        let d_pre: Vec<f32> = d_gate
            .iter()
            .zip(&tape.pre)
            .map(|(d, p)| if *p > -3.0 && *p < 3.0 { d / 6.0 } else { 0.0 })
            .collect();
        // The expanding 1x1: ∂W = reducedᵀ · ∂pre, ∂reduced = ∂pre · Wᵀ (through its ReLU).
        kernels::add_outer(&mut sums.values[self.acc[2]], &tape.reduced, &d_pre);
        let mut d_reduced = vec![0.0f32; r];
        kernels::vector_matmul(&d_pre, &self.expand_w_t, &vec![0.0; r], &mut d_reduced);
        for (d, v) in d_reduced.iter_mut().zip(&tape.reduced) {
            if *v <= 0.0 {
                *d = 0.0;
            }
        }
        kernels::backward::add_column_sums(&mut sums.values[self.acc[3]], &d_pre);
        kernels::backward::add_column_sums(&mut sums.values[self.acc[1]], &d_reduced);
        // The reducing 1x1, likewise.
        kernels::add_outer(&mut sums.values[self.acc[0]], &tape.mean, &d_reduced);
        let mut d_mean = vec![0.0f32; c];
        kernels::vector_matmul(&d_reduced, &self.reduce_w_t, &vec![0.0; c], &mut d_mean);
        d_mean
    }

    pub(super) fn gradients(&self, sums: &Sums, out: &mut Vec<(usize, Vec<f32>, Layout)>) {
        let (c, r) = (self.channels, self.reduced);
        let layouts = [
            Layout::Transposed { rows: c, cols: r },
            Layout::Same,
            Layout::Transposed { rows: r, cols: c },
            Layout::Same,
        ];
        for ((slot, acc), layout) in self.slots.iter().zip(&self.acc).zip(layouts) {
            out.push((*slot, sums.values[*acc].clone(), layout));
        }
    }
}
