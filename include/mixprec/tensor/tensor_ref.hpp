// SPDX-License-Identifier: Apache-2.0
// TensorRef: a view whose element type is a runtime tag, for lists that mix
// fp16, bf16 and fp32 tensors (an optimizer's parameters and gradients).
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/tensor/shape.hpp"
#include "mixprec/tensor/tensor.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

/// A non-owning view with a runtime element type. Built implicitly from any
/// TensorView<T> (or Tensor<T>); `as<T>()` and `visit()` get the typed view
/// back.
class TensorRef {
 public:
  TensorRef() = default;
  template <class T>
  TensorRef(TensorView<T> v)  // NOLINT(google-explicit-constructor)
      : data_(const_cast<std::remove_const_t<T>*>(v.data())),
        dtype_(dtype_of<std::remove_const_t<T>>),
        shape_(v.shape()),
        device_(v.device()),
        read_only_(std::is_const_v<T>) {}
  template <class T>
  TensorRef(Tensor<T>& t) : TensorRef(t.view()) {}  // NOLINT(google-explicit-constructor)

  void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  Device device() const { return device_; }
  std::int64_t numel() const { return shape_.numel(); }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  /// True when built from a TensorView<const T>: nothing may write through it.
  bool read_only() const { return read_only_; }
  /// True when the two byte ranges share a byte (never for an empty one).
  bool overlaps(const TensorRef& other) const {
    if (bytes() == 0 || other.bytes() == 0 || device_ != other.device_) return false;
    const auto* a = static_cast<const char*>(data_);
    const auto* b = static_cast<const char*>(other.data_);
    return a < b + other.bytes() && b < a + bytes();
  }

  /// The typed view; throws, naming `what`, unless the dtype is T.
  template <class T>
  TensorView<T> as(const char* what = "TensorRef") const {
    MIXPREC_CHECK(dtype_ == dtype_of<std::remove_const_t<T>>, what, ": dtype is ", dtype_name(dtype_),
                  ", expected ", dtype_traits<std::remove_const_t<T>>::name);
    return TensorView<T>(static_cast<T*>(data_), shape_, device_);
  }

  /// Calls f(TensorView<T>) with T the runtime element type.
  template <class F>
  decltype(auto) visit(F&& f) const {
    switch (dtype_) {
      case DType::float16:
        return std::forward<F>(f)(as<half>());
      case DType::bfloat16:
        return std::forward<F>(f)(as<bfloat16>());
      case DType::float32:
        break;
    }
    return std::forward<F>(f)(as<float>());
  }

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::float32;
  Shape shape_{0};
  Device device_ = Device::cpu();
  bool read_only_ = false;
};

MIXPREC_NAMESPACE_END  // namespace mixprec
