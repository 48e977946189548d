// SPDX-License-Identifier: Apache-2.0
// libtorch tensors as mixprec parameters: a torch::Tensor's data and its
// .grad(), or every parameter of a torch::nn::Module, viewed (never copied)
// for mixprec's optimizers and GradScaler. Needs libtorch: link the
// mixprec::torch target. Not part of <mixprec/mixprec.hpp>.
#pragma once

#include <sstream>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/optim/optimizer.hpp"
#include "mixprec/tensor/shape.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

// The namespace is `libtorch`, not `torch`: a `mixprec::torch` would make
// `torch::Tensor` ambiguous in every file that says `using namespace mixprec;`.
MIXPREC_NAMESPACE_BEGIN
namespace libtorch {

namespace detail {

inline std::string sizes_of(const ::torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

inline std::string strides_of(const ::torch::Tensor& t) {
  std::ostringstream out;
  out << t.strides();
  return out.str();
}

}  // namespace detail

/// mixprec's element type for a torch dtype: kHalf is mixprec::half,
/// kBFloat16 is mixprec::bfloat16, kFloat is float (the same bits, so a view
/// reinterprets the memory as it is). Throws, naming `what`, for any other.
inline DType dtype_of(::torch::ScalarType type, const std::string& what = "tensor") {
  switch (type) {
    case ::torch::kHalf:
      return DType::float16;
    case ::torch::kBFloat16:
      return DType::bfloat16;
    case ::torch::kFloat:
      return DType::float32;
    default:
      break;
  }
  mixprec::detail::throw_error(what, ": dtype ", type,
                               " is not supported; mixprec views Half (fp16), BFloat16 and Float (fp32) tensors");
}

/// mixprec's Device for a torch device: the CPU, or CUDA device i in a
/// program built with mixprec::cuda. Throws, naming `what`, for a CUDA
/// tensor in a build without CUDA (saying how to get it) and for any other
/// kind of device.
inline Device device_of(const ::torch::Device& device, const std::string& what = "tensor") {
  if (device.is_cpu()) return Device::cpu();
  if (device.is_cuda()) {
#if MIXPREC_WITH_CUDA
    return Device::cuda(device.has_index() ? device.index() : 0);
#else
    mixprec::detail::throw_error(what, ": the tensor is on ", device,
                                 ", but mixprec was built without CUDA (link mixprec::cuda as well as "
                                 "mixprec::torch, and compile one .cu file that includes "
                                 "<mixprec/cuda/backend.cuh>; docs/libtorch.md)");
#endif
  }
  mixprec::detail::throw_error(what, ": the tensor is on ", device,
                               "; mixprec views tensors on the CPU and on CUDA devices");
}

/// A mixprec view of `t`'s elements: the same memory (`t.data_ptr()`), its
/// shape, element type and device. Nothing is copied; writes through the
/// view change `t`, and the view is valid while `t`'s storage lives and is
/// not reallocated. `t` must be defined, strided, contiguous (row-major),
/// of dtype Half, BFloat16 or Float, on the CPU or (with mixprec::cuda) a
/// CUDA device. Errors name `what` and the problem. Writes through the view
/// do not bump autograd's version counter (torch.optim's in-place updates
/// do), so autograd cannot see a step taken between a forward pass and its
/// backward: step after the backward, before the next forward.
inline TensorRef view(const ::torch::Tensor& t, const std::string& what = "tensor") {
  MIXPREC_CHECK(t.defined(), what, ": the tensor is undefined");
  MIXPREC_CHECK(t.layout() == ::torch::kStrided, what, ": layout ", t.layout(),
                " is not supported; mixprec views dense (strided) tensors");
  const DType dtype = dtype_of(t.scalar_type(), what);
  const Device device = device_of(t.device(), what);
  MIXPREC_CHECK(t.is_contiguous(), what, ": the tensor is not contiguous (sizes ", detail::sizes_of(t),
                ", strides ", detail::strides_of(t),
                "); mixprec views row-major memory: make it contiguous before viewing it, e.g. "
                "`p.set_data(p.contiguous())` under torch::NoGradGuard");
  Shape shape(std::vector<std::int64_t>(t.sizes().begin(), t.sizes().end()));
  void* data = t.numel() == 0 ? nullptr : t.data_ptr();
  switch (dtype) {
    case DType::float16:
      return TensorView<half>(static_cast<half*>(data), std::move(shape), device);
    case DType::bfloat16:
      return TensorView<bfloat16>(static_cast<bfloat16*>(data), std::move(shape), device);
    case DType::float32:
      break;
  }
  return TensorView<float>(static_cast<float*>(data), std::move(shape), device);
}

/// Parameter `name`: `weight` viewed as the model weight and `weight.grad()`
/// as its gradient, both as view() makes them. The gradient must exist: a
/// tensor has none until a backward pass reaches it, so run one backward
/// first or allocate it (allocate_grads()). Both must be on one device.
/// torch keeps writing into that same .grad() as long as it is zeroed in
/// place (`zero_grad(/*set_to_none=*/false)`); a .grad() that torch
/// replaces must be viewed again (rebind()).
inline optim::Param param(std::string name, const ::torch::Tensor& weight) {
  const std::string what = "parameter \"" + name + "\"";
  MIXPREC_CHECK(weight.defined(), what, ": the tensor is undefined");
  TensorRef w = view(weight, what);
  const ::torch::Tensor& grad = weight.grad();
  if (!grad.defined()) {
    mixprec::detail::throw_error(
        what, ": has no gradient yet (.grad() is undefined)",
        weight.requires_grad() ? "" : ", and it does not require grad (leave a frozen parameter out)",
        "; run one forward and backward pass before viewing it, or allocate it first: "
        "mixprec::libtorch::allocate_grads(module), or p.mutable_grad() = torch::zeros_like(p)");
  }
  MIXPREC_CHECK(grad.device() == weight.device(), what, ": the weight is on ", weight.device(),
                " but its gradient is on ", grad.device(), "; both must be on one device");
  TensorRef g = view(grad, what + " (its gradient)");
  MIXPREC_CHECK(g.shape() == w.shape(), what, ": weight shape ", w.shape(), " != gradient shape ", g.shape());
  return optim::Param{std::move(name), std::move(w), std::move(g)};
}

/// Gives every parameter of `module` that requires grad and has no
/// gradient yet a gradient of zeros (`torch::zeros_like`, same dtype,
/// device and layout), so that params() can view it before the first
/// backward pass. torch's backward then adds into those tensors in place.
inline void allocate_grads(::torch::nn::Module& module) {
  ::torch::NoGradGuard no_grad;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    ::torch::Tensor& p = item.value();
    if (p.requires_grad() && !p.grad().defined()) p.mutable_grad() = ::torch::zeros_like(p);
  }
}

/// Every parameter of `module` that requires grad, as param() views it,
/// named and ordered as `module.named_parameters()` ("0.weight",
/// "fc1.bias", ...). A tensor registered under two names (tied weights)
/// is given once, under its first name; parameters that do not require
/// grad (frozen) are left out. Throws, naming the parameter, on the first
/// that param() refuses.
inline std::vector<optim::Param> params(const ::torch::nn::Module& module) {
  std::vector<optim::Param> out;
  std::unordered_set<const void*> seen;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    const ::torch::Tensor& p = item.value();
    if (!p.requires_grad()) continue;
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    out.push_back(param(item.key(), p));
  }
  return out;
}

/// Throws, naming the parameter, unless each of `opt`'s parameters that
/// `module` has (by name) still views that parameter's current data and
/// .grad(). torch replaces a .grad() (so the optimizer would update a
/// tensor torch no longer uses) on `zero_grad(/*set_to_none=*/true)`, the
/// default of torch 2.x's C++ `zero_grad()`; on a backward with
/// create_graph; and on `p.mutable_grad() = ...`. Cheap (two pointer
/// comparisons a parameter): call it before each step while in doubt.
inline void check_views(const optim::Optimizer& opt, const ::torch::nn::Module& module) {
  std::unordered_map<std::string, ::torch::Tensor> by_name;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) by_name.emplace(item.key(), item.value());
  for (std::size_t i = 0; i < opt.num_params(); ++i) {
    const optim::Param& q = opt.param(i);
    const auto it = by_name.find(q.name);
    if (it == by_name.end()) continue;
    const ::torch::Tensor& p = it->second;
    const void* data = p.numel() == 0 ? nullptr : p.data_ptr();
    MIXPREC_CHECK(q.weight.data() == data, opt.name(), ": parameter \"", q.name,
                  "\": the tensor's data moved since it was viewed (",
                  q.weight.data(), " -> ", data, "); call mixprec::libtorch::rebind(opt, module)");
    const ::torch::Tensor& g = p.grad();
    const void* gdata = !g.defined() || g.numel() == 0 ? nullptr : g.data_ptr();
    MIXPREC_CHECK(g.defined() && q.grad.data() == gdata, opt.name(), ": parameter \"", q.name, "\": its .grad() ",
                  g.defined() ? "was replaced by another tensor" : "is now undefined",
                  " since it was viewed, so the optimizer would read a gradient torch no longer writes; "
                  "zero gradients in place (module.zero_grad(/*set_to_none=*/false)), or call "
                  "mixprec::libtorch::rebind(opt, module) after the backward pass");
  }
}

/// Views again each of `opt`'s parameters that `module` has (by name), for
/// a .grad() or data that torch has replaced (Optimizer::rebind: same
/// shapes and device; the masters stay, and the new weight is rewritten
/// from them at the next applied step). Checked like param().
inline void rebind(optim::Optimizer& opt, const ::torch::nn::Module& module) {
  std::vector<std::pair<std::size_t, optim::Param>> fresh;
  std::unordered_map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < opt.num_params(); ++i) index.emplace(opt.param(i).name, i);
  // Every view is made (and checked) before the first rebind changes anything.
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    const auto it = index.find(item.key());
    if (it != index.end()) fresh.emplace_back(it->second, param(item.key(), item.value()));
  }
  for (auto& [i, p] : fresh) opt.rebind(i, std::move(p.weight), std::move(p.grad));
}

}  // namespace libtorch
MIXPREC_NAMESPACE_END  // namespace mixprec
