// SPDX-License-Identifier: Apache-2.0
// Tensor<T>: an owning, contiguous row-major tensor on the host or a CUDA
// device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "mixprec/core/device.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/tensor/shape.hpp"
#include "mixprec/tensor/ops.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

/// Owns `shape.numel()` elements of T on `device`: 64-byte aligned host
/// memory, or device memory from cudaMalloc / cudaMallocAsync. Move-only:
/// copying data is explicit (clone(), to(), mixprec::copy). Contents start
/// uninitialised; see mixprec::fill and the random fills in tensor/ops.hpp.
template <class T>
class Tensor {
 public:
  static_assert(is_element_type_v<T>,
                "Tensor: element types are mixprec::half, mixprec::bfloat16 and float");
  using value_type = T;

  Tensor() : shape_({0}) {}

  explicit Tensor(Shape shape, Device device = Device::cpu(), stream_t stream = nullptr,
                  DeviceAllocator allocator = DeviceAllocator::cuda_malloc)
      : shape_(std::move(shape)),
        buffer_(static_cast<std::size_t>(shape_.numel()) * sizeof(T), device, stream, allocator) {}

  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  T* data() { return static_cast<T*>(buffer_.data()); }
  const T* data() const { return static_cast<const T*>(buffer_.data()); }
  const Shape& shape() const { return shape_; }
  std::int64_t numel() const { return shape_.numel(); }
  std::size_t bytes() const { return buffer_.bytes(); }
  Device device() const { return buffer_.device(); }
  DType dtype() const { return dtype_of<T>; }
  bool empty() const { return numel() == 0; }

  TensorView<T> view() { return TensorView<T>(data(), shape_, device()); }
  TensorView<const T> view() const { return TensorView<const T>(data(), shape_, device()); }
  operator TensorView<T>() { return view(); }                   // NOLINT
  operator TensorView<const T>() const { return view(); }       // NOLINT

  /// Host element access, bounds-checked (throws for device tensors).
  T& at(std::int64_t i) { return view().at(i); }
  const T& at(std::int64_t i) const { return view().at(i); }
  auto flat() { return view().flat(); }
  auto flat() const { return view().flat(); }
  auto matrix() { return view().matrix(); }
  auto matrix() const { return view().matrix(); }

  /// Reinterprets the shape; the element count must not change.
  void reshape(Shape shape) {
    MIXPREC_CHECK(shape.numel() == numel(), "Tensor::reshape: shape ", shape, " has ",
                  shape.numel(), " elements, the tensor has ", numel(), " (shape ", shape_, ")");
    shape_ = std::move(shape);
  }

  /// A copy on `device`, through mixprec::copy (same synchronisation).
  Tensor to(Device device, stream_t stream = nullptr) const {
    Tensor out(shape_, device, stream);
    copy(*this, out, stream);
    return out;
  }
  /// A copy on the same device.
  Tensor clone(stream_t stream = nullptr) const { return to(device(), stream); }

 private:
  Shape shape_;
  Buffer buffer_;
};

MIXPREC_NAMESPACE_END  // namespace mixprec
