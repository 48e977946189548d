// SPDX-License-Identifier: Apache-2.0
// Per-layer precision: Recast<T, U> runs a layer of element type U inside a
// network of T (casts at its boundary), which is how Sequential::set_precision
// moves one layer's compute from fp16 to bf16 or fp32 and leaves the rest.
#pragma once

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

/// Selects a layer's converting constructor: Linear<float>(ConvertTag{},
/// linear_half) is a copy of linear_half in float (Layer::copy_as).
struct ConvertTag {};

namespace detail {

/// dst = src rounded to nearest even into D (same shape), complete when
/// this returns. Host tensors directly; two tensors on one device by one
/// conversion kernel (nn::DeviceOps::convert, the host's bits) on the
/// legacy default stream, then waited for; otherwise through host staging
/// copies. For the rare copy of a layer's parameters, not for a training
/// step.
template <class S, class D>
void convert_tensor(TensorView<const S> src, TensorView<D> dst) {
  if constexpr (std::is_same_v<S, D>) {
    copy(src, dst);
  } else if (src.device().is_cpu() && dst.device().is_cpu()) {
    convert(src, dst);
  } else if (src.device().is_cuda() && src.device() == dst.device()) {
    mixprec::detail::require_same_shape(src.shape(), dst.shape(), "convert_tensor");
    mixprec::detail::require_usable(src.device(), "convert_tensor");
#if MIXPREC_WITH_CUDA
    mixprec::detail::DeviceGuard guard(src.device());
    mixprec::detail::require_nn_device_ops("convert_tensor", src.device())
        .convert(dtype_of<S>, src.data(), dtype_of<D>, dst.data(), src.numel(), nullptr);
    MIXPREC_CUDA_CHECK(cudaStreamSynchronize(nullptr));
#endif
  } else {
    Tensor<S> s(src.shape(), Device::cpu());
    Tensor<D> d(dst.shape(), Device::cpu());
    copy(src, s);
    convert(s, d);
    copy(d, dst);
  }
}

/// The boundary cast of a Recast: on a device one conversion kernel,
/// asynchronous on `stream` (nn::DeviceOps::convert); on the host a loop.
/// Both round to nearest even with the same bits.
template <class S, class D>
void cast(TensorView<const S> src, TensorView<D> dst, stream_t stream) {
  if (src.device().is_cuda()) {
    nn_device_ops().convert(dtype_of<S>, src.data(), dtype_of<D>, dst.data(), src.numel(), stream);
  } else {
    convert(src, dst);
  }
}

}  // namespace detail

/// A layer of element type U run inside a network of T. The network's
/// activations and their gradients stay in T; at the layer's boundary the
/// input x and the incoming gradient dy are converted to U, the layer runs in
/// U (its parameters and their gradients are U tensors, so the optimizer
/// sees U weights and U gradients), and its output y and outgoing gradient
/// dx are rounded to nearest even back into T.
///
/// Numerics, T = half, U = float: x and dy widen exactly, y and dx are
/// rounded once into half as a half layer rounds them (the CPU layers
/// compute in float either way), so the forward differs from the half
/// layer's only through the weights (fp32 instead of their fp16 rounding),
/// and the weight and bias gradients are never rounded to fp16: they cannot
/// overflow it or underflow it. An output beyond fp16's range still
/// overflows at the boundary: the move protects a layer's parameters and
/// their gradients, not the activations it hands to fp16 neighbours.
/// T = half, U = bfloat16: x and dy are rounded to bf16 (8 significant bits
/// instead of 11) on the way in; y and dx come back exactly where they are
/// in fp16's range.
///
/// On a device the casts are one conversion kernel each
/// (nn::DeviceOps::convert), queued on the context's stream with the
/// layer's own work: nothing synchronises, and after one eager step (which
/// allocates the U buffers) a step can be captured in a CUDA graph.
/// Memory: U copies of the layer's input, output and their gradients.
template <class T, class U>
class Recast final : public Layer<T> {
  static_assert(!std::is_same_v<T, U>, "Recast<T, T> converts nothing");

 public:
  explicit Recast(std::unique_ptr<Layer<U>> inner) : inner_(std::move(inner)) {
    MIXPREC_CHECK(inner_ != nullptr, "Recast: null layer");
    detail::check_layer_device(name(), inner_->device());
  }

  /// "Linear(784, 1024, relu) in float32".
  std::string name() const override { return inner_->name() + " in " + dtype_traits<U>::name; }
  Device device() const override { return inner_->device(); }
  Shape output_shape(const Shape& in) const override { return inner_->output_shape(in); }
  DType compute_dtype() const override { return dtype_of<U>; }
  /// The layer that computes (Linear<float>, ...), for its weights.
  Layer<U>& inner() { return *inner_; }
  const Layer<U>& inner() const { return *inner_; }

  void forward(TensorView<const T> x, TensorView<T> y, const Context& ctx) override {
    ensure(x_, x.shape());
    ensure(y_, y.shape());
    detail::cast(x, x_.view(), ctx.stream);
    inner_->forward(TensorView<const U>(x_.view()), y_.view(), ctx);
    detail::cast(TensorView<const U>(y_.view()), y, ctx.stream);
  }

  void backward(TensorView<const T> x, TensorView<const T> y, TensorView<const T> dy, TensorView<T> dx,
                const Context& ctx) override {
    MIXPREC_CHECK(x_.shape() == x.shape() && y_.shape() == y.shape(), name(),
                  "::backward: no forward of these shapes (x ", x.shape(), ", y ", y.shape(), ") ran before it");
    MIXPREC_CHECK(dy.shape() == y.shape(), name(), ": dy shape ", dy.shape(), " != output shape ", y.shape());
    MIXPREC_CHECK(dx.empty() || dx.shape() == x.shape(), name(), ": dx shape ", dx.shape(), " != input shape ",
                  x.shape());
    ensure(dy_, dy.shape());
    detail::cast(dy, dy_.view(), ctx.stream);
    if (!dx.empty()) ensure(dx_, dx.shape());
    inner_->backward(TensorView<const U>(x_.view()), TensorView<const U>(y_.view()), TensorView<const U>(dy_.view()),
                     dx.empty() ? TensorView<U>() : dx_.view(), ctx);
    if (!dx.empty()) detail::cast(TensorView<const U>(dx_.view()), dx, ctx.stream);
  }

  std::vector<optim::Param> parameters(const std::string& prefix) override { return inner_->parameters(prefix); }

  std::unique_ptr<Layer<half>> copy_as_half() const override { return inner_->copy_as_half(); }
  std::unique_ptr<Layer<bfloat16>> copy_as_bfloat16() const override { return inner_->copy_as_bfloat16(); }
  std::unique_ptr<Layer<float>> copy_as_float() const override { return inner_->copy_as_float(); }

 private:
  void ensure(Tensor<U>& t, const Shape& shape) {
    if (t.shape() != shape) t = Tensor<U>(shape, inner_->device());
  }

  std::unique_ptr<Layer<U>> inner_;
  Tensor<U> x_{Shape{0}}, y_{Shape{0}}, dy_{Shape{0}}, dx_{Shape{0}};
};

/// `layer` as a layer of T that computes in `dtype`: a copy of it in that
/// type wrapped in Recast, or, when dtype is T, a plain copy of it in T (a
/// moved layer moved back). Throws, naming the layer and the type, when the
/// layer cannot be copied (Layer::copy_as returns null) or when dtype is
/// not one of float16, bfloat16, float32.
template <class T>
std::unique_ptr<Layer<T>> copy_in_precision(const Layer<T>& layer, DType dtype) {
  const auto wrap = [&](auto tag) -> std::unique_ptr<Layer<T>> {
    using U = decltype(tag);
    std::unique_ptr<Layer<U>> copy = layer.template copy_as<U>();
    MIXPREC_CHECK(copy != nullptr, layer.name(), " cannot compute in ", dtype_traits<U>::name,
                  ": it has no copy in another element type (Layer::copy_as returned null; Linear and "
                  "Conv2d have copies)");
    if constexpr (std::is_same_v<U, T>) {
      return copy;
    } else {
      return std::make_unique<Recast<T, U>>(std::move(copy));
    }
  };
  switch (dtype) {
    case DType::float16: return wrap(half{});
    case DType::bfloat16: return wrap(bfloat16{});
    case DType::float32: return wrap(float{});
  }
  mixprec::detail::throw_error(layer.name(), ": dtype ", static_cast<int>(dtype),
                               " is not float16, bfloat16 or float32");
}

}  // namespace nn
MIXPREC_NAMESPACE_END
