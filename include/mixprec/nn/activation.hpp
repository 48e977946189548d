// SPDX-License-Identifier: Apache-2.0
// Activation layers (ReLU, GELU) and Flatten, for places where no Linear can
// fuse the activation (after a convolution, or to keep it separate).
#pragma once

#include <cstddef>
#include <string>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/functional.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

/// y = act(x) element-wise, computed in float, rounded to T.
template <class T>
class ActivationLayer final : public Layer<T> {
 public:
  explicit ActivationLayer(Activation activation, Device device = Device::cpu())
      : activation_(activation), device_(device) {
    MIXPREC_CHECK(activation != Activation::none, "ActivationLayer: activation = none does nothing; leave it out");
    detail::check_layer_device(name(), device);
  }
  std::string name() const override { return activation_ == Activation::relu ? "ReLU" : "GELU(tanh)"; }
  Device device() const override { return device_; }
  Shape output_shape(const Shape& in) const override {
    MIXPREC_CHECK(in.rank() >= 1, name(), ": input shape ", in, " has no batch dimension");
    return in;
  }
  void forward(TensorView<const T> x, TensorView<T> y, const Context& ctx) override {
    check(x, y, "forward");
    if (device_.is_cuda()) {
      nn_device_ops().activation_forward(dtype_of<T>, activation_, x.data(), y.data(), x.numel(), ctx.stream);
      return;
    }
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      y.data()[i] = from_float<T>(fn::activate(activation_, to_float(x.data()[i])));
    }
  }
  void backward(TensorView<const T> x, TensorView<const T> y, TensorView<const T> dy, TensorView<T> dx,
                const Context& ctx) override {
    check(x, y, "backward");
    MIXPREC_CHECK(dy.shape() == x.shape(), name(), ": dy shape ", dy.shape(), " != ", x.shape());
    if (dx.empty()) return;
    MIXPREC_CHECK(dx.shape() == x.shape(), name(), ": dx shape ", dx.shape(), " != ", x.shape());
    if (device_.is_cuda()) {
      nn_device_ops().activation_backward(dtype_of<T>, activation_, x.data(), dy.data(), dx.data(), x.numel(),
                                          ctx.stream);
      return;
    }
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      dx.data()[i] = from_float<T>(to_float(dy.data()[i]) * fn::activation_grad(activation_, to_float(x.data()[i])));
    }
  }

 private:
  void check(TensorView<const T> x, TensorView<const T> y, const char* what) const {
    MIXPREC_CHECK(y.shape() == x.shape(), name(), "::", what, ": output shape ", y.shape(), " != input shape ",
                  x.shape());
    MIXPREC_CHECK(x.device() == device_ && y.device() == device_, name(), "::", what, ": tensors on ", x.device(),
                  ", the layer on ", device_);
  }
  Activation activation_;
  Device device_;
};

/// [batch, d1, d2, ...] -> [batch, d1 * d2 * ...]; the data is copied (on a
/// device, asynchronously on the context's stream).
template <class T>
class Flatten final : public Layer<T> {
 public:
  explicit Flatten(Device device = Device::cpu()) : device_(device) {}
  std::string name() const override { return "Flatten"; }
  Device device() const override { return device_; }
  Shape output_shape(const Shape& in) const override {
    MIXPREC_CHECK(in.rank() >= 1, "Flatten: input shape ", in, " has no batch dimension");
    return Shape{in[0], in[0] == 0 ? 0 : in.numel() / in[0]};
  }
  void forward(TensorView<const T> x, TensorView<T> y, const Context& ctx) override {
    copy(x.reshape(y.shape()), y, ctx.stream);
  }
  void backward(TensorView<const T> x, TensorView<const T>, TensorView<const T> dy, TensorView<T> dx,
                const Context& ctx) override {
    if (!dx.empty()) copy(dy.reshape(x.shape()), dx, ctx.stream);
  }

 private:
  Device device_;
};

}  // namespace nn
MIXPREC_NAMESPACE_END
