// SPDX-License-Identifier: Apache-2.0
// Linear: y = act(x W^T + b), torch.nn.Linear's layout (W is [out, in]),
// with an optional fused activation. fp32 accumulation for every T; the
// output is rounded to T once.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/nn/cpu_math.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/functional.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec::nn {

template <class T>
class Linear final : public Layer<T> {
 public:
  /// Weight and bias drawn from U(-1/sqrt(in), 1/sqrt(in)) (torch's default
  /// initialisation) with `seed`; gradients start as zeros.
  Linear(std::int64_t in_features, std::int64_t out_features, Activation activation = Activation::none,
         bool bias = true, Device device = Device::cpu(), std::uint64_t seed = 0)
      : in_((check_device(describe(in_features, out_features, activation, bias), device),
             check_features("in_features", in_features))),
        out_(check_features("out_features", out_features)),
        activation_(activation),
        has_bias_(bias),
        device_(device),
        weight_(Shape{out_features, in_features}, device),
        grad_weight_(Shape{out_features, in_features}, device),
        bias_(Shape{bias ? out_features : 0}, device),
        grad_bias_(Shape{bias ? out_features : 0}, device) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(in_features));
    fill_uniform(weight_, -bound, bound, seed);
    fill_uniform(bias_, -bound, bound, seed + 1);
    fill(grad_weight_, 0.0f);
    fill(grad_bias_, 0.0f);
  }

  std::string name() const override { return describe(in_, out_, activation_, has_bias_); }
  Device device() const override { return device_; }
  Activation activation() const { return activation_; }
  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }

  Tensor<T>& weight() { return weight_; }
  Tensor<T>& bias() { return bias_; }
  Tensor<T>& grad_weight() { return grad_weight_; }
  Tensor<T>& grad_bias() { return grad_bias_; }

  Shape output_shape(const Shape& in) const override {
    MIXPREC_CHECK(in.rank() == 2 && in[1] == in_, name(), ": input shape ", in, ", expected [batch, ", in_, "]");
    return Shape{in[0], out_};
  }

  void forward(TensorView<const T> x, TensorView<T> y, const Context& ctx) override {
    check(x, y, "forward");
    const std::int64_t batch = x.shape()[0];
    ensure_aux(batch);
    if (device_.is_cuda()) {
      nn_device_ops().linear_forward(dtype_of<T>, x.data(), weight_.data(), has_bias_ ? bias_.data() : nullptr,
                                     y.data(), aux_data(), batch, in_, out_, activation_, ctx.stream);
      return;
    }
    const detail::MatrixF X = detail::to_matrix(x, batch);
    const detail::MatrixF W = detail::to_matrix(TensorView<const T>(weight_.view()), out_);
    detail::MatrixF Z = X * W.transpose();
    if (has_bias_) Z.rowwise() += detail::to_matrix(TensorView<const T>(bias_.view()), 1).row(0);
    if (activation_ != Activation::none) {
      cpu_aux_ = Z;  // the pre-activation, for the derivative
      Z = Z.unaryExpr([a = activation_](float z) { return fn::activate(a, z); });
    }
    detail::store(Z, y);
  }

  void backward(TensorView<const T> x, TensorView<const T> y, TensorView<const T> dy, TensorView<T> dx,
                const Context& ctx) override {
    check(x, y, "backward");
    MIXPREC_CHECK(dy.shape() == y.shape(), name(), ": dy shape ", dy.shape(), " != output shape ", y.shape());
    MIXPREC_CHECK(dx.empty() || dx.shape() == x.shape(), name(), ": dx shape ", dx.shape(), " != input shape ",
                  x.shape());
    const std::int64_t batch = x.shape()[0];
    if (device_.is_cuda()) {
      nn_device_ops().linear_backward(dtype_of<T>, x.data(), weight_.data(), y.data(), aux_data(), dy.data(),
                                      dx.empty() ? nullptr : dx.data(), grad_weight_.data(),
                                      has_bias_ ? grad_bias_.data() : nullptr, batch, in_, out_, activation_,
                                      ctx.stream);
      return;
    }
    detail::MatrixF G = detail::to_matrix(dy, batch);  // dL/dy, then dL/dz
    if (activation_ != Activation::none) {
      MIXPREC_CHECK(cpu_aux_.rows() == batch, name(), ": backward without a forward of this batch");
      G = G.cwiseProduct(cpu_aux_.unaryExpr([a = activation_](float z) { return fn::activation_grad(a, z); }));
    }
    const detail::MatrixF X = detail::to_matrix(x, batch);
    detail::store(G.transpose() * X, grad_weight_.view());
    if (has_bias_) detail::store(G.colwise().sum(), grad_bias_.view());
    if (!dx.empty()) {
      const detail::MatrixF W = detail::to_matrix(TensorView<const T>(weight_.view()), out_);
      detail::store(G * W, dx);
    }
  }

  std::vector<optim::Param> parameters(const std::string& prefix) override {
    std::vector<optim::Param> ps{{prefix + "weight", weight_, grad_weight_}};
    if (has_bias_) ps.push_back({prefix + "bias", bias_, grad_bias_});
    return ps;
  }

 private:
  static std::string describe(std::int64_t in, std::int64_t out, Activation a, bool bias) {
    std::string s = "Linear(" + std::to_string(in) + ", " + std::to_string(out);
    if (a != Activation::none) s += std::string(", ") + activation_name(a);
    if (!bias) s += ", bias=false";
    return s + ")";
  }
  // Before any allocation: a device needs the kernels (and a CUDA build).
  static void check_device(const std::string& what, Device device) {
    if (!device.is_cuda()) return;
    if (built_with_cuda()) mixprec::detail::require_nn_device_ops(what.c_str(), device);
    mixprec::detail::require_usable(device, what.c_str());
  }
  static std::int64_t check_features(const char* what, std::int64_t n) {
    MIXPREC_CHECK(n > 0, "Linear: ", what, " = ", n, ", must be > 0");
    return n;
  }
  void check(TensorView<const T> x, TensorView<const T> y, const char* what) const {
    const Shape want = output_shape(x.shape());
    MIXPREC_CHECK(y.shape() == want, name(), "::", what, ": output shape ", y.shape(), ", expected ", want);
    MIXPREC_CHECK(x.device() == device_ && y.device() == device_, name(), "::", what, ": tensors on ", x.device(),
                  " / ", y.device(), ", the layer on ", device_);
  }
  // The GELU pre-activation on a device (GELU_AUX epilogue), [batch, out] in T.
  void ensure_aux(std::int64_t batch) {
    if (!device_.is_cuda() || activation_ != Activation::gelu) return;
    if (aux_.shape() != Shape{batch, out_}) aux_ = Tensor<T>(Shape{batch, out_}, device_);
  }
  T* aux_data() { return aux_.numel() > 0 ? aux_.data() : nullptr; }

  std::int64_t in_, out_;
  Activation activation_;
  bool has_bias_;
  Device device_;
  Tensor<T> weight_, grad_weight_, bias_, grad_bias_;
  Tensor<T> aux_;             // device: GELU pre-activation
  detail::MatrixF cpu_aux_;   // host: the pre-activation in float
};

}  // namespace mixprec::nn
