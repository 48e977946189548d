// SPDX-License-Identifier: Apache-2.0
// Losses that write the loss-scaled gradient of their input directly: the
// backward pass starts from scale * dLoss/dinput, in the input's precision,
// with no separate op to scale the loss. Means over the batch (cross-entropy)
// or over all elements (MSE), as torch's default reduction="mean".
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

namespace detail {
template <class T>
void check_loss_views(const char* what, TensorView<const T> input, TensorView<T> grad) {
  MIXPREC_CHECK(grad.shape() == input.shape(), what, ": gradient shape ", grad.shape(), " != input shape ",
                input.shape());
  MIXPREC_CHECK(grad.device() == input.device(), what, ": input on ", input.device(), ", gradient on ",
                grad.device());
}
}  // namespace detail

/// Host: softmax cross-entropy of logits [batch, classes] against labels
/// (host int32, each in [0, classes)). Returns the mean loss and writes
/// dlogits = scale * (softmax - onehot) / batch, rounded to T. Softmax in
/// float, max-subtracted; the log-sum-exp in double.
template <class T>
float softmax_cross_entropy(TensorView<const T> logits, const std::int32_t* labels, float scale,
                            TensorView<T> dlogits) {
  detail::check_loss_views("softmax_cross_entropy", logits, dlogits);
  MIXPREC_CHECK(logits.device().is_cpu(), "softmax_cross_entropy: logits on ", logits.device(),
                "; device tensors take the overload with device pointers");
  MIXPREC_CHECK(logits.shape().rank() == 2 && logits.shape()[0] > 0 && logits.shape()[1] > 0,
                "softmax_cross_entropy: logits shape ", logits.shape(), ", expected [batch, classes]");
  MIXPREC_CHECK(std::isfinite(scale) && scale > 0.0f, "softmax_cross_entropy: scale = ", scale,
                ", must be finite and > 0");
  const std::int64_t batch = logits.shape()[0], classes = logits.shape()[1];
  for (std::int64_t b = 0; b < batch; ++b) {
    MIXPREC_CHECK(labels[b] >= 0 && labels[b] < classes, "softmax_cross_entropy: labels[", b, "] = ", labels[b],
                  ", must be in [0, ", classes, ")");
  }
  double total = 0;
  const float g = scale / static_cast<float>(batch);
  for (std::int64_t b = 0; b < batch; ++b) {
    const T* z = logits.data() + b * classes;
    float m = to_float(z[0]);
    for (std::int64_t c = 1; c < classes; ++c) m = std::fmax(m, to_float(z[c]));
    double sum = 0;
    for (std::int64_t c = 0; c < classes; ++c) sum += std::exp(static_cast<double>(to_float(z[c]) - m));
    const double lse = static_cast<double>(m) + std::log(sum);
    total += lse - to_float(z[labels[b]]);
    for (std::int64_t c = 0; c < classes; ++c) {
      const float p = static_cast<float>(std::exp(static_cast<double>(to_float(z[c])) - lse));
      dlogits.data()[b * classes + c] = from_float<T>((p - (c == labels[b] ? 1.0f : 0.0f)) * g);
    }
  }
  return static_cast<float>(total / static_cast<double>(batch));
}

/// Device: the same on the GPU, nothing synchronised: *scale is read when
/// the kernel runs (DeviceGradScaler::scale_data()), the mean loss goes to
/// *loss and an out-of-range label sets *bad_label (both device memory).
template <class T>
void softmax_cross_entropy(TensorView<const T> logits, const std::int32_t* labels, const float* scale,
                           TensorView<T> dlogits, float* loss, int* bad_label, const Context& ctx = {}) {
  detail::check_loss_views("softmax_cross_entropy", logits, dlogits);
  MIXPREC_CHECK(logits.device().is_cuda(), "softmax_cross_entropy: logits on ", logits.device(),
                "; host tensors take the overload with a host scale");
  MIXPREC_CHECK(logits.shape().rank() == 2 && logits.shape()[0] > 0 && logits.shape()[1] > 0,
                "softmax_cross_entropy: logits shape ", logits.shape(), ", expected [batch, classes]");
  MIXPREC_CHECK(labels && scale && loss && bad_label,
                "softmax_cross_entropy: labels, scale, loss and bad_label must point to device memory");
  mixprec::detail::require_nn_device_ops("softmax_cross_entropy", logits.device())
      .softmax_cross_entropy(dtype_of<T>, logits.data(), labels, logits.shape()[0], logits.shape()[1], scale,
                             dlogits.data(), loss, bad_label, ctx.stream);
}

/// Host: mean squared error; returns mean((y - t)^2), writes
/// dy = scale * 2 (y - t) / n.
template <class T>
float mse(TensorView<const T> y, TensorView<const T> target, float scale, TensorView<T> dy) {
  detail::check_loss_views("mse", y, dy);
  MIXPREC_CHECK(target.shape() == y.shape(), "mse: target shape ", target.shape(), " != input shape ", y.shape());
  MIXPREC_CHECK(y.device().is_cpu() && target.device().is_cpu(), "mse: tensors on ", y.device(),
                "; device tensors take the overload with device pointers");
  MIXPREC_CHECK(y.numel() > 0, "mse: empty input");
  MIXPREC_CHECK(std::isfinite(scale) && scale > 0.0f, "mse: scale = ", scale, ", must be finite and > 0");
  const std::int64_t n = y.numel();
  const float g = 2.0f * scale / static_cast<float>(n);
  double total = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const float d = to_float(y.data()[i]) - to_float(target.data()[i]);
    total += static_cast<double>(d) * d;
    dy.data()[i] = from_float<T>(d * g);
  }
  return static_cast<float>(total / static_cast<double>(n));
}

/// Device: the same on the GPU; *scale read on the device, the loss to *loss.
template <class T>
void mse(TensorView<const T> y, TensorView<const T> target, const float* scale, TensorView<T> dy, float* loss,
         const Context& ctx = {}) {
  detail::check_loss_views("mse", y, dy);
  MIXPREC_CHECK(target.shape() == y.shape() && target.device() == y.device(), "mse: target ", target.shape(),
                " on ", target.device(), ", input ", y.shape(), " on ", y.device());
  MIXPREC_CHECK(y.device().is_cuda(), "mse: tensors on ", y.device(), "; host tensors take a host scale");
  MIXPREC_CHECK(y.numel() > 0, "mse: empty input");
  MIXPREC_CHECK(scale && loss, "mse: scale and loss must point to device memory");
  mixprec::detail::require_nn_device_ops("mse", y.device())
      .mse(dtype_of<T>, y.data(), target.data(), y.numel(), scale, dy.data(), loss, ctx.stream);
}

}  // namespace nn
MIXPREC_NAMESPACE_END
