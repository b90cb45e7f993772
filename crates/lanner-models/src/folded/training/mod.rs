//! Training a backbone's trainable units on the CPU without burn's autodiff: the same folded,
//! channels-last kernels forward (keeping what the backward pass needs), then hand-written
//! gradients, accumulated per thread and handed to the optimizer as burn gradients.
//!
//! It covers what the recipe's phase 2 trains: every BatchNorm with frozen statistics (the
//! seed's `training=False`), so a convolution and its BatchNorm are one affine map
//! `pre = s · (x ⊛ w − μ) + β` with `s = γ / √(σ² + ε)`. For its gradients:
//! `∂w = G · s`, `∂γ = (Σ G ∘ w − μ · Σ ∂pre) / √(σ² + ε)`, `∂β = Σ ∂pre`, where
//! `G = xᵀ · ∂pre` (1x1), the patch products (dense) or the per-tap correlation (depthwise) —
//! all linear in `∂pre`, so `G` and `Σ ∂pre` are what each image adds to its thread's sums.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use burn::module::{Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

mod blocks;
mod conv_bn;
mod gate;
mod tiles;

use blocks::{Tape, TrainUnit};
use conv_bn::ConvBn;
use gate::Gate;

use super::FeatureMap;
use super::bf16::{self, TileUnit};
use super::buffers::Buffer;
use super::from_burn::{act, relu_if, xception_rep};
use super::kernels::{self, Act, Parallelism};
use super::units::Image;
use crate::backbone::Backbone;
use crate::mobilenet_v3::blocks::Block;
use crate::xception::Xception;
use crate::xception::blocks::XceptionBlock;

/// How an accumulator's values become a parameter's gradient in burn's layout.
#[derive(Clone, Copy)]
enum Layout {
    /// Already in burn's layout (vectors).
    Same,
    /// `[rows][cols]` here, `[cols][rows]` in burn (1x1 and squeeze-excitation weights,
    /// depthwise weights `[k·k][c]` → `[c][1][k][k]`).
    Transposed { rows: usize, cols: usize },
    /// `[(tap, in)][out]` here, `[out][in][tap]` in burn (dense kernels).
    Dense {
        taps: usize,
        cin: usize,
        cout: usize,
    },
}

/// A parameter that receives a gradient.
struct Slot {
    id: ParamId,
    shape: Vec<usize>,
    trainable: bool,
}

/// Sizes of the per-thread accumulators, the parameters they feed, and the tiles the 1x1
/// and dense convolutions' products run on (in bf16) if any.
#[derive(Default)]
struct Plan {
    sizes: Vec<usize>,
    slots: Vec<Slot>,
    tiles: Option<TileUnit>,
}

impl Plan {
    fn accumulator(&mut self, size: usize) -> usize {
        self.sizes.push(size);
        self.sizes.len() - 1
    }

    fn slot<const D: usize>(&mut self, param: &Param<Tensor<D>>) -> usize {
        let value = param.val();
        self.slots.push(Slot {
            id: param.id,
            shape: value.dims().to_vec(),
            trainable: value.is_require_grad(),
        });
        self.slots.len() - 1
    }
}

/// Per-thread sums of every image's contributions.
struct Sums {
    values: Vec<Vec<f32>>,
    /// Products `G += aᵀ · b` put aside, by accumulator.
    staged: BTreeMap<usize, Staged>,
}

/// The rows of a product `G += aᵀ · b` put aside to be multiplied in one go: a 1x1 or dense
/// convolution's inputs and output gradients from several images, so that one product runs
/// over all their pixels instead of reading and writing all of `G` once per image (`G` is as
/// large as the layer's weights; Xception's exit layers have 10x10 pixels and 3M weights).
#[derive(Default)]
struct Staged {
    a: Vec<f32>,
    b: Vec<f32>,
    rows: usize,
    a_cols: usize,
    b_cols: usize,
    tiles: Option<TileUnit>,
}

/// Rows put aside before the product runs, at most.
const STAGED_ROWS: usize = 1024;

/// How many rows of `G += aᵀ · b` to put aside before the product runs: enough that the rows
/// read are as large as `G` (`rows · (a_cols + b_cols) = a_cols · b_cols`), past which reading
/// and writing `G` once more costs less than copying the rows aside, and at most
/// [`STAGED_ROWS`]. What is put aside per product then stays under twice its weights, however
/// many images a thread takes.
fn rows_to_stage(a_cols: usize, b_cols: usize) -> usize {
    (a_cols * b_cols / (a_cols + b_cols)).clamp(1, STAGED_ROWS)
}

/// Sums of finished steps, kept for the next step: as large as the trainable parameters, they
/// would otherwise be fresh pages (page faults) every step.
static SPARE_SUMS: Mutex<Vec<Sums>> = Mutex::new(Vec::new());

/// Spare sums kept at most; one per thread is what a step uses.
const SPARES: usize = 8;

impl Sums {
    /// Zeroed sums of these sizes, reusing a finished step's when their sizes match.
    fn zeroed(sizes: &[usize]) -> Self {
        let spare = {
            let mut spares = SPARE_SUMS.lock().unwrap_or_else(|e| e.into_inner());
            let matching = spares
                .iter()
                .position(|s| s.values.iter().map(Vec::len).eq(sizes.iter().copied()));
            matching.map(|i| spares.swap_remove(i))
        };
        match spare {
            Some(mut sums) => {
                sums.values.iter_mut().for_each(|v| v.fill(0.0));
                sums
            }
            None => Self {
                values: sizes.iter().map(|&n| vec![0.0; n]).collect(),
                staged: BTreeMap::new(),
            },
        }
    }

    /// Adds `aᵀ · b` to accumulator `acc` (`a` is `[rows][a_cols]`, `b` `[rows][b_cols]`),
    /// now or with the next rows, in bf16 on `tiles` when given.
    fn add_product(
        &mut self,
        acc: usize,
        (a, a_cols): (&[f32], usize),
        (b, b_cols): (&[f32], usize),
        tiles: Option<TileUnit>,
    ) {
        let staged = self.staged.entry(acc).or_default();
        let rows = a.len() / a_cols;
        let enough = rows_to_stage(a_cols, b_cols);
        if staged.rows == 0 && rows >= enough {
            // Enough rows on their own: multiplied where they are, without a copy.
            add_transposed_product(&mut self.values[acc], (a, a_cols), (b, b_cols), tiles);
            return;
        }
        staged.a.extend_from_slice(a);
        staged.b.extend_from_slice(b);
        staged.rows += rows;
        (staged.a_cols, staged.b_cols, staged.tiles) = (a_cols, b_cols, tiles);
        if staged.rows >= enough {
            self.flush(acc);
        }
    }

    /// Runs the product put aside for `acc`.
    fn flush(&mut self, acc: usize) {
        let Sums { values, staged } = self;
        let Some(s) = staged.get_mut(&acc).filter(|s| s.rows > 0) else {
            return;
        };
        add_transposed_product(
            &mut values[acc],
            (&s.a, s.a_cols),
            (&s.b, s.b_cols),
            s.tiles,
        );
        s.a.clear();
        s.b.clear();
        s.rows = 0;
    }

    /// Runs every product put aside.
    fn flush_all(&mut self) {
        let pending: Vec<usize> = self.staged.keys().copied().collect();
        for acc in pending {
            self.flush(acc);
        }
    }

    fn add(mut self, other: Sums) -> Self {
        for (a, b) in self.values.iter_mut().zip(&other.values) {
            kernels::add_into(a, b);
        }
        other.recycle();
        self
    }

    fn recycle(self) {
        let mut spares = SPARE_SUMS.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < SPARES {
            spares.push(self);
        }
    }
}

/// `g += aᵀ · b` (`a` is `[rows][a_cols]`, `b` `[rows][b_cols]`), in bf16 on `tiles` when
/// given, else in f32.
fn add_transposed_product(
    g: &mut [f32],
    (a, a_cols): (&[f32], usize),
    (b, b_cols): (&[f32], usize),
    tiles: Option<TileUnit>,
) {
    if let Some(unit) = tiles {
        return bf16::add_transposed_product(g, (a, a_cols), (b, b_cols), unit);
    }
    let rows = a.len() / a_cols;
    kernels::matmul_strided(
        g,
        true,
        (a, 1, a_cols),
        (b, b_cols, 1),
        (a_cols, rows, b_cols),
        Parallelism::None,
    );
}

/// The gradient of one parameter.
pub struct ParamGradient {
    /// The parameter.
    pub id: ParamId,
    /// Its gradient, shaped as the parameter.
    pub values: TensorData,
}

/// The trainable units of a backbone whose BatchNorms use frozen statistics, with their
/// current weights: a forward pass that keeps what the backward pass needs, and gradients
/// for every parameter that requires one. Built again after every optimizer step.
pub struct TrainableUnits {
    units: Vec<TrainUnit>,
    first: usize,
    plan: Plan,
}

/// One image's pooled features, tapes and last feature-map size.
type ImageResult = (Vec<f32>, Vec<Tape>, (usize, usize));

/// What [`TrainableUnits::forward`] kept for [`TrainableUnits::backward`].
pub struct Activations {
    tapes: Vec<(Vec<Tape>, (usize, usize))>,
}

impl Activations {
    /// The bytes of values kept for the backward pass, per image.
    pub fn bytes_per_image(&self) -> usize {
        let tapes = self.tapes.iter().flat_map(|(tapes, _)| tapes);
        let floats: usize = tapes.map(Tape::floats).sum();
        floats * size_of::<f32>() / self.tapes.len().max(1)
    }
}

impl TrainableUnits {
    /// Whether `backbone` can be trained this way (both architectures of the registry).
    pub fn supports(backbone: &Backbone) -> bool {
        matches!(backbone, Backbone::MobileNetV3(_) | Backbone::Xception(_))
    }

    /// Units `units` of `backbone` (see [`Backbone::unit_count`]).
    pub fn new(backbone: &Backbone, units: Range<usize>) -> Self {
        Self::build(backbone, units, None)
    }

    /// Units `units` of `backbone`, the products of their 1x1 and dense convolutions (forward,
    /// input gradient and weight gradient) in bf16 with f32 sums on `unit`; depthwise
    /// convolutions, activations and the rest stay f32.
    pub fn in_bf16(backbone: &Backbone, units: Range<usize>, unit: TileUnit) -> Self {
        Self::build(backbone, units, Some(unit))
    }

    fn build(backbone: &Backbone, units: Range<usize>, tiles: Option<TileUnit>) -> Self {
        let mut plan = Plan {
            tiles,
            ..Plan::default()
        };
        let model = match backbone {
            Backbone::MobileNetV3(model) => model,
            Backbone::Xception(model) => return Self::xception(model, units, plan),
        };
        let mut out = Vec::new();
        if units.contains(&0) {
            out.push(TrainUnit::Stem(ConvBn::new(
                &model.conv_stem,
                Some(&model.bn1),
                Act::HardSwish,
                &mut plan,
            )));
        }
        let first_block = units.start.max(1) - 1;
        let count = units.end.saturating_sub(1).saturating_sub(first_block);
        for block in model.blocks.iter().flatten().skip(first_block).take(count) {
            out.push(match block {
                Block::DepthwiseSeparable(b) => TrainUnit::Inverted {
                    expand: None,
                    depthwise: ConvBn::new(&b.conv_dw, Some(&b.bn1), act(b.activation), &mut plan),
                    gate: b.se.as_ref().map(|se| Gate::new(se, &mut plan)),
                    project: ConvBn::new(&b.conv_pw, Some(&b.bn2), Act::Identity, &mut plan),
                    skip: b.has_skip,
                },
                Block::InvertedResidual(b) => TrainUnit::Inverted {
                    expand: Some(ConvBn::new(
                        &b.conv_pw,
                        Some(&b.bn1),
                        act(b.activation),
                        &mut plan,
                    )),
                    depthwise: ConvBn::new(&b.conv_dw, Some(&b.bn2), act(b.activation), &mut plan),
                    gate: b.se.as_ref().map(|se| Gate::new(se, &mut plan)),
                    project: ConvBn::new(&b.conv_pwl, Some(&b.bn3), Act::Identity, &mut plan),
                    skip: b.has_skip,
                },
                Block::ConvBnAct(b) => TrainUnit::Last(ConvBn::new(
                    &b.conv,
                    Some(&b.bn1),
                    act(b.activation),
                    &mut plan,
                )),
            });
        }
        Self {
            units: out,
            first: units.start,
            plan,
        }
    }

    fn xception(model: &Xception, units: Range<usize>, mut plan: Plan) -> Self {
        let mut out = Vec::new();
        let start = units.start;
        for unit in units {
            out.push(match unit {
                0 => TrainUnit::Stem(ConvBn::new(
                    &model.conv1,
                    Some(&model.bn1),
                    Act::Relu,
                    &mut plan,
                )),
                1 => TrainUnit::Stem(ConvBn::new(
                    &model.conv2,
                    Some(&model.bn2),
                    Act::Relu,
                    &mut plan,
                )),
                2..=13 => xception_block(model.blocks()[unit - 2], &mut plan),
                14 | 15 => {
                    let (conv, bn) = if unit == 14 {
                        (&model.conv3, &model.bn3)
                    } else {
                        (&model.conv4, &model.bn4)
                    };
                    TrainUnit::Separable(
                        ConvBn::new(&conv.conv1, None, Act::Identity, &mut plan),
                        ConvBn::new(&conv.pointwise, Some(bn), Act::Relu, &mut plan),
                    )
                }
                _ => panic!("Xception has {} units", crate::xception::UNITS),
            });
        }
        Self {
            units: out,
            first: start,
            plan,
        }
    }

    /// The pooled features `[batch][channels]` of `input` (the frozen prefix's output, or the
    /// normalised images when these units start at the stem), and what the backward pass needs.
    pub fn forward(&self, input: &FeatureMap) -> (Vec<f32>, Activations) {
        let per_image = input.height * input.width * input.channels;
        let results: Vec<ImageResult> = input
            .values
            .par_chunks(per_image)
            .map(|values| {
                let mut x = Image {
                    data: Buffer::from_slice(values),
                    height: input.height,
                    width: input.width,
                    channels: input.channels,
                };
                let mut tapes = Vec::with_capacity(self.units.len());
                for unit in &self.units {
                    let (out, tape) = unit.forward(x);
                    tapes.push(tape);
                    x = out;
                }
                let mut pooled = vec![0.0; x.channels];
                kernels::mean_over_pixels(&x.data, x.height * x.width, &mut pooled);
                (pooled, tapes, (x.height, x.width))
            })
            .collect();
        let mut pooled = Vec::new();
        let mut tapes = Vec::new();
        for (p, t, shape) in results {
            pooled.extend(p);
            tapes.push((t, shape));
        }
        (pooled, Activations { tapes })
    }

    /// The gradient of every trainable parameter of these units, in burn's layout, given the
    /// gradient of the loss with respect to the pooled features (`[batch][channels]`).
    pub fn backward(&self, activations: Activations, d_pooled: &[f32]) -> Vec<ParamGradient> {
        let images = activations.tapes.len().max(1);
        let channels = d_pooled.len() / images;
        // One accumulator per group of images (each is the size of the parameters), and fixed
        // groups added in order: the same sums, bit for bit, on every run with these threads.
        let per_group = images.div_ceil(rayon::current_num_threads());
        let mut work: Vec<_> = activations
            .tapes
            .into_iter()
            .zip(d_pooled.chunks(channels))
            .collect();
        let mut groups = Vec::new();
        while !work.is_empty() {
            let rest = work.split_off(work.len().min(per_group));
            groups.push(std::mem::replace(&mut work, rest));
        }
        let sums = groups
            .into_par_iter()
            .map(|group| {
                let mut sums = Sums::zeroed(&self.plan.sizes);
                for ((tapes, (h, w)), dp) in group {
                    self.backward_image(&tapes, (h, w), dp, &mut sums);
                }
                sums.flush_all();
                sums
            })
            .collect::<Vec<_>>()
            .into_iter()
            .reduce(Sums::add)
            .unwrap_or_else(|| Sums::zeroed(&self.plan.sizes));
        let mut gradients = Vec::new();
        for unit in &self.units {
            unit.gradients(&sums, &mut gradients);
        }
        sums.recycle();
        let mut out = Vec::new();
        for (slot, values, layout) in gradients {
            let slot = &self.plan.slots[slot];
            if !slot.trainable {
                continue;
            }
            let values = match layout {
                Layout::Same => values,
                Layout::Transposed { rows, cols } => {
                    let mut t = vec![0.0; values.len()];
                    for r in 0..rows {
                        for c in 0..cols {
                            t[c * rows + r] = values[r * cols + c];
                        }
                    }
                    t
                }
                Layout::Dense { taps, cin, cout } => {
                    let mut t = vec![0.0; values.len()];
                    for tap in 0..taps {
                        for i in 0..cin {
                            for o in 0..cout {
                                t[(o * cin + i) * taps + tap] = values[(tap * cin + i) * cout + o];
                            }
                        }
                    }
                    t
                }
            };
            out.push(ParamGradient {
                id: slot.id,
                values: TensorData::new(values, slot.shape.clone()),
            });
        }
        out
    }

    /// Adds one image's contributions to `sums`, from the gradient of its pooled features.
    fn backward_image(&self, tapes: &[Tape], (h, w): (usize, usize), dp: &[f32], sums: &mut Sums) {
        let channels = dp.len();
        let mut d = Buffer::new(h * w * channels);
        let share: Vec<f32> = dp.iter().map(|v| v / (h * w) as f32).collect();
        for row in d.chunks_exact_mut(channels) {
            row.copy_from_slice(&share);
        }
        for (i, (unit, tape)) in self.units.iter().zip(tapes).enumerate().rev() {
            // The first unit's input gradient is not needed: nothing before it trains.
            match unit.backward(tape, d, sums, i > 0) {
                Some(next) => d = next,
                None => break,
            }
        }
    }

    /// The first unit these train.
    pub fn first_unit(&self) -> usize {
        self.first
    }
}

/// An Xception block's trainable form (see [`xception_rep`] for where its ReLUs go).
fn xception_block(block: &XceptionBlock, plan: &mut Plan) -> TrainUnit {
    let (layers, pool_stride) = xception_rep(block);
    let reps = layers
        .iter()
        .map(|l| {
            let depthwise =
                ConvBn::new(l.depthwise, None, Act::Identity, plan).with_input_relu(l.input_relu);
            let pointwise = ConvBn::new(l.pointwise, l.batch_norm, relu_if(l.output_relu), plan);
            (depthwise, pointwise)
        })
        .collect();
    let skip = block
        .skip
        .as_ref()
        .map(|conv| ConvBn::new(conv, block.skipbn.as_ref(), Act::Identity, plan));
    TrainUnit::XceptionBlock {
        reps,
        pool_stride,
        skip,
    }
}
