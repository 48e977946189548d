// SPDX-License-Identifier: Apache-2.0
// Device: where a tensor's memory lives (the host, or one CUDA device), and
// queries about the CUDA devices this build can reach.
#pragma once

#include <cstdlib>
#include <ostream>
#include <string>

#include "mixprec/core/config.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/error.hpp"

MIXPREC_NAMESPACE_BEGIN

/// A memory location: `Device::cpu()` or `Device::cuda(index)`.
class Device {
 public:
  enum class Kind { cpu, cuda };

  constexpr Device() = default;
  static constexpr Device cpu() { return Device(Kind::cpu, 0); }
  /// CUDA device `index`. Whether it exists is checked when memory is
  /// allocated there, not here.
  static Device cuda(int index = 0) {
    MIXPREC_CHECK(index >= 0, "Device::cuda: index = ", index, ", must be >= 0");
    return Device(Kind::cuda, index);
  }
  /// Parses "cpu", "cuda" or "cuda:N".
  static Device parse(const std::string& text) {
    if (text == "cpu") return cpu();
    if (text == "cuda") return cuda(0);
    if (text.rfind("cuda:", 0) == 0 && text.size() > 5) {
      const std::string digits = text.substr(5);
      char* end = nullptr;
      const long index = std::strtol(digits.c_str(), &end, 10);
      if (*end == '\0' && digits.find_first_not_of("0123456789") == std::string::npos &&
          index <= 1 << 20) {
        return cuda(static_cast<int>(index));
      }
    }
    detail::throw_error("Device::parse: text = \"", text,
                        "\", expected \"cpu\", \"cuda\" or \"cuda:N\"");
  }

  constexpr Kind kind() const { return kind_; }
  constexpr int index() const { return index_; }
  constexpr bool is_cpu() const { return kind_ == Kind::cpu; }
  constexpr bool is_cuda() const { return kind_ == Kind::cuda; }

  std::string str() const {
    return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index_);
  }

  friend constexpr bool operator==(Device a, Device b) {
    return a.kind_ == b.kind_ && a.index_ == b.index_;
  }
  friend constexpr bool operator!=(Device a, Device b) { return !(a == b); }
  friend std::ostream& operator<<(std::ostream& out, Device d) { return out << d.str(); }

 private:
  constexpr Device(Kind kind, int index) : kind_(kind), index_(index) {}
  Kind kind_ = Kind::cpu;
  int index_ = 0;
};

/// True when this build reaches the CUDA runtime (linked with mixprec::cuda).
constexpr bool built_with_cuda() { return MIXPREC_WITH_CUDA != 0; }

/// The number of CUDA devices usable now: 0 in a build without CUDA, and 0
/// when the runtime finds no device or no driver (never throws for that).
inline int cuda_device_count() {
#if MIXPREC_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" status
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

/// True when at least one CUDA device is usable.
inline bool cuda_available() { return cuda_device_count() > 0; }

namespace detail {

/// Throws unless `device` can hold memory in this build and process.
inline void require_usable(Device device, const char* op) {
  if (device.is_cpu()) return;
#if MIXPREC_WITH_CUDA
  const int count = cuda_device_count();
  MIXPREC_CHECK(device.index() < count, op, ": device = ", device, ", but ", count,
                " CUDA device(s) are usable");
#else
  throw_error(op, ": device = ", device,
              ", but mixprec was built without CUDA (link the mixprec::cuda target)");
#endif
}

#if MIXPREC_WITH_CUDA
/// Makes `device` current for its scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device device) {
    MIXPREC_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device.index() != previous_) MIXPREC_CUDA_CHECK(cudaSetDevice(device.index()));
  }
  ~DeviceGuard() { (void)cudaSetDevice(previous_); }  // never throws
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};
#endif

}  // namespace detail
MIXPREC_NAMESPACE_END  // namespace mixprec
