// Lanner's patch (see LANNER.md): ATen operations that tch 0.22 does not wrap, called from
// src/ops/module.rs. Tensors cross as tch does it: pointers to heap-allocated at::Tensor.
#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <array>
#include <cstdio>
#include <exception>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {
// `tensor` in `type`: itself when it already is, without a call through the dispatcher.
at::Tensor in_type(const at::Tensor &tensor, at::ScalarType type) {
  return tensor.scalar_type() == type ? tensor : tensor.to(type);
}
} // namespace

extern "C" {

// The gradients of a 2-D convolution for the output gradient `grad_output`, from one call
// of ATen's convolution_backward (cuDNN's backward-data and backward-filter kernels on NVIDIA
// GPUs, as PyTorch's autograd runs them): the input's, the weight's and the bias' (a sum
// over the batch and both spatial dimensions), each only where `needed` says so (one not
// computed is returned as nullptr). Writes three results to `out`, or returns false with the
// reason in `error`.
bool lanner_conv2d_backward(const at::Tensor *grad_output, const at::Tensor *input,
                            const at::Tensor *weight, const int64_t *stride,
                            const int64_t *padding, const int64_t *dilation, int64_t groups,
                            const bool *needed, at::Tensor **out, char *error,
                            size_t error_size) {
  try {
    const std::array<int64_t, 2> no_output_padding{0, 0};
    const std::vector<int64_t> bias_sizes{weight->size(0)};
    auto gradients = at::convolution_backward(
        *grad_output, *input, *weight, at::OptionalIntArrayRef(bias_sizes),
        at::IntArrayRef(stride, 2), at::IntArrayRef(padding, 2), at::IntArrayRef(dilation, 2),
        false, no_output_padding, groups, {needed[0], needed[1], needed[2]});
    auto result = [](const at::Tensor &tensor) {
      return tensor.defined() ? new at::Tensor(tensor) : static_cast<at::Tensor *>(nullptr);
    };
    out[0] = result(std::get<0>(gradients));
    out[1] = result(std::get<1>(gradients));
    out[2] = result(std::get<2>(gradients));
    return true;
  } catch (const std::exception &e) {
    std::snprintf(error, error_size, "%s", e.what());
    return false;
  }
}

// The gradients of batch normalisation for the output gradient `grad_output`: the input's,
// the weight's and the bias', from ATen's native_batch_norm_backward, each only where
// `needed` says so (an output not computed is returned as nullptr). `statistics` says what
// `mean` and `spread` are:
// - 0: fixed statistics, the mean and variance (the running ones, as in PyTorch's eval
//   mode), which the output depends on only through the normalisation;
// - 1: the batch's own mean and biased variance.
// The weight and the statistics go in as float, the mixed-precision case PyTorch's kernels
// support for bf16 and f16 inputs; the weight and bias gradients come back in the weight's
// type. Writes three results to `out`, or returns false with the reason in `error`.
bool lanner_batch_norm_backward(const at::Tensor *grad_output, const at::Tensor *input,
                                const at::Tensor *weight, const at::Tensor *mean,
                                const at::Tensor *spread, double epsilon, int64_t statistics,
                                const bool *needed, at::Tensor **out, char *error,
                                size_t error_size) {
  try {
    const auto weight_type = weight->scalar_type();
    const auto mean_f = in_type(*mean, at::kFloat);
    const auto spread_f = in_type(*spread, at::kFloat);
    const auto weight_f = in_type(*weight, at::kFloat);
    const std::array<bool, 3> mask{needed[0], needed[1], needed[2]};
    // With fixed statistics the saved ones are empty but defined, as native_batch_norm
    // returns them in eval mode: the CUDA kernels for channels-last inputs assert they are
    // defined, then take the running statistics because they are empty.
    const auto unsaved = at::empty({0}, mean_f.options());
    auto gradients =
        statistics == 0
            ? at::native_batch_norm_backward(*grad_output, *input, weight_f, mean_f, spread_f,
                                             unsaved, unsaved, false, epsilon, mask)
            : at::native_batch_norm_backward(
                  *grad_output, *input, weight_f, std::nullopt, std::nullopt, mean_f,
                  (spread_f + epsilon).rsqrt(), true, epsilon,
                  mask);
    auto result = [](const at::Tensor &tensor, std::optional<at::ScalarType> type) {
      if (!tensor.defined()) {
        return static_cast<at::Tensor *>(nullptr);
      }
      return new at::Tensor(type ? in_type(tensor, *type) : tensor);
    };
    out[0] = result(std::get<0>(gradients), std::nullopt);
    out[1] = result(std::get<1>(gradients), weight_type);
    out[2] = result(std::get<2>(gradients), weight_type);
    return true;
  } catch (const std::exception &e) {
    std::snprintf(error, error_size, "%s", e.what());
    return false;
  }
}

// Batch normalisation while training, as PyTorch's BatchNorm2d in train mode runs it: the
// input normalised with the batch's own statistics, and copies of the running statistics
// moved toward them by `momentum` (the variance unbiased). With `kernels` 0, by the kernels
// PyTorch's `batch_norm` chooses (ATen's _batch_norm_impl_index: cuDNN's where PyTorch uses
// them, else ATen's own); with 1, by ATen's own native_batch_norm. The weight and bias go in
// the running statistics' type (float: the mixed-precision case for bf16 and f16 inputs).
// Writes six results to `out`: the output, the batch mean and inverse standard deviation,
// the new running mean and variance, and what the backward pass needs besides
// (lanner_batch_norm_training_backward): cuDNN's reserve space (bytes) where cuDNN ran, else
// an empty float tensor. Returns false with the reason in `error`.
bool lanner_batch_norm_training(const at::Tensor *input, const at::Tensor *weight,
                                const at::Tensor *bias, const at::Tensor *running_mean,
                                const at::Tensor *running_var, double momentum,
                                double epsilon, int64_t kernels, at::Tensor **out, char *error,
                                size_t error_size) {
  try {
    const auto type = running_mean->scalar_type();
    auto new_mean = running_mean->clone();
    auto new_var = running_var->clone();
    const auto weight_t = in_type(*weight, type);
    const auto bias_t = in_type(*bias, type);
    at::Tensor output, mean, inverse_std;
    at::Tensor saved = at::empty({0}, input->options().dtype(at::kFloat));
    if (kernels == 0) {
      auto results = at::_batch_norm_impl_index(*input, weight_t, bias_t, new_mean, new_var,
                                                true, momentum, epsilon,
                                                at::globalContext().userEnabledCuDNN());
      const auto impl = std::get<4>(results);
      if (impl == 1) {
        const auto &reserve = std::get<3>(results);
        saved = reserve.defined() ? reserve : at::empty({0}, input->options().dtype(at::kByte));
      } else if (impl != 0) {
        throw std::runtime_error("batch_norm chose kernels Lanner does not handle (index " +
                                 std::to_string(impl) + ")");
      }
      output = std::get<0>(results);
      mean = std::get<1>(results);
      inverse_std = std::get<2>(results);
    } else {
      auto results = at::native_batch_norm(*input, weight_t, bias_t, new_mean, new_var, true,
                                           momentum, epsilon);
      output = std::get<0>(results);
      mean = std::get<1>(results);
      inverse_std = std::get<2>(results);
    }
    out[0] = new at::Tensor(output);
    out[1] = new at::Tensor(mean);
    out[2] = new at::Tensor(inverse_std);
    out[3] = new at::Tensor(new_mean);
    out[4] = new at::Tensor(new_var);
    out[5] = new at::Tensor(saved);
    return true;
  } catch (const std::exception &e) {
    std::snprintf(error, error_size, "%s", e.what());
    return false;
  }
}

// The gradients of lanner_batch_norm_training for the output gradient `grad_output`, by the
// kernels its forward pass ran (cuDNN's when `saved` is its reserve space, in bytes; else
// ATen's native_batch_norm_backward), from the batch mean and inverse standard deviation it
// returned and the same `epsilon`: the input's, the weight's and the bias', each only where
// `needed` says so (an output not asked for is returned as nullptr). The weight and bias
// gradients come back in the weight's type. Returns false with the reason in `error`.
bool lanner_batch_norm_training_backward(const at::Tensor *grad_output,
                                         const at::Tensor *input, const at::Tensor *weight,
                                         const at::Tensor *mean, const at::Tensor *inverse_std,
                                         const at::Tensor *saved, double epsilon,
                                         const bool *needed, at::Tensor **out, char *error,
                                         size_t error_size) {
  try {
    const auto weight_type = weight->scalar_type();
    const auto impl = saved->scalar_type() == at::kByte ? 1 : 0;
    auto gradients = at::_batch_norm_impl_index_backward(
        impl, *input, *grad_output, in_type(*weight, at::kFloat), std::nullopt, std::nullopt,
        in_type(*mean, at::kFloat), in_type(*inverse_std, at::kFloat), true, epsilon,
        {needed[0], needed[1], needed[2]}, *saved);
    auto result = [](bool wanted, const at::Tensor &tensor,
                     std::optional<at::ScalarType> type) {
      if (!wanted || !tensor.defined()) {
        return static_cast<at::Tensor *>(nullptr);
      }
      return new at::Tensor(type ? in_type(tensor, *type) : tensor);
    };
    out[0] = result(needed[0], std::get<0>(gradients), std::nullopt);
    out[1] = result(needed[1], std::get<1>(gradients), weight_type);
    out[2] = result(needed[2], std::get<2>(gradients), weight_type);
    return true;
  } catch (const std::exception &e) {
    std::snprintf(error, error_size, "%s", e.what());
    return false;
  }
}

// A copy of the host tensor `host` (in pinned memory) to GPU `device_index` that overlaps the
// work queued there: it runs on a stream of its own (one per device and host thread, from
// libtorch's pool), and the stream that was current waits for it before anything queued on it
// later. Nothing waits on the host. The copy is allocated on the copy stream and marked as
// used by the current one, so the caching allocator does not hand its memory out again
// before the current stream is done with it. Returns a new tensor, or nullptr with the reason
// in `error`.
at::Tensor *lanner_copy_to_gpu(const at::Tensor *host, int64_t device_index, char *error,
                               size_t error_size) {
  try {
    const c10::Device device(c10::DeviceType::CUDA,
                             static_cast<c10::DeviceIndex>(device_index));
    const c10::impl::VirtualGuardImpl backend(device.type());
    const c10::Stream current = backend.getStream(device);
    thread_local std::map<int64_t, c10::Stream> copy_streams;
    auto copy_stream = copy_streams.find(device_index);
    if (copy_stream == copy_streams.end()) {
      copy_stream =
          copy_streams.emplace(device_index, backend.getStreamFromGlobalPool(device)).first;
    }
    at::Tensor copy;
    {
      const c10::StreamGuard on_copy_stream(copy_stream->second);
      copy = host->to(device, /*non_blocking=*/true);
    }
    c10::Event copied(device.type());
    copied.record(copy_stream->second);
    copied.block(current);
    copy.record_stream(current);
    return new at::Tensor(copy);
  } catch (const std::exception &e) {
    std::snprintf(error, error_size, "%s", e.what());
    return nullptr;
  }
}
}
