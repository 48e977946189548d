// SPDX-License-Identifier: Apache-2.0
// Layer<T>: what Sequential runs. Activations are row-major tensors of T
// whose first dimension is the batch; a layer reads views of buffers that
// Sequential owns and writes its parameters' gradients into buffers it owns.
#pragma once

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/optim/param.hpp"
#include "mixprec/tensor/shape.hpp"
#include "mixprec/tensor/tensor_view.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

namespace detail {
/// Before a layer allocates anything on `device`: a CUDA build with the
/// kernels linked, and a usable device; the error names `what`.
inline void check_layer_device(const std::string& what, Device device) {
  if (!device.is_cuda()) return;
  if (built_with_cuda()) mixprec::detail::require_nn_device_ops(what.c_str(), device);
  mixprec::detail::require_usable(device, what.c_str());
}
}  // namespace detail

/// Where and how a pass runs: the stream of every launch on a device.
struct Context {
  stream_t stream = nullptr;
};

template <class T>
class Layer {
 public:
  virtual ~Layer() = default;
  Layer() = default;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  /// "Linear(784, 1024, relu)" and the like, for errors and summaries.
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  /// The output shape for input shape `in` ([batch, ...]); throws, naming
  /// the layer and the shape, when the layer cannot take it.
  virtual Shape output_shape(const Shape& in) const = 0;
  /// y = layer(x), shapes as output_shape says.
  virtual void forward(TensorView<const T> x, TensorView<T> y, const Context& ctx) = 0;
  /// From dy = dLoss/dy (loss-scaled): writes the parameters' gradients
  /// (overwriting them) and, unless dx is empty, dx = dLoss/dx. x and y are
  /// the forward's input and output.
  virtual void backward(TensorView<const T> x, TensorView<const T> y, TensorView<const T> dy, TensorView<T> dx,
                        const Context& ctx) = 0;
  /// The trainable parameters (weight and gradient views), named prefix + name.
  virtual std::vector<optim::Param> parameters(const std::string& prefix) { (void)prefix; return {}; }

  /// The element type the layer computes in and keeps its parameters and
  /// their gradients in: T, unless Sequential::set_precision moved it
  /// (nn/precision.hpp's Recast then wraps a copy of it in another type).
  virtual DType compute_dtype() const { return dtype_of<T>; }
  /// A copy of this layer whose element type is U: the same configuration
  /// and device, the parameters rounded to nearest even into U, zero
  /// gradients, no forward state. Null (the default) for a layer that
  /// cannot be copied: Linear and Conv2d can. Sequential::set_precision
  /// uses these; call them through copy_as<U>().
  virtual std::unique_ptr<Layer<half>> copy_as_half() const { return nullptr; }
  virtual std::unique_ptr<Layer<bfloat16>> copy_as_bfloat16() const { return nullptr; }
  virtual std::unique_ptr<Layer<float>> copy_as_float() const { return nullptr; }
  template <class U>
  std::unique_ptr<Layer<U>> copy_as() const {
    if constexpr (std::is_same_v<U, half>) {
      return copy_as_half();
    } else if constexpr (std::is_same_v<U, bfloat16>) {
      return copy_as_bfloat16();
    } else {
      static_assert(std::is_same_v<U, float>, "Layer::copy_as: U must be half, bfloat16 or float");
      return copy_as_float();
    }
  }
};

}  // namespace nn
MIXPREC_NAMESPACE_END
