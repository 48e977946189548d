// SPDX-License-Identifier: Apache-2.0
// TensorView<T>: a non-owning view of contiguous row-major elements on a
// device: a user's own weights or gradients, wrapped with no copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/shape.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

namespace detail {
// flat() and matrix() as Eigen maps: specialised by <mixprec/tensor/eigen.hpp>,
// so that views cost no Eigen include where nothing maps them.
template <class T, class Enable = void>
struct EigenMaps {
  static_assert(sizeof(T) == 0,
                "TensorView::flat() and matrix() need #include <mixprec/tensor/eigen.hpp> (mixprec.hpp includes it)");
};
}  // namespace detail

/// A pointer, a shape and the device the pointer belongs to. T is an element
/// type, optionally const (`TensorView<const half>` reads only). Copying a
/// view copies the pointer, never the data; the owner keeps the memory alive.
template <class T>
class TensorView {
 public:
  using element_type = T;
  using value_type = std::remove_const_t<T>;
  static_assert(is_element_type_v<value_type>,
                "TensorView: element types are mixprec::half, mixprec::bfloat16 and float");

  /// An empty view: no data, shape [0], on the CPU.
  TensorView() : shape_({0}) {}

  /// Views `shape.numel()` elements at `data` on `device`. `data` may be null
  /// only when the shape holds no element. Nothing is checked about where the
  /// pointer really points: a device pointer labelled cpu is the caller's bug.
  TensorView(T* data, Shape shape, Device device = Device::cpu())
      : data_(data), shape_(std::move(shape)), device_(device) {
    MIXPREC_CHECK(data != nullptr || shape_.numel() == 0, "TensorView: data = nullptr with shape ",
                  shape_, " (", shape_.numel(), " elements)");
  }

  /// A read-only view from a writable one (implicit, like T* to const T*).
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()), shape_(other.shape()), device_(other.device()) {}

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  std::int64_t numel() const { return shape_.numel(); }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * sizeof(value_type); }
  Device device() const { return device_; }
  DType dtype() const { return dtype_of<value_type>; }
  bool empty() const { return numel() == 0; }

  /// The same elements under another shape with the same element count.
  TensorView reshape(Shape shape) const {
    MIXPREC_CHECK(shape.numel() == numel(), "TensorView::reshape: shape ", shape, " has ",
                  shape.numel(), " elements, the view has ", numel(), " (shape ", shape_, ")");
    return TensorView(data_, std::move(shape), device_);
  }

  /// True when data() is a multiple of `alignment` bytes.
  bool is_aligned(std::size_t alignment) const {
    return reinterpret_cast<std::uintptr_t>(data_) % alignment == 0;
  }
  /// Throws, naming `op`, unless data() is a multiple of `alignment` bytes.
  void require_aligned(std::size_t alignment, const char* op) const {
    detail::check_aligned(data_, alignment, op, "data");
  }

  /// Host element access, bounds-checked. Throws for device views.
  T& at(std::int64_t i) const {
    require_host("TensorView::at");
    MIXPREC_CHECK(i >= 0 && i < numel(), "TensorView::at: index = ", i, ", numel is ", numel());
    return data_[i];
  }

  /// All elements as a column Eigen::Map of an Eigen::Array (host only).
  /// half and bfloat16 map as Eigen::half and Eigen::bfloat16, the same
  /// bits. Needs <mixprec/tensor/eigen.hpp>.
  template <class U = T>
  auto flat() const {
    require_host("TensorView::flat");
    return detail::EigenMaps<U>::flat(data_, numel());
  }

  /// A rank-2 view as a row-major Eigen::Map matrix (host only); element
  /// types as for flat(). Needs <mixprec/tensor/eigen.hpp>.
  template <class U = T>
  auto matrix() const {
    require_host("TensorView::matrix");
    MIXPREC_CHECK(shape_.rank() == 2, "TensorView::matrix: shape ", shape_, " has rank ",
                  shape_.rank(), ", must be 2");
    return detail::EigenMaps<U>::matrix(data_, shape_[0], shape_[1]);
  }

 private:
  void require_host(const char* op) const {
    MIXPREC_CHECK(device_.is_cpu(), op, ": the view is on ", device_, ", host access needs cpu");
  }

  T* data_ = nullptr;
  Shape shape_;
  Device device_ = Device::cpu();
};

MIXPREC_NAMESPACE_END  // namespace mixprec
