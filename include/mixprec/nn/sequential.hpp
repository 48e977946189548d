// SPDX-License-Identifier: Apache-2.0
// Sequential: owns its layers and every activation and activation-gradient
// buffer, made once for a fixed input shape (batch included), and runs the
// forward and the backward pass; its parameters go to an optimizer.
#pragma once

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/nn/layer.hpp"
#include "mixprec/nn/linear.hpp"
#include "mixprec/nn/precision.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace nn {

template <class T>
class Sequential {
 public:
  /// For inputs of exactly `input_shape` ([batch, ...]) on `device`. With
  /// `fuse_linear_backward`, consecutive Linear layers on a device fuse the
  /// first one's activation derivative and bias gradient into the second's
  /// input-gradient GEMM (Linear::fuse_previous). Off by default: on the
  /// H100 the fused cuBLASLt epilogues made the MLP step slower (0.340 ms vs
  /// 0.296 ms for 784-4096-4096-10, batch 1024, fp16; docs/layers.md).
  explicit Sequential(Shape input_shape, Device device = Device::cpu(), bool fuse_linear_backward = false)
      : input_shape_(std::move(input_shape)), device_(device), fuse_(fuse_linear_backward) {
    MIXPREC_CHECK(input_shape_.rank() >= 2 && input_shape_.numel() > 0, "Sequential: input shape ", input_shape_,
                  ", expected [batch, features...] with no zero dimension");
  }

  /// Appends a layer: checks its device and that it takes the current
  /// output shape, then allocates its output and output-gradient buffers.
  /// On error nothing is added.
  template <class L>
  L& add(std::unique_ptr<L> layer) {
    MIXPREC_CHECK(layer != nullptr, "Sequential::add: null layer");
    MIXPREC_CHECK(layer->device() == device_, "Sequential::add: ", layer->name(), " is on ", layer->device(),
                  ", the Sequential on ", device_);
    const Shape out = layer->output_shape(output_shape());
    Tensor<T> y(out, device_), dy(out, device_);
    L& ref = *layer;
    layers_.reserve(layers_.size() + 1);
    outputs_.reserve(outputs_.size() + 1);
    grads_.reserve(grads_.size() + 1);
    layers_.push_back(std::move(layer));
    outputs_.push_back(std::move(y));
    grads_.push_back(std::move(dy));
    if constexpr (std::is_same_v<L, Linear<T>>) {
      // Consecutive Linear layers on a device: the activation derivative and
      // bias gradient of the first ride on the second's input-gradient GEMM.
      if (fuse_ && layers_.size() >= 2) {
        if (auto* prev = dynamic_cast<Linear<T>*>(layers_[layers_.size() - 2].get())) ref.fuse_previous(*prev);
      }
    }
    return ref;
  }
  template <class L, class... Args>
  L& emplace(Args&&... args) {
    return add(std::make_unique<L>(std::forward<Args>(args)...));
  }

  std::size_t size() const { return layers_.size(); }
  Layer<T>& layer(std::size_t i) { return *layers_.at(i); }
  const Shape& input_shape() const { return input_shape_; }
  const Shape& output_shape() const { return layers_.empty() ? input_shape_ : outputs_.back().shape(); }
  Device device() const { return device_; }

  /// Runs every layer on x (which must have the input shape: the batch is
  /// fixed) and returns the last output. x must stay valid until backward().
  TensorView<const T> forward(TensorView<const T> x, const Context& ctx = {}) {
    MIXPREC_CHECK(!layers_.empty(), "Sequential::forward: no layers");
    MIXPREC_CHECK(x.shape() == input_shape_, "Sequential::forward: input shape ", x.shape(), ", this Sequential ",
                  "was built for ", input_shape_, " (the batch size is fixed when it is made)");
    MIXPREC_CHECK(x.device() == device_, "Sequential::forward: input on ", x.device(), ", layers on ", device_);
    input_ = x;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      layers_[i]->forward(i == 0 ? x : TensorView<const T>(outputs_[i - 1].view()), outputs_[i].view(), ctx);
    }
    return outputs_.back().view();
  }

  /// Where the loss writes dLoss/doutput (loss-scaled) before backward().
  TensorView<T> output_grad() {
    MIXPREC_CHECK(!layers_.empty(), "Sequential::output_grad: no layers");
    return grads_.back().view();
  }

  /// Backward from output_grad() through every layer; the parameters'
  /// gradients are overwritten. The input's gradient is not computed.
  void backward(const Context& ctx = {}) {
    MIXPREC_CHECK(input_.data() != nullptr, "Sequential::backward: no forward() yet");
    for (std::size_t i = layers_.size(); i-- > 0;) {
      const TensorView<const T> x = i == 0 ? input_ : TensorView<const T>(outputs_[i - 1].view());
      layers_[i]->backward(x, outputs_[i].view(), grads_[i].view(), i == 0 ? TensorView<T>() : grads_[i - 1].view(),
                           ctx);
    }
  }

  /// Every layer's parameters, named "<index>.weight", "<index>.bias" as torch does.
  std::vector<optim::Param> parameters() {
    std::vector<optim::Param> all;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      for (optim::Param& p : layers_[i]->parameters(parameter_prefix(i))) all.push_back(std::move(p));
    }
    return all;
  }
  /// The prefix of layer i's parameter names: "<i>.".
  static std::string parameter_prefix(std::size_t i) { return std::to_string(i) + "."; }

  // --- per-layer precision (nn/precision.hpp) ---------------------------------

  /// The element type layer i computes in and keeps its parameters in: T
  /// unless set_precision moved it.
  DType precision(std::size_t i) const { return layers_.at(check_index(i, "precision"))->compute_dtype(); }

  /// Moves layer i's compute to `dtype` (float16, bfloat16 or float32): the
  /// layer is replaced by a copy of itself in that type (its parameters
  /// rounded to nearest even, zero gradients) wrapped in Recast, which
  /// converts at its boundary; the other layers and every activation
  /// buffer stay in T. dtype = T moves a moved layer back. Host layers,
  /// Linear and Conv2d (others throw, naming the layer). The layer's
  /// parameter views change: an optimizer that holds them must be pointed
  /// at the new ones (Optimizer::rebind; monitor::PrecisionFallback does
  /// it, writing the new weights from the fp32 masters). Before an
  /// optimizer is made, this simply decides the layer's precision. Every
  /// check runs before anything changes.
  void set_precision(std::size_t i, DType dtype) { replace(i, copy_in(i, dtype, "set_precision")); }

  /// What set_precision(i, dtype) would put in place of layer i, made
  /// without changing anything: for a caller that rebinds an optimizer to
  /// its parameters before replace() swaps it in.
  std::unique_ptr<Layer<T>> copy_in_precision(std::size_t i, DType dtype) const {
    return copy_in(i, dtype, "copy_in_precision");
  }

  /// Puts `layer` in place of layer i and returns the old one. The new
  /// layer must be on this Sequential's device and give the same output
  /// shape (checked before anything changes); the activation buffers stay.
  std::unique_ptr<Layer<T>> replace(std::size_t i, std::unique_ptr<Layer<T>> layer) {
    check_index(i, "replace");
    MIXPREC_CHECK(layer != nullptr, "Sequential::replace: null layer for layer ", i);
    MIXPREC_CHECK(layer->device() == device_, "Sequential::replace: ", layer->name(), " is on ", layer->device(),
                  ", the Sequential on ", device_);
    const Shape in = i == 0 ? input_shape_ : outputs_[i - 1].shape();
    const Shape out = layer->output_shape(in);
    MIXPREC_CHECK(out == outputs_[i].shape(), "Sequential::replace: ", layer->name(), " gives ", out, " for input ",
                  in, ", layer ", i, " (", layers_[i]->name(), ") gave ", outputs_[i].shape());
    std::swap(layers_[i], layer);
    return layer;
  }

 private:
  std::unique_ptr<Layer<T>> copy_in(std::size_t i, DType dtype, const char* what) const {
    const Layer<T>& layer = *layers_.at(check_index(i, what));
    MIXPREC_CHECK(dtype == DType::float16 || dtype == DType::bfloat16 || dtype == DType::float32, "Sequential::",
                  what, ": dtype = ", static_cast<int>(dtype), " for layer ", i,
                  ", must be float16, bfloat16 or float32");
    MIXPREC_CHECK(!(fuse_ && device_.is_cuda()), "Sequential::", what, ": layer ", i, " (", layer.name(),
                  "): this Sequential fuses consecutive Linear backward passes (fuse_linear_backward = true), "
                  "whose links a replaced layer would break; build it without fusion to change precisions");
    return nn::copy_in_precision(layer, dtype);
  }
  std::size_t check_index(std::size_t i, const char* what) const {
    MIXPREC_CHECK(i < layers_.size(), "Sequential::", what, ": layer ", i, ", the Sequential has ", layers_.size(),
                  " layers");
    return i;
  }

  Shape input_shape_;
  Device device_;
  bool fuse_ = false;
  std::vector<std::unique_ptr<Layer<T>>> layers_;
  std::vector<Tensor<T>> outputs_, grads_;  // outputs_[i]: layer i's output; grads_[i]: its gradient
  TensorView<const T> input_;
};

}  // namespace nn
MIXPREC_NAMESPACE_END
