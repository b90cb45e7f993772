// Lanner's patch (see LANNER.md): ATen operations that tch 0.22 does not wrap, called from
// src/ops/module.rs. Tensors cross as tch does it: pointers to heap-allocated at::Tensor.
#include <ATen/ATen.h>

#include <array>
#include <cstdio>
#include <exception>
#include <optional>

extern "C" {

// One gradient of a 2-D convolution for the output gradient `grad_output`, from ATen's
// convolution_backward (cuDNN's backward-data or backward-filter kernels on NVIDIA GPUs):
// the input's when `which` is 0, the weight's when it is 1; nothing else is computed.
// Returns a new tensor, or nullptr with the reason in `error`.
at::Tensor *lanner_conv2d_backward(const at::Tensor *grad_output, const at::Tensor *input,
                                   const at::Tensor *weight, const int64_t *stride,
                                   const int64_t *padding, const int64_t *dilation,
                                   int64_t groups, int64_t which, char *error,
                                   size_t error_size) {
  try {
    const std::array<int64_t, 2> no_output_padding{0, 0};
    auto gradients = at::convolution_backward(
        *grad_output, *input, *weight, std::nullopt, at::IntArrayRef(stride, 2),
        at::IntArrayRef(padding, 2), at::IntArrayRef(dilation, 2), false, no_output_padding,
        groups, {which == 0, which == 1, false});
    return new at::Tensor(which == 0 ? std::get<0>(gradients) : std::get<1>(gradients));
  } catch (const std::exception &e) {
    std::snprintf(error, error_size, "%s", e.what());
    return nullptr;
  }
}

// The gradients of batch normalisation for the output gradient `grad_output`: the input's,
// the weight's and the bias', from ATen's native_batch_norm_backward, each only where
// `needed` says so (an output not computed is returned as nullptr). With `training`, `mean`
// and `variance` are the batch's own statistics (biased variance); without, they are fixed
// statistics (the running ones, as in PyTorch's eval mode), which the output depends on only
// through the normalisation. The weight and the statistics go in as float, the
// mixed-precision case PyTorch's kernels support for bf16 and f16 inputs; the weight and bias
// gradients come back in the weight's type. Writes three results to `out`, or returns false
// with the reason in `error`.
bool lanner_batch_norm_backward(const at::Tensor *grad_output, const at::Tensor *input,
                                const at::Tensor *weight, const at::Tensor *mean,
                                const at::Tensor *variance, double epsilon, bool training,
                                const bool *needed, at::Tensor **out, char *error,
                                size_t error_size) {
  try {
    const auto weight_type = weight->scalar_type();
    const auto mean_f = mean->to(at::kFloat);
    const auto variance_f = variance->to(at::kFloat);
    const std::array<bool, 3> mask{needed[0], needed[1], needed[2]};
    auto gradients =
        training ? at::native_batch_norm_backward(*grad_output, *input, weight->to(at::kFloat),
                                                  std::nullopt, std::nullopt, mean_f,
                                                  (variance_f + epsilon).rsqrt(), true, epsilon,
                                                  mask)
                 : at::native_batch_norm_backward(*grad_output, *input, weight->to(at::kFloat),
                                                  mean_f, variance_f, std::nullopt,
                                                  std::nullopt, false, epsilon, mask);
    auto result = [](const at::Tensor &tensor, std::optional<at::ScalarType> type) {
      if (!tensor.defined()) {
        return static_cast<at::Tensor *>(nullptr);
      }
      return new at::Tensor(type ? tensor.to(*type) : tensor);
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
}
