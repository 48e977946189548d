// SPDX-License-Identifier: Apache-2.0
// Buffer: an owning, untyped allocation on the host (64-byte aligned) or on a
// CUDA device (cudaMalloc or stream-ordered cudaMallocAsync).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <utility>

#include "mixprec/core/config.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"

MIXPREC_NAMESPACE_BEGIN

/// Alignment of every host allocation mixprec makes: a cache line, and enough
/// for any SIMD load.
inline constexpr std::size_t host_alignment = 64;

/// How device memory is obtained.
enum class DeviceAllocator {
  /// cudaMalloc / cudaFree: synchronous, independent of any stream.
  cuda_malloc,
  /// cudaMallocAsync / cudaFreeAsync on the buffer's stream: ordered with
  /// the work on that stream, no device-wide synchronisation. The stream
  /// must outlive the buffer.
  stream_ordered,
};

namespace detail {

/// Throws unless `ptr` is a multiple of `alignment` bytes.
inline void check_aligned(const void* ptr, std::size_t alignment, const char* op,
                          const char* arg) {
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  MIXPREC_CHECK(address % alignment == 0, op, ": ", arg, " = ", ptr, " is not aligned to ",
                alignment, " bytes");
}

/// Fault injection for tests of failure paths: when set, every Buffer
/// allocation first calls it and fails as an allocation failure (an Error)
/// when it returns true. Null (the default) in every real program.
using AllocationFaultHook = bool (*)(std::size_t bytes, Device device);
inline std::atomic<AllocationFaultHook>& allocation_fault_hook() {
  static std::atomic<AllocationFaultHook> hook{nullptr};
  return hook;
}

}  // namespace detail

/// An owning allocation of `bytes()` bytes on `device()`. Move-only. The
/// memory is uninitialised. Zero bytes allocate nothing (data() is null).
class Buffer {
 public:
  Buffer() = default;

  Buffer(std::size_t bytes, Device device, stream_t stream = nullptr,
         DeviceAllocator allocator = DeviceAllocator::cuda_malloc)
      : bytes_(bytes), device_(device), stream_(stream), allocator_(allocator) {
    detail::require_usable(device, "Buffer");
    if (bytes == 0) return;
    if (const detail::AllocationFaultHook hook = detail::allocation_fault_hook().load(); hook && hook(bytes, device)) {
      detail::throw_error("Buffer: allocation of ", bytes, " bytes on ", device, " failed (injected)");
    }
    if (device.is_cpu()) {
      // aligned_alloc wants a size that is a multiple of the alignment.
      const std::size_t rounded = (bytes + host_alignment - 1) / host_alignment * host_alignment;
      MIXPREC_CHECK(rounded >= bytes, "Buffer: bytes = ", bytes, " is too large");
      data_ = std::aligned_alloc(host_alignment, rounded);
      MIXPREC_CHECK(data_ != nullptr, "Buffer: host allocation of ", bytes, " bytes failed");
      return;
    }
#if MIXPREC_WITH_CUDA
    detail::DeviceGuard guard(device);
    if (allocator == DeviceAllocator::stream_ordered) {
      MIXPREC_CUDA_CHECK(cudaMallocAsync(&data_, bytes, stream));
    } else {
      MIXPREC_CUDA_CHECK(cudaMalloc(&data_, bytes));
    }
#endif
  }

  ~Buffer() { release(); }

  Buffer(Buffer&& other) noexcept { swap(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      swap(other);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  stream_t stream() const { return stream_; }

 private:
  void swap(Buffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
    std::swap(device_, other.device_);
    std::swap(stream_, other.stream_);
    std::swap(allocator_, other.allocator_);
  }

  // Never throws: a failure to free has nowhere to go from a destructor.
  void release() noexcept {
    if (data_ == nullptr) return;
    if (device_.is_cpu()) {
      std::free(data_);
    } else {
#if MIXPREC_WITH_CUDA
      int previous = 0;
      const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device_.index() &&
                            cudaSetDevice(device_.index()) == cudaSuccess;
      if (allocator_ == DeviceAllocator::stream_ordered) {
        (void)cudaFreeAsync(data_, stream_);
      } else {
        (void)cudaFree(data_);
      }
      if (switched) (void)cudaSetDevice(previous);
#endif
    }
    data_ = nullptr;
    bytes_ = 0;
  }

  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Device device_ = Device::cpu();
  stream_t stream_ = nullptr;
  DeviceAllocator allocator_ = DeviceAllocator::cuda_malloc;
};

MIXPREC_NAMESPACE_END  // namespace mixprec
