// SPDX-License-Identifier: Apache-2.0
// Conv2d (with an optional fused ReLU) and MaxPool2d, NCHW as torch.nn. On
// a CUDA device: the convolution through cuDNN (fp16/bf16/fp32 data, fp32
// accumulation, tensor cores) or, for few taps a filter, mixprec's direct
// kernels; its bias, ReLU and bias gradient and the pooling by mixprec's
// kernels (kernels/mixprec/cuda/conv_kernels.cuh). On the CPU through
// direct loops in float: correct and meant for tests and small inputs, not
// for speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/nn/device_ops.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/nn/precision.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

namespace detail {
inline std::int64_t out_size(std::int64_t in, std::int64_t window, std::int64_t stride, std::int64_t pad) {
  return (in + 2 * pad - window) / stride + 1;
}
}  // namespace detail

/// y = act(conv2d(x, W) + b) with W [out_channels, in_channels, kernel,
/// kernel], square kernel, stride and zero padding; torch's default
/// initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from `seed`. `act` is
/// none or relu: a fused ReLU gives the bits of this layer without it
/// followed by an ActivationLayer(relu), in fewer passes over the output on
/// a device.
template <class T>
class Conv2d final : public Layer<T> {
 public:
  Conv2d(std::int64_t in_channels, std::int64_t out_channels, std::int64_t kernel, std::int64_t stride = 1,
         std::int64_t padding = 0, bool bias = true, Device device = Device::cpu(), std::uint64_t seed = 0,
         Activation activation = Activation::none)
      : c_((validate(in_channels, out_channels, kernel, stride, padding, device, activation), in_channels)),
        k_(out_channels),
        r_(kernel),
        stride_(stride),
        pad_(padding),
        has_bias_(bias),
        activation_(activation),
        device_(device),
        weight_(Shape{out_channels, in_channels, kernel, kernel}, device),
        grad_weight_(Shape{out_channels, in_channels, kernel, kernel}, device),
        bias_(Shape{bias ? out_channels : 0}, device),
        grad_bias_(Shape{bias ? out_channels : 0}, device) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(in_channels * kernel * kernel));
    fill_uniform(weight_, -bound, bound, seed);
    fill_uniform(bias_, -bound, bound, seed + 1);
    fill(grad_weight_, 0.0f);
    fill(grad_bias_, 0.0f);
  }

  /// A copy of `other` in element type T (Layer::copy_as): the same
  /// configuration and device, the weight and bias rounded to nearest even
  /// into T, zero gradients.
  template <class S>
  Conv2d(ConvertTag, const Conv2d<S>& other)
      : c_(other.c_),
        k_(other.k_),
        r_(other.r_),
        stride_(other.stride_),
        pad_(other.pad_),
        has_bias_(other.has_bias_),
        activation_(other.activation_),
        device_(other.device_),
        weight_(Shape{k_, c_, r_, r_}, device_),
        grad_weight_(Shape{k_, c_, r_, r_}, device_),
        bias_(Shape{has_bias_ ? k_ : 0}, device_),
        grad_bias_(Shape{has_bias_ ? k_ : 0}, device_) {
    detail::convert_tensor(TensorView<const S>(other.weight_.view()), weight_.view());
    detail::convert_tensor(TensorView<const S>(other.bias_.view()), bias_.view());
    fill(grad_weight_, 0.0f);
    fill(grad_bias_, 0.0f);
  }

  std::unique_ptr<Layer<half>> copy_as_half() const override {
    return std::make_unique<Conv2d<half>>(ConvertTag{}, *this);
  }
  std::unique_ptr<Layer<bfloat16>> copy_as_bfloat16() const override {
    return std::make_unique<Conv2d<bfloat16>>(ConvertTag{}, *this);
  }
  std::unique_ptr<Layer<float>> copy_as_float() const override {
    return std::make_unique<Conv2d<float>>(ConvertTag{}, *this);
  }

  std::string name() const override {
    return "Conv2d(" + std::to_string(c_) + ", " + std::to_string(k_) + ", kernel=" + std::to_string(r_) +
           ", stride=" + std::to_string(stride_) + ", padding=" + std::to_string(pad_) + (has_bias_ ? "" : ", bias=false") +
           ")" + (activation_ == Activation::relu ? " + ReLU" : "");
  }
  Activation activation() const { return activation_; }
  Device device() const override { return device_; }
  Tensor<T>& weight() { return weight_; }
  Tensor<T>& bias() { return bias_; }
  Tensor<T>& grad_weight() { return grad_weight_; }
  Tensor<T>& grad_bias() { return grad_bias_; }

  Shape output_shape(const Shape& in) const override {
    MIXPREC_CHECK(in.rank() == 4 && in[1] == c_, name(), ": input shape ", in, ", expected [batch, ", c_,
                  ", height, width]");
    const std::int64_t p = detail::out_size(in[2], r_, stride_, pad_), q = detail::out_size(in[3], r_, stride_, pad_);
    MIXPREC_CHECK(p > 0 && q > 0, name(), ": input shape ", in, " is smaller than the kernel");
    return Shape{in[0], k_, p, q};
  }

  void forward(TensorView<const T> x, TensorView<T> y, const Context& ctx) override {
    const ConvShape s = shape_of(x, y, "forward");
    if (device_.is_cuda()) {
      nn_device_ops().conv2d_forward(dtype_of<T>, s, x.data(), weight_.data(), has_bias_ ? bias_.data() : nullptr,
                                     activation_, y.data(), ctx.stream);
      return;
    }
    const std::vector<float> xf = widen(x), wf = widen(TensorView<const T>(weight_.view()));
    for (std::int64_t n = 0; n < s.n; ++n) {
      for (std::int64_t k = 0; k < s.k; ++k) {
        const float b = has_bias_ ? to_float(bias_.at(k)) : 0.0f;
        for (std::int64_t p = 0; p < s.p; ++p) {
          for (std::int64_t q = 0; q < s.q; ++q) {
            float acc = 0;
            each_tap(s, p, q, [&](std::int64_t c, std::int64_t r, std::int64_t t, std::int64_t h, std::int64_t w) {
              acc += xf[((n * s.c + c) * s.h + h) * s.w + w] * wf[((k * s.c + c) * s.r + r) * s.s + t];
            });
            y.data()[((n * s.k + k) * s.p + p) * s.q + q] = from_float<T>(fn::activate(activation_, acc + b));
          }
        }
      }
    }
  }

  void backward(TensorView<const T> x, TensorView<const T> y, TensorView<const T> dy, TensorView<T> dx,
                const Context& ctx) override {
    const ConvShape s = shape_of(x, y, "backward");
    MIXPREC_CHECK(dy.shape() == y.shape(), name(), ": dy shape ", dy.shape(), " != ", y.shape());
    MIXPREC_CHECK(dx.empty() || dx.shape() == x.shape(), name(), ": dx shape ", dx.shape(), " != ", x.shape());
    if (device_.is_cuda()) {
      nn_device_ops().conv2d_backward(dtype_of<T>, s, x.data(), weight_.data(), y.data(), dy.data(), activation_,
                                      dx.empty() ? nullptr : dx.data(), grad_weight_.data(),
                                      has_bias_ ? grad_bias_.data() : nullptr, ctx.stream);
      return;
    }
    const std::vector<float> xf = widen(x), wf = widen(TensorView<const T>(weight_.view()));
    std::vector<float> gf = widen(dy);
    if (activation_ == Activation::relu) {  // dz = dy * relu'(y): dy or 0, as an ActivationLayer's backward
      for (std::size_t i = 0; i < gf.size(); ++i) gf[i] *= fn::relu_grad_from_output(to_float(y.data()[i]));
    }
    std::vector<float> gw(wf.size(), 0.0f), gx(xf.size(), 0.0f), gb(static_cast<std::size_t>(s.k), 0.0f);
    for (std::int64_t n = 0; n < s.n; ++n) {
      for (std::int64_t k = 0; k < s.k; ++k) {
        for (std::int64_t p = 0; p < s.p; ++p) {
          for (std::int64_t q = 0; q < s.q; ++q) {
            const float g = gf[((n * s.k + k) * s.p + p) * s.q + q];
            gb[k] += g;
            each_tap(s, p, q, [&](std::int64_t c, std::int64_t r, std::int64_t t, std::int64_t h, std::int64_t w) {
              const std::size_t xi = ((n * s.c + c) * s.h + h) * s.w + w, wi = ((k * s.c + c) * s.r + r) * s.s + t;
              gw[wi] += g * xf[xi];
              gx[xi] += g * wf[wi];
            });
          }
        }
      }
    }
    convert_n(gw.data(), gw.size(), grad_weight_.data());
    if (has_bias_) convert_n(gb.data(), gb.size(), grad_bias_.data());
    if (!dx.empty()) convert_n(gx.data(), gx.size(), dx.data());
  }

  std::vector<optim::Param> parameters(const std::string& prefix) override {
    std::vector<optim::Param> ps{{prefix + "weight", weight_, grad_weight_}};
    if (has_bias_) ps.push_back({prefix + "bias", bias_, grad_bias_});
    return ps;
  }

 private:
  static void validate(std::int64_t c, std::int64_t k, std::int64_t r, std::int64_t stride, std::int64_t pad,
                       Device device, Activation activation) {
    MIXPREC_CHECK(c > 0 && k > 0 && r > 0, "Conv2d: in_channels = ", c, ", out_channels = ", k, ", kernel = ", r,
                  ", must be > 0");
    MIXPREC_CHECK(stride > 0 && pad >= 0, "Conv2d: stride = ", stride, ", padding = ", pad,
                  ", must be > 0 and >= 0");
    MIXPREC_CHECK(activation == Activation::none || activation == Activation::relu, "Conv2d: activation = ",
                  activation_name(activation), " is not fused into a convolution (none or relu); follow the layer "
                  "with an ActivationLayer");
    detail::check_layer_device("Conv2d", device);
  }
  ConvShape shape_of(TensorView<const T> x, TensorView<const T> y, const char* what) const {
    const Shape out = output_shape(x.shape());
    MIXPREC_CHECK(y.shape() == out, name(), "::", what, ": output shape ", y.shape(), ", expected ", out);
    MIXPREC_CHECK(x.device() == device_ && y.device() == device_, name(), "::", what, ": tensors on ", x.device(),
                  ", the layer on ", device_);
    const Shape& i = x.shape();
    return ConvShape{i[0], c_, i[2], i[3], k_, r_, r_, stride_, pad_, out[2], out[3]};
  }
  // Calls f(c, r, t, h, w) for every kernel tap of output (p, q) that lands inside the input.
  template <class F>
  static void each_tap(const ConvShape& s, std::int64_t p, std::int64_t q, F&& f) {
    for (std::int64_t c = 0; c < s.c; ++c) {
      for (std::int64_t r = 0; r < s.r; ++r) {
        const std::int64_t h = p * s.stride - s.pad + r;
        if (h < 0 || h >= s.h) continue;
        for (std::int64_t t = 0; t < s.s; ++t) {
          const std::int64_t w = q * s.stride - s.pad + t;
          if (w >= 0 && w < s.w) f(c, r, t, h, w);
        }
      }
    }
  }
  static std::vector<float> widen(TensorView<const T> v) {
    std::vector<float> out(static_cast<std::size_t>(v.numel()));
    convert_n(v.data(), out.size(), out.data());
    return out;
  }

  template <class>
  friend class Conv2d;

  std::int64_t c_, k_, r_, stride_, pad_;
  bool has_bias_;
  Activation activation_;
  Device device_;
  Tensor<T> weight_, grad_weight_, bias_, grad_bias_;
};

/// Max over square windows, NCHW (torch.nn.MaxPool2d without padding). The
/// gradient goes to the first maximum of each window; NaN propagates.
template <class T>
class MaxPool2d final : public Layer<T> {
 public:
  explicit MaxPool2d(std::int64_t window, std::int64_t stride = 0, Device device = Device::cpu())
      : window_((validate(window, stride, device), window)), stride_(stride == 0 ? window : stride), device_(device) {}

  std::string name() const override {
    return "MaxPool2d(" + std::to_string(window_) + ", stride=" + std::to_string(stride_) + ")";
  }
  Device device() const override { return device_; }
  Shape output_shape(const Shape& in) const override {
    MIXPREC_CHECK(in.rank() == 4, name(), ": input shape ", in, ", expected [batch, channels, height, width]");
    const std::int64_t p = detail::out_size(in[2], window_, stride_, 0), q = detail::out_size(in[3], window_, stride_, 0);
    MIXPREC_CHECK(p > 0 && q > 0, name(), ": input shape ", in, " is smaller than the window");
    return Shape{in[0], in[1], p, q};
  }

  void forward(TensorView<const T> x, TensorView<T> y, const Context& ctx) override {
    const PoolShape s = shape_of(x, y, "forward");
    if (device_.is_cuda()) {
      nn_device_ops().maxpool2d_forward(dtype_of<T>, s, x.data(), y.data(), ctx.stream);
      return;
    }
    for_each_window(s, x, [&](std::int64_t out, std::int64_t argmax) { y.data()[out] = x.data()[argmax]; });
  }

  void backward(TensorView<const T> x, TensorView<const T> y, TensorView<const T> dy, TensorView<T> dx,
                const Context& ctx) override {
    const PoolShape s = shape_of(x, y, "backward");
    MIXPREC_CHECK(dy.shape() == y.shape(), name(), ": dy shape ", dy.shape(), " != ", y.shape());
    if (dx.empty()) return;
    MIXPREC_CHECK(dx.shape() == x.shape(), name(), ": dx shape ", dx.shape(), " != ", x.shape());
    if (device_.is_cuda()) {
      nn_device_ops().maxpool2d_backward(dtype_of<T>, s, x.data(), y.data(), dy.data(), dx.data(), ctx.stream);
      return;
    }
    std::vector<float> g(static_cast<std::size_t>(x.numel()), 0.0f);
    for_each_window(s, x, [&](std::int64_t out, std::int64_t argmax) { g[argmax] += to_float(dy.data()[out]); });
    convert_n(g.data(), g.size(), dx.data());
  }

 private:
  static void validate(std::int64_t window, std::int64_t stride, Device device) {
    MIXPREC_CHECK(window > 0 && stride >= 0, "MaxPool2d: window = ", window, ", stride = ", stride,
                  ", must be > 0 and >= 0 (0: the window)");
    detail::check_layer_device("MaxPool2d", device);
  }
  PoolShape shape_of(TensorView<const T> x, TensorView<const T> y, const char* what) const {
    const Shape out = output_shape(x.shape());
    MIXPREC_CHECK(y.shape() == out, name(), "::", what, ": output shape ", y.shape(), ", expected ", out);
    MIXPREC_CHECK(x.device() == device_ && y.device() == device_, name(), "::", what, ": tensors on ", x.device(),
                  ", the layer on ", device_);
    const Shape& i = x.shape();
    return PoolShape{i[0], i[1], i[2], i[3], window_, stride_, out[2], out[3]};
  }
  // f(output index, input index of the window's first maximum (or first NaN)).
  template <class F>
  static void for_each_window(const PoolShape& s, TensorView<const T> x, F&& f) {
    for (std::int64_t nc = 0; nc < s.n * s.c; ++nc) {
      for (std::int64_t p = 0; p < s.p; ++p) {
        for (std::int64_t q = 0; q < s.q; ++q) {
          std::int64_t best = -1;
          float m = 0;
          for (std::int64_t r = 0; r < s.window; ++r) {
            for (std::int64_t t = 0; t < s.window; ++t) {
              const std::int64_t i = (nc * s.h + p * s.stride + r) * s.w + q * s.stride + t;
              const float v = to_float(x.data()[i]);
              if (best < 0 || v > m || (std::isnan(v) && !std::isnan(m))) {
                best = i;
                m = v;
              }
            }
          }
          f((nc * s.p + p) * s.q + q, best);
        }
      }
    }
  }

  std::int64_t window_, stride_;
  Device device_;
};

}  // namespace nn
MIXPREC_NAMESPACE_END
