//! Deterministic test inputs (tests run in parallel, and burn's seeded random stream is shared
//! between them), and the check that burn-flex's direct convolution gradients
//! (`crate::depthwise_conv`, `crate::dense_conv`) match burn's composite ones.

/// `count` values in -2..2 from `seed` (xorshift).
pub(crate) fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

/// Checks burn-flex's [`crate::fused::FusedBackward::convolution_backward`] against
/// [`crate::composite::convolution_backward`] on deterministic values: every gradient (input,
/// filter, bias) within 1e-4 of the largest of its tensor. `case` names the shape in failures.
pub(crate) fn check_convolution_gradients(
    x_shape: [usize; 4],
    weight_shape: [usize; 4],
    output_shape: [usize; 4],
    options: burn::tensor::ops::ConvOptions<2>,
    case: &str,
) {
    use crate::fused::FusedBackward;
    use burn::backend::Flex;
    use burn::tensor::TensorData;
    use burn_flex::FlexTensor;

    let tensor = |shape: [usize; 4], seed| {
        let count = shape.iter().product();
        FlexTensor::from_data(TensorData::new(values(count, seed), shape))
    };
    let filters = weight_shape[0];
    let (x, weight) = (tensor(x_shape, 1), tensor(weight_shape, 2));
    let bias = FlexTensor::from_data(TensorData::new(values(filters, 3), [filters]));
    let grad = tensor(output_shape, 4);
    let run = |direct: bool| {
        let (x, weight, bias, grad) = (x.clone(), weight.clone(), Some(bias.clone()), grad.clone());
        let (options, needed) = (options.clone(), [true, true, true]);
        if direct {
            <Flex as FusedBackward>::convolution_backward(x, weight, bias, grad, options, needed)
        } else {
            crate::composite::convolution_backward::<Flex>(x, weight, bias, grad, options, needed)
        }
    };
    let as_vec = |t: Option<FlexTensor>| t.unwrap().into_data().try_to_vec::<f32>().unwrap();
    let (got, want) = (run(true), run(false));
    for ((got, want), what) in got.into_iter().zip(want).zip(["input", "filter", "bias"]) {
        let (got, want) = (as_vec(got), as_vec(want));
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4 * scale,
                "{what} gradient, {case}: {g} vs {w}"
            );
        }
    }
}

/// Checks burn-flex's [`crate::fused::FusedOps::convolution`] and
/// [`crate::fused::FusedOps::biased_convolution`] (Lanner's own loops where it has them)
/// against burn-flex's `conv2d` on deterministic values: every output within 1e-5 of the
/// largest. `case` names the shape in failures.
pub(crate) fn check_convolution_forward(
    x_shape: [usize; 4],
    weight_shape: [usize; 4],
    output_shape: [usize; 4],
    options: &burn::tensor::ops::ConvOptions<2>,
    case: &str,
) {
    use crate::fused::FusedOps;
    use burn::backend::{Flex, TensorMetadata, ops::ModuleOps};
    use burn::tensor::TensorData;
    use burn_flex::FlexTensor;

    let tensor = |shape: &[usize], seed| {
        let count = shape.iter().product();
        FlexTensor::from_data(TensorData::new(values(count, seed), shape.to_vec()))
    };
    let (x, weight) = (tensor(&x_shape, 5), tensor(&weight_shape, 6));
    let bias = tensor(&weight_shape[..1], 7);
    let as_vec = |t: FlexTensor| {
        assert_eq!(t.shape().as_slice(), output_shape, "{case}");
        t.into_data().try_to_vec::<f32>().unwrap()
    };
    for bias in [Some(bias), None] {
        let (x, weight, options) = (x.clone(), weight.clone(), options.clone());
        let got = match bias.clone() {
            Some(b) => <Flex as FusedOps>::biased_convolution(
                x.clone(),
                weight.clone(),
                b,
                options.clone(),
            ),
            None => <Flex as FusedOps>::convolution(x.clone(), weight.clone(), options.clone()),
        };
        let want = <Flex as ModuleOps<Flex>>::conv2d(x, weight, bias, options);
        let (got, want) = (as_vec(got), as_vec(want));
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{case}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * scale, "forward, {case}: {g} vs {w}");
        }
    }
}
