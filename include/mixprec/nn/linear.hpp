// SPDX-License-Identifier: Apache-2.0
// Linear: y = act(x W^T + b), torch.nn.Linear's layout (W is [out, in]),
// with an optional fused activation. fp32 accumulation for every T; the
// output is rounded to T once.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/nn/cpu_math.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/functional.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/nn/precision.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

template <class T>
class Linear final : public Layer<T> {
 public:
  /// Weight and bias drawn from U(-1/sqrt(in), 1/sqrt(in)) (torch's default
  /// initialisation) with `seed`; gradients start as zeros.
  Linear(std::int64_t in_features, std::int64_t out_features, Activation activation = Activation::none,
         bool bias = true, Device device = Device::cpu(), std::uint64_t seed = 0)
      : in_((detail::check_layer_device(describe(in_features, out_features, activation, bias), device),
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

  /// A copy of `other` in element type T (Layer::copy_as): the same
  /// features, activation, bias and device, the weight and bias rounded to
  /// nearest even into T, zero gradients. A fusion with neighbours
  /// (fuse_previous) is not copied.
  template <class S>
  Linear(ConvertTag, const Linear<S>& other)
      : in_(other.in_),
        out_(other.out_),
        activation_(other.activation_),
        has_bias_(other.has_bias_),
        device_(other.device_),
        weight_(Shape{out_, in_}, device_),
        grad_weight_(Shape{out_, in_}, device_),
        bias_(Shape{has_bias_ ? out_ : 0}, device_),
        grad_bias_(Shape{has_bias_ ? out_ : 0}, device_) {
    detail::convert_tensor(TensorView<const S>(other.weight_.view()), weight_.view());
    detail::convert_tensor(TensorView<const S>(other.bias_.view()), bias_.view());
    fill(grad_weight_, 0.0f);
    fill(grad_bias_, 0.0f);
  }

  std::unique_ptr<Layer<half>> copy_as_half() const override {
    return std::make_unique<Linear<half>>(ConvertTag{}, *this);
  }
  std::unique_ptr<Layer<bfloat16>> copy_as_bfloat16() const override {
    return std::make_unique<Linear<bfloat16>>(ConvertTag{}, *this);
  }
  std::unique_ptr<Layer<float>> copy_as_float() const override {
    return std::make_unique<Linear<float>>(ConvertTag{}, *this);
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
      LinearFusion f;
      f.aux = aux_pointer();
      f.aux_ld = aux_ld();
      nn_device_ops().linear_forward(dtype_of<T>, x.data(), weight_.data(), has_bias_ ? bias_.data() : nullptr,
                                     y.data(), batch, in_, out_, activation_, f, ctx.stream);
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
      LinearFusion f;
      f.aux = aux_pointer();
      f.aux_ld = aux_ld();
      f.dy_is_dz = dy_is_dz_;
      if (prev_ != nullptr) {
        MIXPREC_CHECK(!dx.empty(), name(), "::backward: fused with the previous layer, dx is required");
        f.prev_act = prev_->activation_;
        f.prev_aux = prev_->aux_pointer();
        f.prev_aux_ld = prev_->aux_ld();
        f.prev_grad_bias = prev_->has_bias_ ? prev_->grad_bias_.data() : nullptr;
      }
      nn_device_ops().linear_backward(dtype_of<T>, x.data(), weight_.data(), y.data(), dy.data(),
                                      dx.empty() ? nullptr : dx.data(), grad_weight_.data(),
                                      has_bias_ ? grad_bias_.data() : nullptr, batch, in_, out_, activation_, f,
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

  /// Device path: lets this layer's input-gradient GEMM apply `prev`'s
  /// activation derivative and write its bias gradient (cuBLASLt
  /// DRELU_BGRAD / DGELU_BGRAD), so `prev`'s backward starts from dz and
  /// runs no element-wise kernel. Sequential calls it for consecutive
  /// Linear layers; afterwards the two must run backward in that order,
  /// this one with dx = prev's dy. Returns whether the fusion applies (both
  /// on one CUDA device, prev has an activation, GELU with out % 8 == 0).
  bool fuse_previous(Linear& prev) {
    if (!device_.is_cuda() || prev.device_ != device_ || prev.activation_ == Activation::none) return false;
    if (prev.activation_ == Activation::gelu && prev.out_ % 8 != 0) return false;
    prev.dy_is_dz_ = true;
    prev.emit_mask_ = prev.activation_ == Activation::relu;
    prev_ = &prev;
    return true;
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
  // Device aux outputs: GELU's pre-activation ([batch, out] in T, ld out),
  // or, when the next layer fuses ReLU's derivative, ReLU's bit mask (ld
  // out rounded up to 128 bits, per column of the batch).
  void ensure_aux(std::int64_t batch) {
    if (!device_.is_cuda()) return;
    if (activation_ == Activation::gelu && aux_.shape() != Shape{batch, out_}) {
      aux_ = Tensor<T>(Shape{batch, out_}, device_);
    }
    if (emit_mask_ && mask_batch_ != batch) {
      mask_ = Buffer(static_cast<std::size_t>(aux_ld() / 8 * batch), device_);
      mask_batch_ = batch;
    }
  }
  void* aux_pointer() {
    if (activation_ == Activation::gelu) return aux_.numel() > 0 ? aux_.data() : nullptr;
    return emit_mask_ ? mask_.data() : nullptr;
  }
  std::int64_t aux_ld() const { return activation_ == Activation::gelu ? out_ : (out_ + 127) / 128 * 128; }

  template <class>
  friend class Linear;

  std::int64_t in_, out_;
  Activation activation_;
  bool has_bias_;
  Device device_;
  Tensor<T> weight_, grad_weight_, bias_, grad_bias_;
  Tensor<T> aux_;             // device: GELU pre-activation
  Buffer mask_;               // device: ReLU bit mask for the next layer's fused backward
  std::int64_t mask_batch_ = -1;
  bool emit_mask_ = false;    // the next layer fuses this ReLU's derivative
  bool dy_is_dz_ = false;     // the next layer's backward hands over dz and the bias gradient
  Linear* prev_ = nullptr;    // this layer's backward applies prev's activation derivative
  detail::MatrixF cpu_aux_;   // host: the pre-activation in float
};

}  // namespace nn
MIXPREC_NAMESPACE_END
