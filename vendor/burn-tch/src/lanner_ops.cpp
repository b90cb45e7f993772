// Lanner's patch (see LANNER.md): ATen operations that tch 0.22 does not wrap, called from
// src/ops/module.rs. Tensors cross as tch does it: pointers to heap-allocated at::Tensor.
#include <ATen/ATen.h>

#include <array>
#include <cstdio>
#include <exception>

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

// The gradients of batch normalisation with the batch's own statistics (training mode) for
// the output gradient `grad_output`: the input's, the weight's and the bias', from ATen's
// native_batch_norm_backward. `mean` and `variance` are the batch's (biased variance). The
// weight, the mean and the inverse standard deviation go in as float, the mixed-precision
// case PyTorch's kernels support for bf16 and f16 inputs; the weight and bias gradients come
// back in the weight's type. Writes three new tensors to `out`, or returns false with the
// reason in `error`.
bool lanner_batch_norm_train_backward(const at::Tensor *grad_output, const at::Tensor *input,
                                      const at::Tensor *weight, const at::Tensor *mean,
                                      const at::Tensor *variance, double epsilon,
                                      at::Tensor **out, char *error, size_t error_size) {
  try {
    const auto weight_type = weight->scalar_type();
    auto inverse_std = (variance->to(at::kFloat) + epsilon).rsqrt();
    auto gradients = at::native_batch_norm_backward(
        *grad_output, *input, weight->to(at::kFloat), std::nullopt, std::nullopt,
        mean->to(at::kFloat), inverse_std, true, epsilon, {true, true, true});
    out[0] = new at::Tensor(std::get<0>(gradients));
    out[1] = new at::Tensor(std::get<1>(gradients).to(weight_type));
    out[2] = new at::Tensor(std::get<2>(gradients).to(weight_type));
    return true;
  } catch (const std::exception &e) {
    std::snprintf(error, error_size, "%s", e.what());
    return false;
  }
}
}
