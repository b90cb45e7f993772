//! Batch normalisation with PyTorch's tensor names and a frozen-statistics mode.
//!
//! The seed calls its Keras backbone with `training=False`: every BatchNorm normalises with
//! its moving statistics and never updates them, while its scale and shift still train when
//! the layer is unfrozen. [`BatchNorm2dConfig::frozen_statistics`] is that mode.

use burn::config::Config;
use burn::module::{Module, Param, RunningState};
use burn::nn::Initializer;
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::activation::Activation;
use crate::precision::in_dtype;
use crate::sync_batch_norm::Share;

/// Whether `tensor` (a PyTorch state-dict name) is a BatchNorm running statistic: a buffer
/// that normalises but is never trained, which timm's parameter counts leave out.
pub fn is_running_statistic(tensor: &str) -> bool {
    tensor.ends_with(".running_mean") || tensor.ends_with(".running_var")
}

/// Configuration of a [`BatchNorm2d`].
#[derive(Config, Debug)]
pub struct BatchNorm2dConfig {
    /// Channels normalised.
    pub num_features: usize,
    /// Added to the variance; PyTorch's (and so timm's) default, where Keras uses 1e-3.
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Weight of the current batch in the running statistics (PyTorch's convention).
    #[config(default = 0.1)]
    pub momentum: f64,
    /// Always normalise with the running statistics and never update them, also when
    /// training; `weight` and `bias` stay trainable parameters.
    #[config(default = false)]
    pub frozen_statistics: bool,
}

/// Batch normalisation over `[batch, channels, height, width]` (Ioffe & Szegedy, "Batch
/// Normalization", 2015), named like PyTorch's `BatchNorm2d`: `weight`, `bias`,
/// `running_mean`, `running_var`, so timm checkpoints load without renaming.
#[derive(Module, Debug)]
pub struct BatchNorm2d {
    /// Per-channel scale (gamma).
    pub weight: Param<Tensor<1>>,
    /// Per-channel shift (beta).
    pub bias: Param<Tensor<1>>,
    /// Running mean, used at inference and in frozen mode.
    pub running_mean: RunningState<Tensor<1>>,
    /// Running unbiased variance (as PyTorch keeps it), used at inference and in frozen mode.
    pub running_var: RunningState<Tensor<1>>,
    /// Cleared by `valid()`/`freeze()`, like burn's own layers.
    pub training: Param<burn::module::Flag>,
    /// See [`BatchNorm2dConfig::epsilon`].
    pub epsilon: f64,
    /// See [`BatchNorm2dConfig::momentum`].
    pub momentum: f64,
    /// See [`BatchNorm2dConfig::frozen_statistics`].
    pub frozen_statistics: bool,
}

impl BatchNorm2dConfig {
    /// A layer with weight 1, bias 0, running mean 0 and running variance 1.
    pub fn init(&self, device: &Device) -> BatchNorm2d {
        let n = self.num_features;
        BatchNorm2d {
            weight: Initializer::Ones.init([n], device),
            bias: Initializer::Zeros.init([n], device),
            running_mean: RunningState::new(Tensor::zeros([n], device)),
            running_var: RunningState::new(Tensor::ones([n], device)),
            training: Param::from_bool(true),
            epsilon: self.epsilon,
            momentum: self.momentum,
            frozen_statistics: self.frozen_statistics,
        }
    }
}

impl BatchNorm2d {
    /// Normalise with batch statistics when training on an autodiff device (unless the
    /// statistics are frozen), with the running statistics otherwise.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_then(x, None)
    }

    /// `activation` on [`Self::forward`]'s output. With batch statistics on burn-flex this is
    /// one operation each way ([`crate::fused::batch_norm_training`]): the normalised values
    /// are neither written out nor kept for the backward pass.
    pub fn forward_activated(&self, x: Tensor<4>, activation: Activation) -> Tensor<4> {
        self.forward_then(x, Some(activation))
    }

    fn forward_then(&self, x: Tensor<4>, activation: Option<Activation>) -> Tensor<4> {
        let batch_statistics = self.uses_batch_statistics(&x);
        // The activation inside BatchNorm's own operation, where it can be.
        let inside = activation.filter(|_| {
            batch_statistics
                && crate::fused::activates_in_batch_norm(&x.device())
                && crate::sync_batch_norm::current_share().is_none()
        });
        let output = if batch_statistics {
            self.forward_batch_statistics(x, inside)
        } else {
            self.forward_running_statistics(x)
        };
        match activation {
            Some(activation) if inside.is_none() => activation.forward(output),
            _ => output,
        }
    }

    /// Whether [`Self::forward`] normalises `x` with its own statistics: when training on an
    /// autodiff device, unless the statistics are frozen.
    fn uses_batch_statistics(&self, x: &Tensor<4>) -> bool {
        !self.frozen_statistics && self.training.is_enabled() && x.device().is_autodiff()
    }

    /// The same layer with its statistics frozen (or not).
    pub fn with_frozen_statistics(mut self, frozen: bool) -> Self {
        self.frozen_statistics = frozen;
        self
    }

    fn forward_running_statistics(&self, x: Tensor<4>) -> Tensor<4> {
        let (device, dtype) = (x.device(), self.weight.val().dtype());
        // The statistics stay f32; they are used in the weight's type: the pass' own below
        // f32, except where BatchNorm takes f32 parameters with any input
        // (`crate::fused::batch_norm_in_f32`).
        let statistic =
            |state: &RunningState<Tensor<1>>| in_dtype(state.value().to_device(&device), dtype);
        let (mean, variance) = (statistic(&self.running_mean), statistic(&self.running_var));
        if crate::fused::available(&device) {
            // One operation each way, which the `torch` build runs as ATen's kernels.
            return crate::fused::frozen_batch_norm(
                x,
                self.weight.val(),
                self.bias.val(),
                mean,
                variance,
                self.epsilon,
            );
        }
        if !device.is_autodiff() {
            // One operation, which a backend may run as one kernel.
            return burn::tensor::module::batch_norm(
                x,
                self.weight.val(),
                self.bias.val(),
                mean,
                variance,
                self.epsilon,
            );
        }
        // On an autodiff device, as `x * scale + shift` with per-channel `scale` and `shift`:
        // two passes over the tensor forward and back, where burn's composite normalisation
        // records four (subtract, divide, multiply, add). The gradients of `weight` and `bias`
        // reach them through the small per-channel tensors.
        let channels = mean.dims()[0];
        let scale = self.weight.val() / variance.add_scalar(self.epsilon).sqrt();
        let shift = self.bias.val() - mean * scale.clone();
        x * scale.reshape([1, channels, 1, 1]) + shift.reshape([1, channels, 1, 1])
    }

    /// BatchNorm with batch statistics, and `activation` in the same operation (only where
    /// [`crate::fused::activates_in_batch_norm`] holds).
    fn forward_batch_statistics(&self, x: Tensor<4>, activation: Option<Activation>) -> Tensor<4> {
        let device = x.device();
        if let Some(share) = crate::sync_batch_norm::current_share() {
            return self.forward_whole_batch_statistics(x, share);
        }
        if crate::fused::available(&device) {
            // One operation each way, which the `torch` build runs as PyTorch's train-mode
            // BatchNorm does (cuDNN's or ATen's kernels, running statistics included), and
            // burn-flex with the activation.
            let (output, mean, var) = crate::fused::batch_norm_training(
                x,
                self.weight.val(),
                self.bias.val(),
                self.running_mean.value_sync().to_device(&device),
                self.running_var.value_sync().to_device(&device),
                self.epsilon,
                self.momentum,
                activation,
            );
            self.update_running_statistics(mean, var);
            return output;
        }
        let [batch, _, height, width] = x.dims();
        let count = (batch * height * width) as f64;
        let result = burn::tensor::module::batch_norm_train(
            x,
            self.weight.val(),
            self.bias.val(),
            self.epsilon,
        );
        self.take_batch_statistics(result.mean, result.variance, count);
        result.output
    }

    /// [`Self::forward_batch_statistics`] on one replica's rows of a batch split between
    /// data-parallel replicas, with the whole batch's statistics in f32 (PyTorch's
    /// `SyncBatchNorm`): each replica's per-channel mean and sum of squared deviations, and its
    /// count, are gathered from every replica in one exchange and combined with Chan, Golub
    /// and LeVeque's pairwise formula, which needs no subtraction of large sums; backward, the
    /// gathered statistics' gradients are added across the replicas in one exchange. The first
    /// replica updates the running statistics, which all replicas share.
    fn forward_whole_batch_statistics(&self, x: Tensor<4>, share: Share) -> Tensor<4> {
        let [rows, channels, height, width] = x.dims();
        let count = (share.batch_rows * height * width) as f64;
        let own_count = (rows * height * width) as f64;
        let (dtype, device) = (x.dtype(), x.device());
        let x = in_dtype(x, DType::F32);
        let per_channel = |t: Tensor<4>| t.sum_dim(0).sum_dim(2).sum_dim(3).reshape([channels]);
        let broadcast = |t: Tensor<1>| t.reshape([1, channels, 1, 1]);
        let own_mean = per_channel(x.clone()).div_scalar(own_count);
        let own_squares = per_channel((x.clone() - broadcast(own_mean.clone())).square());
        let own_count =
            Tensor::<1>::from_data(TensorData::new(vec![own_count as f32], [1]), &device);
        // `[replicas, 2 · channels + 1]`: each replica's mean, squared deviations and count.
        let gathered = crate::fused::gather_across_replicas(Tensor::cat(
            vec![own_mean, own_squares, own_count],
            0,
        ));
        let replicas = gathered.dims()[0];
        let column = |from: usize, to: usize| gathered.clone().slice([0..replicas, from..to]);
        let (means, squares) = (column(0, channels), column(channels, 2 * channels));
        let shares = column(2 * channels, 2 * channels + 1).div_scalar(count);
        let mean = (means.clone() * shares.clone()).sum_dim(0);
        // Σ squared deviations = Σ each replica's own + Σ count · (its mean − the mean)².
        let variance = squares.sum_dim(0).div_scalar(count)
            + ((means - mean.clone()).square() * shares).sum_dim(0);
        let (mean, variance) = (mean.reshape([channels]), variance.reshape([channels]));
        let weight = in_dtype(self.weight.val(), DType::F32);
        let bias = in_dtype(self.bias.val(), DType::F32);
        let scale = weight / variance.clone().add_scalar(self.epsilon).sqrt();
        let shift = bias - mean.clone() * scale.clone();
        let output = x * broadcast(scale) + broadcast(shift);
        if share.first {
            self.take_batch_statistics(mean, variance, count);
        }
        in_dtype(output, dtype)
    }

    /// Move the running statistics toward a batch's `mean` and biased `variance` over `count`
    /// values per channel by `momentum`. PyTorch keeps the unbiased variance in `running_var`;
    /// the statistics stay f32 also when the pass computes in bf16 or f16.
    fn take_batch_statistics(&self, mean: Tensor<1>, variance: Tensor<1>, count: f64) {
        let device = mean.device();
        let running_mean = self.running_mean.value_sync().to_device(&device);
        let running_var = self.running_var.value_sync().to_device(&device);
        let statistics = running_mean.dtype();
        let unbiased = if count > 1.0 {
            count / (count - 1.0)
        } else {
            1.0
        };
        let keep = 1.0 - self.momentum;
        let mean = running_mean.mul_scalar(keep)
            + in_dtype(mean.detach(), statistics).mul_scalar(self.momentum);
        let var = running_var.mul_scalar(keep)
            + in_dtype(variance.detach(), statistics).mul_scalar(self.momentum * unbiased);
        self.update_running_statistics(mean, var);
    }

    fn update_running_statistics(&self, mean: Tensor<1>, var: Tensor<1>) {
        self.running_mean.update(mean.detach());
        self.running_var.update(var.detach());
        // burn keeps an update pending until the next one; fold it in now, so that
        // inference, `valid()` and a saved model see the statistics of every batch.
        let _ = self.running_mean.value_sync();
        let _ = self.running_var.value_sync();
    }
}
