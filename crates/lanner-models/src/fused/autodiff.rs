//! [`FusedOps`] under burn's `Autodiff`: each operation runs forward on the inner backend and
//! records a backward step that calls [`FusedBackward`] (the hand-written gradients), in
//! place of the several steps burn records for the composite layers.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend};
use burn::tensor::ops::ConvOptions;

use super::{FusedBackward, FusedOps, batch_norm_training_on};
use crate::activation::Activation;
use crate::sync_batch_norm::Exchange;

/// Hands each tracked parent of a backward step its gradient, where there is one.
macro_rules! register {
    ($parents:expr, $gradients:expr, $grads:expr) => {
        for (parent, gradient) in $parents.into_iter().zip($gradients) {
            if let (Some(parent), Some(gradient)) = (parent, gradient) {
                $grads.register::<B>(parent.id, gradient);
            }
        }
    };
}

impl<B: FusedOps + FusedBackward, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn batch_norm_training(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        epsilon: f64,
        momentum: f64,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let inputs = [x, weight, bias, running_mean, running_var];
        tracked_batch_norm_training::<B, C>(inputs, epsilon, momentum, None)
    }

    fn batch_norm_training_activated(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        running_mean: FloatTensor<Self>,
        running_var: FloatTensor<Self>,
        epsilon: f64,
        momentum: f64,
        activation: Activation,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let inputs = [x, weight, bias, running_mean, running_var];
        tracked_batch_norm_training::<B, C>(inputs, epsilon, momentum, Some(activation))
    }

    fn convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        convolution::<B, C>(x, weight, None, options)
    }

    fn biased_convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        convolution::<B, C>(x, weight, Some(bias), options)
    }

    fn frozen_batch_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FrozenBatchNorm;

        impl<B: FusedBackward> Backward<B, 3> for FrozenBatchNorm {
            /// The input, the weight, the statistics and ε.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                f64,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight, mean, variance, epsilon) = ops.state;
                let needed = ops.parents.each_ref().map(Option::is_some);
                let gradients =
                    B::frozen_batch_norm_backward(x, weight, mean, variance, epsilon, grad, needed);
                register!(ops.parents, gradients, grads);
            }
        }

        let (mean, variance) = (mean.into_primitive(), variance.into_primitive());
        match FrozenBatchNorm
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let output = B::frozen_batch_norm(
                    x.clone(),
                    weight.clone(),
                    bias.into_primitive(),
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                );
                prep.finish((x, weight, mean, variance, epsilon), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_batch_norm(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                mean,
                variance,
                epsilon,
            )),
        }
    }

    fn hard_swish(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, Unary::HardSwish)
    }

    fn hard_sigmoid_gate(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, Unary::HardSigmoidGate)
    }

    fn global_average_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, Unary::GlobalAveragePool)
    }

    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        unary::<B, C>(
            x,
            Unary::MaxPool {
                kernel,
                stride,
                padding,
            },
        )
    }

    fn gather_across_replicas(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let exchange = Exchange::next();
        match GatherAcrossReplicas
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = exchange.gather::<B>(x.into_primitive());
                prep.finish(exchange, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(exchange.gather::<B>(x.into_primitive())),
        }
    }
}

/// The backward pass of [`FusedOps::gather_across_replicas`]: each replica's output feeds its
/// own loss, so the input's gradient is the sum over the replicas of its row's gradient.
#[derive(Debug)]
struct GatherAcrossReplicas;

impl<B: Backend> Backward<B, 1> for GatherAcrossReplicas {
    type State = Exchange;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        // Every replica takes part in the sum, whether or not its input needs the gradient:
        // the others wait for it.
        let summed = ops.state.gather_backward::<B>(grad);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            grads.register::<B>(parent.id, summed);
        }
    }
}

/// [`FusedOps::batch_norm_training`] under autodiff, followed by `activation` where there is
/// one ([`FusedOps::batch_norm_training_activated`]); the backward pass is the matching one of
/// [`FusedBackward`]. `inputs`: `x`, the weight, the bias, the running mean and variance.
#[allow(clippy::type_complexity)]
fn tracked_batch_norm_training<B: FusedOps + FusedBackward, C: CheckpointStrategy>(
    inputs: [FloatTensor<Autodiff<B, C>>; 5],
    epsilon: f64,
    momentum: f64,
    activation: Option<Activation>,
) -> (
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
) {
    #[derive(Debug)]
    struct BatchNormTraining;

    /// What the backward pass takes: the input, the weight, the batch mean and inverse
    /// standard deviation, what else the backend saved, ε, and the activation with the bias
    /// (which recomputes the activation's input).
    type State<B> = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
        Option<(Activation, FloatTensor<B>)>,
    );

    impl<B: FusedBackward> Backward<B, 3> for BatchNormTraining {
        type State = State<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<B>(&ops.node);
            let (x, weight, mean, inverse_std, saved, epsilon, activated) = ops.state;
            let needed = ops.parents.each_ref().map(Option::is_some);
            let gradients = match activated {
                None => B::batch_norm_training_backward(
                    x,
                    weight,
                    mean,
                    inverse_std,
                    saved,
                    epsilon,
                    grad,
                    needed,
                ),
                Some((activation, bias)) => B::batch_norm_training_activated_backward(
                    x,
                    weight,
                    bias,
                    mean,
                    inverse_std,
                    saved,
                    epsilon,
                    activation,
                    grad,
                    needed,
                ),
            };
            register!(ops.parents, gradients, grads);
        }
    }

    let forward = |x, weight, bias, running_mean, running_var| {
        let inputs = [x, weight, bias, running_mean, running_var];
        batch_norm_training_on::<B>(inputs, epsilon, momentum, activation)
    };
    let [x, weight, bias, running_mean, running_var] = inputs;
    let running_mean = running_mean.into_primitive();
    let running_var = running_var.into_primitive();
    let untracked = <Autodiff<B, C> as AutodiffBackend>::from_inner;
    let prepared = BatchNormTraining
        .prepare::<C>([x.node(), weight.node(), bias.node()])
        .compute_bound()
        .stateful();
    let (x, weight, bias) = (
        x.into_primitive(),
        weight.into_primitive(),
        bias.into_primitive(),
    );
    match prepared {
        OpsKind::Tracked(prep) => {
            let kept_bias = activation.map(|activation| (activation, bias.clone()));
            let (output, mean, inverse_std, running_mean, running_var, saved) =
                forward(x.clone(), weight.clone(), bias, running_mean, running_var);
            let state = (
                x,
                weight,
                mean.clone(),
                inverse_std.clone(),
                saved.clone(),
                epsilon,
                kept_bias,
            );
            (
                prep.finish(state, output),
                untracked(mean),
                untracked(inverse_std),
                untracked(running_mean),
                untracked(running_var),
                untracked(saved),
            )
        }
        OpsKind::UnTracked(prep) => {
            let (output, mean, inverse_std, running_mean, running_var, saved) =
                forward(x, weight, bias, running_mean, running_var);
            (
                prep.finish(output),
                untracked(mean),
                untracked(inverse_std),
                untracked(running_mean),
                untracked(running_var),
                untracked(saved),
            )
        }
    }
}

/// [`FusedOps::convolution`] (without `bias`) or [`FusedOps::biased_convolution`] under
/// autodiff, with [`FusedBackward::convolution_backward`] as its backward.
fn convolution<B: FusedOps + FusedBackward, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    bias: Option<FloatTensor<Autodiff<B, C>>>,
    options: ConvOptions<2>,
) -> FloatTensor<Autodiff<B, C>> {
    /// With a bias (`N` = 3: input, weight, bias) or without (`N` = 2).
    #[derive(Debug)]
    struct Convolution<const N: usize>;

    impl<B: FusedBackward, const N: usize> Backward<B, N> for Convolution<N> {
        /// The input, the weight, the bias and the options.
        type State = (
            FloatTensor<B>,
            FloatTensor<B>,
            Option<FloatTensor<B>>,
            ConvOptions<2>,
        );

        fn backward(
            self,
            ops: Ops<Self::State, N>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<B>(&ops.node);
            let (x, weight, bias, options) = ops.state;
            let needed = [0, 1, 2].map(|i| ops.parents.get(i).is_some_and(Option::is_some));
            let gradients = B::convolution_backward(x, weight, bias, grad, options, needed);
            register!(ops.parents, gradients, grads);
        }
    }

    fn forward<B: FusedOps>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<B> {
        match bias {
            Some(bias) => B::biased_convolution(x, weight, bias, options),
            None => B::convolution(x, weight, options),
        }
    }

    macro_rules! convolve {
        ($parents:literal, $nodes:expr) => {
            match Convolution::<$parents>
                .prepare::<C>($nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (x, weight) = (x.into_primitive(), weight.into_primitive());
                    let bias = bias.map(|bias| bias.into_primitive());
                    let (input, kernel) = (x.clone(), weight.clone());
                    let output = forward::<B>(input, kernel, bias.clone(), options.clone());
                    prep.finish((x, weight, bias, options), output)
                }
                OpsKind::UnTracked(prep) => prep.finish(forward::<B>(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.map(|bias| bias.into_primitive()),
                    options,
                )),
            }
        };
    }

    match bias.as_ref().map(|bias| bias.node()) {
        Some(bias_node) => convolve!(3, [x.node(), weight.node(), bias_node]),
        None => convolve!(2, [x.node(), weight.node()]),
    }
}

/// The one-input operations of [`FusedOps`], with their settings.
#[derive(Clone, Copy, Debug)]
enum Unary {
    HardSwish,
    HardSigmoidGate,
    GlobalAveragePool,
    MaxPool {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    },
}

impl Unary {
    fn forward<B: FusedOps>(self, x: FloatTensor<B>) -> FloatTensor<B> {
        match self {
            Self::HardSwish => B::hard_swish(x),
            Self::HardSigmoidGate => B::hard_sigmoid_gate(x),
            Self::GlobalAveragePool => B::global_average_pool(x),
            Self::MaxPool {
                kernel,
                stride,
                padding,
            } => B::max_pool(x, kernel, stride, padding),
        }
    }

    fn backward<B: FusedBackward>(self, x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        match self {
            Self::HardSwish => B::hard_swish_backward(x, grad),
            Self::HardSigmoidGate => B::hard_sigmoid_gate_backward(x, grad),
            Self::GlobalAveragePool => B::global_average_pool_backward(x, grad),
            Self::MaxPool {
                kernel,
                stride,
                padding,
            } => B::max_pool_backward(x, kernel, stride, padding, grad),
        }
    }
}

impl<B: FusedBackward> Backward<B, 1> for Unary {
    /// The input.
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            grads.register::<B>(parent.id, Unary::backward::<B>(self, ops.state, grad));
        }
    }
}

/// `operation` on `x` under autodiff, keeping `x` for the backward pass.
fn unary<B: FusedOps + FusedBackward, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    operation: Unary,
) -> FloatTensor<Autodiff<B, C>> {
    match operation
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = x.into_primitive();
            let output = operation.forward::<B>(x.clone());
            prep.finish(x, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(operation.forward::<B>(x.into_primitive())),
    }
}
