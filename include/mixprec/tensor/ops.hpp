// SPDX-License-Identifier: Apache-2.0
// Host-API operations on views: copies between devices, dtype conversion on
// the host, fills and seeded random fills. These are for set-up and
// read-back; the training step's own work runs in kernels.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/core/convert.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/random.hpp"
#include "mixprec/core/simd.hpp"
#include "mixprec/tensor/tensor_view.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN

template <class T>
class Tensor;

/// The view of a Tensor or a TensorView, so every operation below takes
/// either.
template <class T>
TensorView<T> as_view(TensorView<T> v) {
  return v;
}
template <class T>
TensorView<T> as_view(Tensor<T>& t) {
  return t.view();
}
template <class T>
TensorView<const T> as_view(const Tensor<T>& t) {
  return t.view();
}

namespace detail {

template <class A>
using view_of_t = decltype(as_view(std::declval<A&>()));
template <class A>
using element_of_t = typename view_of_t<A>::value_type;

template <class A>
constexpr bool is_writable_v = !std::is_const_v<typename view_of_t<A>::element_type>;

inline void require_same_shape(const Shape& a, const Shape& b, const char* op) {
  MIXPREC_CHECK(a == b, op, ": src shape ", a, " != dst shape ", b);
}

#if MIXPREC_WITH_CUDA
inline void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                       std::size_t bytes, stream_t stream) {
  if (dst_device.is_cuda() && src_device.is_cuda() && dst_device != src_device) {
    MIXPREC_CUDA_CHECK(cudaMemcpyPeerAsync(dst, dst_device.index(), src, src_device.index(), bytes,
                                           stream));
  } else {
    MIXPREC_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
  }
  // Host memory in the copy may be pinned, in which case the transfer is
  // truly asynchronous; waiting here makes "the host side is done when copy
  // returns" hold for every kind of host memory.
  if (dst_device.is_cpu() || src_device.is_cpu()) MIXPREC_CUDA_CHECK(cudaStreamSynchronize(stream));
}
#endif

/// Copies raw bytes between any two devices (copy_bytes' synchronisation);
/// without CUDA only host-to-host.
inline void copy_raw(void* dst, Device dst_device, const void* src, Device src_device, std::size_t bytes,
                     stream_t stream = nullptr) {
  if (bytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memmove(dst, src, bytes);
    return;
  }
  require_usable(dst_device.is_cuda() ? dst_device : src_device, "copy_raw");
#if MIXPREC_WITH_CUDA
  copy_bytes(dst, dst_device, src, src_device, bytes, stream);
#else
  (void)stream;  // unreachable: require_usable rejected the device
#endif
}

}  // namespace detail

/// Copies src into dst (same shape and element type), between any two
/// devices. Device-to-device copies are asynchronous on `stream`; a copy that
/// involves host memory synchronises `stream` before it returns.
template <class Src, class Dst>
void copy(const Src& src_in, Dst&& dst_in, stream_t stream = nullptr) {
  using T = detail::element_of_t<Dst>;
  static_assert(std::is_same_v<detail::element_of_t<Src>, T>,
                "copy: src and dst must hold the same element type (use convert)");
  static_assert(detail::is_writable_v<Dst>, "copy: dst must be writable");
  const TensorView<const T> src = as_view(src_in);
  const TensorView<T> dst = as_view(dst_in);
  detail::require_same_shape(src.shape(), dst.shape(), "copy");
  detail::require_usable(src.device(), "copy (src)");
  detail::require_usable(dst.device(), "copy (dst)");
  if (src.empty() || src.data() == dst.data()) return;
  if (src.device().is_cpu() && dst.device().is_cpu()) {
    std::memmove(dst.data(), src.data(), src.bytes());
    return;
  }
#if MIXPREC_WITH_CUDA
  detail::copy_bytes(dst.data(), dst.device(), src.data(), src.device(), src.bytes(), stream);
#else
  (void)stream;  // unreachable: require_usable rejected the device
#endif
}

/// Converts element types on the host: dst[i] = convert<To>(src[i]), rounding
/// to nearest even (see core/convert.hpp). Both views must be on the CPU.
template <class Src, class Dst>
void convert(const Src& src_in, Dst&& dst_in) {
  static_assert(detail::is_writable_v<Dst>, "convert: dst must be writable");
  const TensorView<const detail::element_of_t<Src>> src = as_view(src_in);
  const auto dst = as_view(dst_in);
  detail::require_same_shape(src.shape(), dst.shape(), "convert");
  MIXPREC_CHECK(src.device().is_cpu() && dst.device().is_cpu(), "convert: src is on ",
                src.device(), " and dst on ", dst.device(),
                "; this host function needs both on cpu (on the GPU, use the kernels in "
                "kernels/mixprec/cuda/convert.cuh)");
  convert_n(src.data(), static_cast<std::size_t>(src.numel()), dst.data());
}

namespace detail {

// Writes the elements make(i) produces into dst: directly on the host; on a
// device through a pageable host staging buffer of at most 2^20 elements,
// copied chunk by chunk (synchronous).
template <class T, class Make>
void generate(TensorView<T> dst, stream_t stream, Make make) {
  detail::require_usable(dst.device(), "fill");
  const auto n = static_cast<std::size_t>(dst.numel());
  if (n == 0) return;
  if (dst.device().is_cpu()) {
    for (std::size_t i = 0; i < n; ++i) dst.data()[i] = make(i);
    return;
  }
#if MIXPREC_WITH_CUDA
  constexpr std::size_t chunk = std::size_t{1} << 20;
  std::vector<T> staging(n < chunk ? n : chunk);
  for (std::size_t begin = 0; begin < n; begin += chunk) {
    const std::size_t m = n - begin < chunk ? n - begin : chunk;
    for (std::size_t i = 0; i < m; ++i) staging[i] = make(begin + i);
    detail::copy_bytes(dst.data() + begin, dst.device(), staging.data(), Device::cpu(),
                       m * sizeof(T), stream);
  }
#else
  (void)stream;
#endif
}

}  // namespace detail

/// Sets every element to `value` rounded to T. On the host a plain loop; on
/// a device a cudaMemsetAsync when the value's bits are all zero, otherwise
/// one element staged from the host and doubled by device-to-device copies
/// (log2(n) copies, asynchronous on `stream` after the first small one).
template <class Dst>
void fill(Dst&& dst_in, float value, stream_t stream = nullptr) {
  static_assert(detail::is_writable_v<Dst>, "fill: dst must be writable");
  using T = detail::element_of_t<Dst>;
  const TensorView<T> dst = as_view(dst_in);
  detail::require_usable(dst.device(), "fill");
  const T v = from_float<T>(value);
  const auto n = static_cast<std::size_t>(dst.numel());
  if (n == 0) return;
  if (dst.device().is_cpu()) {
    for (std::size_t i = 0; i < n; ++i) dst.data()[i] = v;
    return;
  }
#if MIXPREC_WITH_CUDA
  if (to_bits(v) == 0) {
    detail::DeviceGuard guard(dst.device());
    MIXPREC_CUDA_CHECK(cudaMemsetAsync(dst.data(), 0, dst.bytes(), stream));
    return;
  }
  detail::copy_bytes(dst.data(), dst.device(), &v, Device::cpu(), sizeof(T), stream);
  for (std::size_t done = 1; done < n; done *= 2) {
    const std::size_t m = n - done < done ? n - done : done;
    detail::copy_bytes(dst.data() + done, dst.device(), dst.data(), dst.device(), m * sizeof(T),
                       stream);
  }
#else
  (void)stream;
#endif
}

/// Fills with values uniform in [low, high), element i drawn from (seed, i)
/// alone, then rounded to T: the same seed gives the same values on every
/// device. Synchronous when dst is on a device (values are made on the host).
template <class Dst>
void fill_uniform(Dst&& dst, float low, float high, std::uint64_t seed,
                  stream_t stream = nullptr) {
  MIXPREC_CHECK(std::isfinite(low) && std::isfinite(high) && low < high,
                "fill_uniform: [low, high) = [", low, ", ", high,
                "), must be finite with low < high");
  using T = detail::element_of_t<Dst>;
  static_assert(detail::is_writable_v<Dst>, "fill_uniform: dst must be writable");
  detail::generate(as_view(dst), stream, [=](std::size_t i) {
    const float u = detail::uniform01(detail::random_bits(seed, i));
    return from_float<T>(low + math::mul(high - low, u));
  });
}

/// Fills with normal values of the given mean and standard deviation (Box-
/// Muller on (seed, i)), rounded to T. Same determinism as fill_uniform.
template <class Dst>
void fill_normal(Dst&& dst, float mean, float stddev, std::uint64_t seed,
                 stream_t stream = nullptr) {
  MIXPREC_CHECK(std::isfinite(mean), "fill_normal: mean = ", mean, ", must be finite");
  MIXPREC_CHECK(std::isfinite(stddev) && stddev >= 0.0f, "fill_normal: stddev = ", stddev,
                ", must be finite and >= 0");
  using T = detail::element_of_t<Dst>;
  static_assert(detail::is_writable_v<Dst>, "fill_normal: dst must be writable");
  detail::generate(as_view(dst), stream, [=](std::size_t i) {
    return from_float<T>(
        mean + math::mul(stddev, detail::standard_normal(detail::random_bits(seed, i))));
  });
}

MIXPREC_NAMESPACE_END  // namespace mixprec
