use burn::tensor::activation::{self, relu};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Tensor, TensorData};

use super::*;

/// A MobileNetV3 block's tail on `device`, forward and backward, with the fused layers or
/// burn's composites: BatchNorm with frozen statistics, hard swish, then squeeze-excitation
/// (global average pool, a 1x1 convolution with bias, ReLU, hard sigmoid, the product).
/// Returns the output and the gradients of the input (when it requires one), BatchNorm's
/// weight and bias, and the convolution's weight and bias.
fn layers(device: &Device, fused: bool, input_gradient: bool) -> Vec<Vec<f32>> {
    let device = device.clone().autodiff();
    // Irregular values across the activations' pieces, never exactly ±3.
    let values = |n: usize, seed: usize, spread: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((((i * 7919 + seed * 104729) % 1009) as f32) / 1009.0 - 0.5) * spread)
            .collect()
    };
    let shape = [2, 3, 4, 5];
    let x = Tensor::<4>::from_data(TensorData::new(values(120, 1, 9.0), shape), &device);
    let x = if input_gradient { x.require_grad() } else { x };
    let channel = |seed, spread, offset: f32| {
        let v: Vec<f32> = values(3, seed, spread).iter().map(|v| v + offset).collect();
        Tensor::<1>::from_data(TensorData::new(v, [3]), &device)
    };
    let weight = channel(2, 2.0, 1.0).require_grad();
    let bias = channel(3, 2.0, 0.0).require_grad();
    let (mean, variance) = (channel(4, 2.0, 0.0), channel(5, 1.0, 1.0));
    let conv_weight = TensorData::new(values(9, 7, 8.0), [3, 3, 1, 1]);
    let conv_weight = Tensor::<4>::from_data(conv_weight, &device).require_grad();
    let conv_bias = channel(8, 2.0, 0.0).require_grad();
    let epsilon = 1e-3;
    let hidden = if fused {
        let normalised = frozen_batch_norm(
            x.clone(),
            weight.clone(),
            bias.clone(),
            mean,
            variance,
            epsilon,
        );
        hard_swish(normalised)
    } else {
        let scale = weight.clone() / variance.add_scalar(epsilon).sqrt();
        let shift = bias.clone() - mean * scale.clone();
        let normalised = x.clone() * scale.reshape([1, 3, 1, 1]) + shift.reshape([1, 3, 1, 1]);
        activation::hard_swish(normalised)
    };
    let squeezed = if fused {
        global_average_pool(hidden.clone())
    } else {
        hidden.clone().mean_dims(&[2, 3])
    };
    let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    let gate = relu(conv2d(
        squeezed,
        conv_weight.clone(),
        Some(conv_bias.clone()),
        options,
    ));
    let gate = if fused {
        hard_sigmoid(gate)
    } else {
        activation::hard_sigmoid(gate, 1.0 / 6.0, 0.5)
    };
    let output = hidden * gate;
    let weights = Tensor::<4>::from_data(TensorData::new(values(120, 6, 2.0), shape), &device);
    let gradients = (output.clone() * weights).sum().backward();
    let read = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
    let read_1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
    let mut results = vec![
        read(output.inner()),
        read_1(weight.grad(&gradients).unwrap()),
        read_1(bias.grad(&gradients).unwrap()),
        read(conv_weight.grad(&gradients).unwrap()),
        read_1(conv_bias.grad(&gradients).unwrap()),
    ];
    match x.grad(&gradients) {
        Some(gradient) => results.push(read(gradient)),
        None => assert!(!input_gradient, "no gradient for the input"),
    }
    results
}

/// A training step's convolution and BatchNorm on `device`, forward and backward, with
/// the fused layers or burn's own: BatchNorm with batch statistics (updating running
/// statistics), a strided convolution with asymmetric padding and a bias, then a
/// depthwise convolution without bias. Returns the output, the new running mean and variance, and
/// the gradients of every weight and (when it requires one) of the input.
fn training_layers(device: &Device, fused: bool, input_gradient: bool) -> Vec<Vec<f32>> {
    use burn::tensor::module::batch_norm_train;

    let device = device.clone().autodiff();
    let values = |n: usize, seed: usize, spread: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((((i * 7919 + seed * 104729) % 1009) as f32) / 1009.0 - 0.5) * spread)
            .map(|v| v + offset)
            .collect()
    };
    let tensor_4 = |shape: [usize; 4], seed, spread| {
        let n = shape.iter().product();
        Tensor::<4>::from_data(
            TensorData::new(values(n, seed, spread, 0.0), shape),
            &device,
        )
    };
    let tensor_1 = |n: usize, seed, spread, offset| {
        Tensor::<1>::from_data(
            TensorData::new(values(n, seed, spread, offset), [n]),
            &device,
        )
    };
    let x = tensor_4([2, 3, 7, 6], 1, 4.0);
    let x = if input_gradient { x.require_grad() } else { x };
    let bn_weight = tensor_1(3, 4, 1.0, 1.0).require_grad();
    let bn_bias = tensor_1(3, 5, 1.0, 0.0).require_grad();
    let (running_mean, running_var) = (tensor_1(3, 6, 1.0, 0.0), tensor_1(3, 7, 1.0, 1.0));
    let conv_weight = tensor_4([4, 3, 3, 3], 2, 1.0).require_grad();
    let conv_bias = tensor_1(4, 3, 1.0, 0.0).require_grad();
    let depthwise = tensor_4([4, 1, 3, 3], 8, 1.0).require_grad();
    let strided = ConvOptions::new_with_padding([2, 2], [(1, 0), (1, 0)], [1, 1], 1);
    let grouped = ConvOptions::new([1, 1], [1, 1], [1, 1], 4);
    let (epsilon, momentum) = (1e-3, 0.1);
    let (output, mean, var) = if fused {
        let (normalised, mean, var) = batch_norm_training(
            x.clone(),
            bn_weight.clone(),
            bn_bias.clone(),
            running_mean,
            running_var,
            epsilon,
            momentum,
            None,
        );
        let bias = Some(conv_bias.clone());
        let hidden = super::conv2d(normalised, conv_weight.clone(), bias, strided);
        (
            super::conv2d(hidden, depthwise.clone(), None, grouped),
            mean,
            var,
        )
    } else {
        let count = (2 * 7 * 6) as f64;
        let batch = batch_norm_train(x.clone(), bn_weight.clone(), bn_bias.clone(), epsilon);
        let mean =
            running_mean.mul_scalar(1.0 - momentum) + batch.mean.detach().mul_scalar(momentum);
        let var = running_var.mul_scalar(1.0 - momentum)
            + batch
                .variance
                .detach()
                .mul_scalar(momentum * count / (count - 1.0));
        let bias = Some(conv_bias.clone());
        let hidden = conv2d(batch.output, conv_weight.clone(), bias, strided);
        (conv2d(hidden, depthwise.clone(), None, grouped), mean, var)
    };
    let weights = tensor_4(output.dims(), 9, 2.0);
    let gradients = (output.clone() * weights).sum().backward();
    let read = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
    let read_1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
    let mut results = vec![
        read(output.inner()),
        read_1(mean.inner()),
        read_1(var.inner()),
        read(conv_weight.grad(&gradients).unwrap()),
        read_1(conv_bias.grad(&gradients).unwrap()),
        read_1(bn_weight.grad(&gradients).unwrap()),
        read_1(bn_bias.grad(&gradients).unwrap()),
        read(depthwise.grad(&gradients).unwrap()),
    ];
    match x.grad(&gradients) {
        Some(gradient) => results.push(read(gradient)),
        None => assert!(!input_gradient, "no gradient for the input"),
    }
    results
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of results");
    for (index, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}, result {index}");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-5 * scale,
                "{what}, result {index}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn fused_layers_match_burn_composites_forward_and_backward() {
    assert!(available(&Device::flex()) && available(&Device::flex().autodiff()));
    for input_gradient in [true, false] {
        let want = layers(&Device::flex(), false, input_gradient);
        let got = layers(&Device::flex(), true, input_gradient);
        assert_close(&got, &want, &format!("input gradient {input_gradient}"));
    }
}

#[test]
fn fused_training_batch_norm_and_convolution_match_burn_on_burn_flex() {
    for input_gradient in [true, false] {
        let want = training_layers(&Device::flex(), false, input_gradient);
        let got = training_layers(&Device::flex(), true, input_gradient);
        assert_close(&got, &want, &format!("input gradient {input_gradient}"));
    }
}

/// BatchNorm on batch statistics then `activation`, as one operation
/// ([`batch_norm_training`] with the activation) or as two, in `dtype`, followed by a 1x1
/// convolution so that the output gradient varies. Returns the output, the running
/// statistics, and the gradients of BatchNorm's weight and bias, of the convolution and
/// (when it requires one) of the input.
fn activated_batch_norm(
    activation: Activation,
    one_operation: bool,
    input_gradient: bool,
    dtype: DType,
) -> Vec<Vec<f32>> {
    let device = Device::flex().autodiff();
    let values = |n: usize, seed: usize, spread: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((((i * 7919 + seed * 104729) % 1009) as f32) / 1009.0 - 0.5) * spread)
            .map(|v| v + offset)
            .collect()
    };
    let tensor = |shape: Vec<usize>, seed, spread, offset| {
        let n = shape.iter().product();
        let data = TensorData::new(values(n, seed, spread, offset), shape);
        Tensor::<4>::from_data(data, &device).cast(dtype)
    };
    let vector = |n: usize, seed, spread, offset| {
        let data = TensorData::new(values(n, seed, spread, offset), [n]);
        Tensor::<1>::from_data(data, &device).cast(dtype)
    };
    let channels = 5;
    let x = tensor(vec![3, channels, 6, 7], 1, 6.0, 0.5);
    let x = if input_gradient { x.require_grad() } else { x };
    // Scales up to 3.5 and shifts of ±1.5: the normalised values reach past ±3, every
    // piece of hard swish.
    let weight = vector(channels, 2, 4.0, 1.5).require_grad();
    let bias = vector(channels, 3, 3.0, 0.0).require_grad();
    let running = || (vector(channels, 4, 1.0, 0.0), vector(channels, 5, 1.0, 1.0));
    let (running_mean, running_var) = running();
    let conv_weight = tensor(vec![4, channels, 1, 1], 6, 2.0, 0.0).require_grad();
    let (epsilon, momentum) = (1e-3, 0.1);
    let (normalised, mean, var) = batch_norm_training(
        x.clone(),
        weight.clone(),
        bias.clone(),
        running_mean,
        running_var,
        epsilon,
        momentum,
        one_operation.then_some(activation),
    );
    let activated = match one_operation {
        true => normalised,
        false => activation.forward(normalised),
    };
    let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    let output = super::conv2d(activated, conv_weight.clone(), None, options);
    let weights = tensor(output.dims().to_vec(), 7, 2.0, 0.0);
    let gradients = (output.clone() * weights).sum().backward();
    let floats = |data: TensorData| data.convert::<f32>().try_into_vec::<f32>().unwrap();
    let read = |t: Tensor<4>| floats(t.into_data());
    let read_1 = |t: Tensor<1>| floats(t.into_data());
    let mut results = vec![
        read(output.inner()),
        read_1(mean.inner()),
        read_1(var.inner()),
        read_1(weight.grad(&gradients).unwrap()),
        read_1(bias.grad(&gradients).unwrap()),
        read(conv_weight.grad(&gradients).unwrap()),
    ];
    match x.grad(&gradients) {
        Some(gradient) => results.push(read(gradient)),
        None => assert!(!input_gradient, "no gradient for the input"),
    }
    results
}

#[test]
fn batch_norm_training_activated_matches_batch_norm_then_the_activation() {
    assert!(activates_in_batch_norm(&Device::flex()));
    for activation in [Activation::Relu, Activation::HardSwish] {
        for input_gradient in [true, false] {
            let what = format!("{activation:?}, input gradient {input_gradient}");
            let run = |one, dtype| activated_batch_norm(activation, one, input_gradient, dtype);
            // f32: Lanner's loops (`crate::flex_layers`) against two operations.
            let got = run(true, DType::F32);
            assert_close(&got, &run(false, DType::F32), &what);
            // bf16: burn's composites (what the default bodies of `FusedOps` and
            // `FusedBackward` do), to bf16's precision.
            let (bf16, want) = (run(true, DType::BF16), run(false, DType::BF16));
            assert_eq!(bf16.len(), want.len(), "{what}, bf16");
            for (index, (a, b)) in bf16.iter().zip(&want).enumerate() {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 0.05 * scale,
                        "{what}, bf16, result {index}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn fused_layers_without_autodiff_match_burn_composites() {
    let device = Device::flex();
    let x = Tensor::<1>::from_data(
        TensorData::new((0..80).map(|i| i as f32 / 8.0 - 5.05).collect(), [80]),
        &device,
    );
    let read = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().unwrap();
    let got = [hard_swish(x.clone()), hard_sigmoid(x.clone())].map(read);
    let want = [
        activation::hard_swish(x.clone()),
        activation::hard_sigmoid(x.clone(), 1.0 / 6.0, 0.5),
    ]
    .map(read);
    assert_close(&got, &want, "hard swish and hard sigmoid");
    let x = x.reshape([2, 4, 2, 5]);
    let got = global_average_pool(x.clone())
        .into_data()
        .try_into_vec::<f32>();
    let want = x.mean_dims(&[2, 3]).into_data().try_into_vec::<f32>();
    assert_close(&[got.unwrap()], &[want.unwrap()], "global average pool");
}

#[test]
fn max_pool_matches_burns_forward_and_backward_on_burn_flex() {
    use burn::tensor::module::max_pool2d;
    use burn::tensor::ops::MaxPoolOptions;
    assert!(pools_directly(&Device::flex().autodiff()));
    let device = Device::flex().autodiff();
    // Xception's pool, (3, 2, 1), on an odd size; values with ties.
    let shape = [2, 3, 9, 7];
    let values: Vec<f32> = (0..378).map(|i| ((i * 37 % 7) as f32) - 3.0).collect();
    let run = |fused: bool| -> Vec<Vec<f32>> {
        let x =
            Tensor::<4>::from_data(TensorData::new(values.clone(), shape), &device).require_grad();
        let output = if fused {
            max_pool(x.clone(), [3, 3], [2, 2], [1, 1])
        } else {
            let options = MaxPoolOptions::new([3, 3])
                .with_stride([2, 2])
                .with_padding([1, 1]);
            max_pool2d(x.clone(), options)
        };
        let weights = Tensor::<4>::from_data(
            TensorData::new(
                (0..output.dims().iter().product::<usize>())
                    .map(|i| (i % 5) as f32 - 1.5)
                    .collect(),
                output.dims(),
            ),
            &device,
        );
        let gradients = (output.clone() * weights).sum().backward();
        let read = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
        vec![read(output.inner()), read(x.grad(&gradients).unwrap())]
    };
    let (got, want) = (run(true), run(false));
    assert_eq!(got, want);
}

#[cfg(feature = "torch")]
#[test]
fn libtorch_kernels_match_burn_composites_on_burn_flex() {
    for input_gradient in [true, false] {
        let want = layers(&Device::flex(), false, input_gradient);
        let got = layers(&Device::libtorch(), true, input_gradient);
        assert_close(
            &got,
            &want,
            &format!("libtorch, input gradient {input_gradient}"),
        );
        let want = training_layers(&Device::flex(), false, input_gradient);
        let got = training_layers(&Device::libtorch(), true, input_gradient);
        let what = format!("libtorch training layers, input gradient {input_gradient}");
        assert_close(&got, &want, &what);
    }
}
