//! The folded network against the burn modules it was folded from, on random weights with
//! random BatchNorm statistics (so that folding changes every weight).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};

use super::{FoldedBackbone, TileUnit, TrainableUnits};
use crate::backbone::Backbone;
use crate::registry::{IMAGENET, INCEPTION, Normalization};
use crate::{MobileNetV3Config, MobileNetV3Size, Xception, XceptionConfig};

/// Scales every tensor (weights, BatchNorm scale, shift and statistics) by a factor in
/// 0.7..1.3 and shifts it by up to ±0.02: running variances stay positive. Its own random
/// stream (tests run in parallel and share the device's).
struct Perturb(u64);

impl Perturb {
    fn uniform(&mut self, low: f32, high: f32) -> f32 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        low + (high - low) * ((z >> 40) as f32 / (1u64 << 24) as f32)
    }

    fn tensor<const D: usize>(&mut self, shape: [usize; D], low: f32, high: f32) -> Tensor<D> {
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| self.uniform(low, high))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Device::flex())
    }
}

impl ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            let shape = t.dims();
            let require_grad = t.is_require_grad();
            let device = t.device();
            // A model's random initial values come from burn's random stream, which the tests
            // running beside this one draw from too: each run would check other weights. So
            // every tensor that is not a constant is first drawn again from this stream:
            // convolution filters as burn draws them (uniform, ±1/√fan-in), other tensors
            // (squeeze-excite biases) within ±0.1.
            let values = t.to_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            let t = if values.iter().all(|&v| v == values[0]) {
                t
            } else {
                let bound = if D == 4 {
                    (1.0 / (shape[1] * shape[2] * shape[3]) as f32).sqrt()
                } else {
                    0.1
                };
                // (On `t`'s autodiff device, which `t · 0` keeps.)
                t.mul_scalar(0.0) + self.tensor(shape, -bound, bound).to_device(&device)
            };
            let scale = self.tensor(shape, 0.7, 1.3).to_device(&device);
            let shift = self.tensor(shape, -0.02, 0.02).to_device(&device);
            let value = (t * scale + shift).detach();
            if require_grad {
                value.require_grad()
            } else {
                value
            }
        })
    }
}

const SEED: u64 = 11;

fn pixels(batch: usize, size: usize, seed: u64) -> Tensor<4> {
    Perturb(seed).tensor([batch, 3, size, size], 0.0, 255.0)
}

/// max |a − b| over max |b|: the error relative to the output's scale.
fn relative_error(got: Tensor<4>, want: Tensor<4>) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let scale: f32 = want.clone().abs().max().into_scalar();
    let error: f32 = (got - want).abs().max().into_scalar();
    error / scale.max(1e-12)
}

fn check_prefixes(
    backbone: &Backbone,
    size: usize,
    normalization: &Normalization,
    prefixes: &[usize],
) {
    let device = Device::flex();
    let images = pixels(2, size, 7);
    for &units in prefixes {
        let folded = FoldedBackbone::new(backbone, units);
        assert_eq!(folded.unit_count(), units);
        let got = folded
            .forward(images.clone(), normalization)
            .to_tensor(&device);
        let want = backbone.forward_units(normalization.apply(images.clone()), 0..units);
        let error = relative_error(got, want);
        assert!(error <= 1e-4, "{units} units: relative error {error}");
    }
}

#[test]
fn folded_mobilenet_v3_matches_the_burn_modules() {
    let device = Device::flex();
    for (size, width) in [(MobileNetV3Size::Large, 1.0), (MobileNetV3Size::Small, 0.5)] {
        let model = MobileNetV3Config::new(size)
            .with_width_multiplier(width)
            .init(&device)
            .map(&mut Perturb(SEED));
        let backbone = Backbone::MobileNetV3(model);
        let all = backbone.unit_count();
        check_prefixes(&backbone, 64, &IMAGENET, &[1, 2, 5, all / 2, all]);
    }
}

#[test]
fn folded_xception_matches_the_burn_modules() {
    let device = Device::flex();
    let backbone = Backbone::Xception(XceptionConfig::new().init(&device).map(&mut Perturb(SEED)));
    check_prefixes(&backbone, 71, &INCEPTION, &[1, 3, 4, 6, 14, 16]);
}

/// The whole network with its convolutions in bf16 against f32: as close as bf16's 8 bits
/// of mantissa allow, on the emulated tiles (any CPU) and on AMX where there is one. (The
/// two differ by more than f32 rounding: a sum in another order rounds to another bf16 input
/// for the next layer now and then, and the network carries that on.)
#[test]
fn bf16_products_stay_close_to_f32() {
    let device = Device::flex();
    let xception = XceptionConfig::new().init(&device).map(&mut Perturb(SEED));
    let cases = [
        (perturbed_small_mobilenet(), 64, &IMAGENET),
        (Backbone::Xception(xception), 71, &INCEPTION),
    ];
    let units = [Some(TileUnit::Emulated), TileUnit::detect()];
    for (backbone, size, normalization) in &cases {
        // One image runs its products on the thread pool, two one image per thread.
        for batch in [1, 2] {
            let images = pixels(batch, *size, 9);
            let f32_map = FoldedBackbone::whole(backbone).forward(images.clone(), normalization);
            let want = f32_map.to_tensor(&device);
            for unit in units.into_iter().flatten() {
                let folded = FoldedBackbone::whole(backbone).in_bf16(unit);
                let got = folded
                    .forward(images.clone(), normalization)
                    .to_tensor(&device);
                let error = relative_error(got, want.clone());
                assert!(
                    error > 0.0 && error <= 0.03,
                    "{unit:?}, batch {batch}: relative error {error}"
                );
            }
        }
    }
}

/// MobileNetV3-Small 0.5 on the CPU, every tensor perturbed.
fn perturbed_small_mobilenet() -> Backbone {
    let model = MobileNetV3Config::new(MobileNetV3Size::Small)
        .with_width_multiplier(0.5)
        .init(&Device::flex())
        .map(&mut Perturb(SEED));
    Backbone::MobileNetV3(model)
}

#[test]
fn pooled_features_are_the_mean_of_the_feature_map() {
    let backbone = perturbed_small_mobilenet();
    let folded = FoldedBackbone::whole(&backbone);
    // One image: fewer images than threads, so the products use the thread pool.
    for batch in [1, 3] {
        let images = pixels(batch, 96, 8);
        let pooled = folded.pooled(images.clone(), &IMAGENET);
        let want = crate::global_average_pool(backbone.forward(IMAGENET.apply(images)));
        let error = relative_error(pooled.unsqueeze_dim(2), want.unsqueeze_dim(2));
        assert!(error <= 1e-4, "batch {batch}: relative error {error}");
    }
}

#[test]
fn units_split_the_forward_pass_and_own_every_tensor() {
    let device = Device::flex();
    for backbone in [
        Backbone::MobileNetV3(MobileNetV3Config::new(MobileNetV3Size::Small).init(&device)),
        Backbone::Xception(XceptionConfig::new().init(&device)),
    ] {
        let all = backbone.unit_count();
        let size = if matches!(backbone, Backbone::Xception(_)) {
            71
        } else {
            64
        };
        let x = pixels(1, size, 9).div_scalar(255.0);
        let whole = backbone.forward(x.clone());
        let split = backbone.forward_units(backbone.forward_units(x, 0..all / 2), all / 2..all);
        assert!(relative_error(split, whole) == 0.0);
        let mut seen = vec![false; all];
        for tensor in burn::store::ModuleSnapshot::collect(
            &backbone,
            None,
            Some(Box::new(burn::store::BurnToPyTorchAdapter)),
            true,
        ) {
            let unit = backbone
                .unit_of(&tensor.name)
                .unwrap_or_else(|| panic!("{} has no unit", tensor.name));
            seen[unit] = true;
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
        assert_eq!(backbone.unit_of("classifier.weight"), None);
    }
}

/// Every parameter's gradient (by id) after `loss.backward()`.
struct GradientsOf<'a>(&'a burn::tensor::Gradients, Vec<(ParamId, Vec<f32>)>);

impl ModuleVisitor for GradientsOf<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = param.val().grad(self.0) {
            let values = grad
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap();
            self.1.push((param.id, values));
        }
    }
}

#[test]
fn trainable_units_give_autodiffs_gradients() {
    let device = Device::flex();
    let autodiff = device.clone().autodiff();
    let model = MobileNetV3Config::new(MobileNetV3Size::Small)
        .with_width_multiplier(0.5)
        .with_frozen_batch_norm(true)
        .init(&autodiff)
        .map(&mut Perturb(SEED));
    check_gradients(&Backbone::MobileNetV3(model), 64, &IMAGENET, &[0, 4], 0.0);
}

/// Xception with frozen BatchNorm on the autodiff device, every tensor perturbed.
fn perturbed_xception() -> Xception {
    XceptionConfig::new()
        .with_frozen_batch_norm(true)
        .init(&Device::flex().autodiff())
        .map(&mut Perturb(SEED))
}

#[test]
fn trainable_xception_units_give_autodiffs_gradients() {
    let model = perturbed_xception();
    // From block 1 (no leading ReLU), from block 11 (the seed's fine-tune-layer 100), the exit
    // convolutions alone, and the whole network.
    let backbone = Backbone::Xception(model);
    check_gradients(&backbone, 71, &INCEPTION, &[2, 12, 14], 1e-3);
    // The whole network (the dense convolutions' input gradients): kinks from all 16 units
    // add up in the stem's gradients, so a looser bound.
    check_gradients(&backbone, 71, &INCEPTION, &[0], 1e-2);
}

fn check_gradients(
    backbone: &Backbone,
    size: usize,
    normalization: &Normalization,
    starts: &[usize],
    // 0: every gradient within 1e-4 of its own size; else within this of max(its size, 1% of
    // the largest gradient) (see below).
    kink_tolerance: f32,
) {
    let device = Device::flex();
    let autodiff = device.clone().autodiff();
    let all = backbone.unit_count();
    let images = pixels(2, size, 12);
    for &start in starts {
        let input = FoldedBackbone::new(backbone, start).forward(images.clone(), normalization);
        let trainable = TrainableUnits::new(backbone, start..all);
        let (pooled, activations) = trainable.forward(&input);
        let weights = Perturb(13).tensor([2, pooled.len() / 2], -1.0, 1.0);
        let d_pooled = weights
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let ours = trainable.backward(activations, &d_pooled);

        // burn: the same units with autodiff, loss = Σ pooled · weights.
        let x = input.to_tensor(&autodiff);
        let burn_pooled = crate::global_average_pool(backbone.forward_units(x, start..all));
        let pooled_error = relative_error(
            Tensor::<2>::from_data(
                TensorData::new(pooled.clone(), [2, pooled.len() / 2]),
                &device,
            )
            .unsqueeze_dim(2),
            burn_pooled.clone().inner().unsqueeze_dim(2),
        );
        assert!(
            pooled_error <= 1e-4,
            "from unit {start}: pooled features {pooled_error}"
        );
        let loss = (burn_pooled * weights.autodiff()).sum();
        let grads = loss.backward();
        let mut visitor = GradientsOf(&grads, Vec::new());
        backbone.visit(&mut visitor);
        let want: std::collections::HashMap<ParamId, Vec<f32>> = visitor.1.into_iter().collect();
        assert!(!ours.is_empty());
        let largest = ours
            .iter()
            .flat_map(|g| want[&g.id].iter())
            .fold(0.0f32, |m, v| m.max(v.abs()));
        for gradient in &ours {
            let got = gradient.values.clone().try_into_vec::<f32>().unwrap();
            let want = &want[&gradient.id];
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // Xception's depthwise and BatchNorm gradients sum thousands of terms that nearly
            // cancel, through ReLUs and max-pools everywhere: where the two forward passes
            // round an activation to the other side of a kink (0, a pooling tie), a term
            // changes. There the error is measured against at least 1% of the model's largest
            // gradient.
            let (reference, relative) = if kink_tolerance > 0.0 {
                (scale.max(1e-2 * largest), kink_tolerance)
            } else {
                (scale, 1e-4)
            };
            let error = got
                .iter()
                .zip(want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                error <= relative * reference.max(1e-6),
                "from unit {start}: gradient {:?} {:?} off by {error} (scale {scale}, \
                 largest gradient {largest})",
                gradient.id,
                gradient.values.shape()
            );
        }
        // Every parameter of the trained units got one (all require gradients here).
        let expected = burn::store::ModuleSnapshot::collect(
            backbone,
            None,
            Some(Box::new(burn::store::BurnToPyTorchAdapter)),
            true,
        )
        .into_iter()
        .filter(|t| !crate::batch_norm::is_running_statistic(&t.name))
        .filter(|t| backbone.unit_of(&t.name).is_some_and(|u| u >= start))
        .count();
        assert_eq!(ours.len(), expected, "from unit {start}");
    }
}

#[test]
fn frozen_layers_of_the_first_trained_block_change_no_other_gradient() {
    let model = perturbed_xception();
    // The seed's fine-tune-layer 100: block 11's first separable convolution and its
    // BatchNorm (timm `block11.rep.1`, `rep.2`) stay frozen; its backward pass is skipped.
    let mut partial = model.clone();
    for i in [1, 2] {
        partial.block11.rep[i] = partial.block11.rep[i].clone().no_grad();
    }
    let block11 = 12;
    let input = FoldedBackbone::new(&Backbone::Xception(model.clone()), block11)
        .forward(pixels(2, 71, 12), &INCEPTION);
    let gradients = |model| {
        let backbone = Backbone::Xception(model);
        let trainable = TrainableUnits::new(&backbone, block11..backbone.unit_count());
        let (pooled, activations) = trainable.forward(&input);
        let d_pooled: Vec<f32> = (0..pooled.len()).map(|i| (i % 7) as f32 - 3.0).collect();
        trainable.backward(activations, &d_pooled)
    };
    let all = gradients(model);
    let some = gradients(partial);
    // Two weights and the BatchNorm's γ and β get none.
    assert_eq!(some.len(), all.len() - 4);
    for gradient in &some {
        let same = all
            .iter()
            .find(|g| g.id == gradient.id)
            .expect("trained in both");
        assert_eq!(gradient.values, same.values, "{:?}", gradient.id);
    }
}

#[test]
fn the_backward_pass_keeps_one_tensor_per_convolution_and_each_units_input() {
    // MobileNetV3-Large at 224 (the paper's table 1): per unit its input, and per expanding
    // and depthwise convolution one tensor of its output's size (hard swish's input or
    // ReLU's output); the stem and the last convolution keep their pre-activation. Nothing
    // else: not hard swish's output, the gated values, or the projection's input.
    let px = |side: usize, channels: usize| side * side * channels;
    let mut want = px(224, 3) + px(112, 16); // stem
    want += px(112, 16) + px(112, 16); // depthwise-separable block
    // (input side, input channels, expanded channels, stride) of the inverted residuals.
    let blocks = [
        (112, 16, 64, 2),
        (56, 24, 72, 1),
        (56, 24, 72, 2),
        (28, 40, 120, 1),
        (28, 40, 120, 1),
        (28, 40, 240, 2),
        (14, 80, 200, 1),
        (14, 80, 184, 1),
        (14, 80, 184, 1),
        (14, 80, 480, 1),
        (14, 112, 672, 1),
        (14, 112, 672, 2),
        (7, 160, 960, 1),
        (7, 160, 960, 1),
    ];
    for (side, cin, expanded, stride) in blocks {
        want += px(side, cin) + px(side, expanded) + px(side / stride, expanded);
    }
    want += px(7, 160) + px(7, 960); // the last convolution
    let backbone = Backbone::MobileNetV3(
        MobileNetV3Config::new(MobileNetV3Size::Large)
            .with_frozen_batch_norm(true)
            .init(&Device::flex()),
    );
    let input = FoldedBackbone::new(&backbone, 0).forward(pixels(2, 224, 1), &IMAGENET);
    let trainable = TrainableUnits::new(&backbone, 0..backbone.unit_count());
    let (_, activations) = trainable.forward(&input);
    assert_eq!(activations.bytes_per_image(), want * size_of::<f32>());
}
