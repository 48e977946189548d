// SPDX-License-Identifier: Apache-2.0
// What a training loop tallies: correct predictions, and running sums kept
// on the device so an epoch never waits for the host.
#pragma once

#include <cmath>
#include <cstdint>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

namespace detail {
template <class T>
void check_logits(const char* what, TensorView<const T> logits, std::int64_t rows) {
  MIXPREC_CHECK(logits.shape().rank() == 2 && logits.shape()[1] > 0, what, ": logits shape ", logits.shape(),
                ", expected [batch, classes]");
  MIXPREC_CHECK(rows >= 0 && rows <= logits.shape()[0], what, ": rows = ", rows, ", must be in [0, ",
                logits.shape()[0], "]");
}
}  // namespace detail

/// Host: how many of the first `rows` rows of logits [batch, classes] have
/// their largest entry (the first one on ties; NaN and -inf never count as
/// largest) at the row's label (host int32).
template <class T>
std::int64_t count_correct(TensorView<const T> logits, const std::int32_t* labels, std::int64_t rows) {
  detail::check_logits("count_correct", logits, rows);
  MIXPREC_CHECK(logits.device().is_cpu(), "count_correct: logits on ", logits.device(),
                "; device logits take the overload with a device counter");
  const std::int64_t classes = logits.shape()[1];
  std::int64_t correct = 0;
  for (std::int64_t b = 0; b < rows; ++b) {
    const T* z = logits.data() + b * classes;
    float best = -INFINITY;
    std::int64_t at = classes;
    for (std::int64_t c = 0; c < classes; ++c) {
      if (to_float(z[c]) > best) {
        best = to_float(z[c]);
        at = c;
      }
    }
    correct += at == labels[b];
  }
  return correct;
}

/// Device: the same count for device logits and labels, added to *correct
/// (a device int64) when the kernel runs; asynchronous.
template <class T>
void count_correct(TensorView<const T> logits, const std::int32_t* labels, std::int64_t rows,
                   std::int64_t* correct, const Context& ctx = {}) {
  detail::check_logits("count_correct", logits, rows);
  MIXPREC_CHECK(logits.device().is_cuda(), "count_correct: logits on ", logits.device(),
                "; host logits take the overload that returns the count");
  MIXPREC_CHECK(labels && correct, "count_correct: labels and correct must point to device memory");
  mixprec::detail::require_nn_device_ops("count_correct", logits.device())
      .count_correct(dtype_of<T>, logits.data(), labels, rows, logits.shape()[1], correct, ctx.stream);
}

/// Device: *sum += *value (device floats) when the kernel runs, e.g. an
/// epoch's loss total from the loss kernel's output; asynchronous.
inline void accumulate(Device device, float* sum, const float* value, const Context& ctx = {}) {
  MIXPREC_CHECK(device.is_cuda(), "accumulate: device = ", device, ", must be a CUDA device (on the host, add)");
  MIXPREC_CHECK(sum && value, "accumulate: sum and value must point to device memory");
  mixprec::detail::require_nn_device_ops("accumulate", device).accumulate(sum, value, ctx.stream);
}

}  // namespace nn
MIXPREC_NAMESPACE_END
