// SPDX-License-Identifier: Apache-2.0
// The seam between amp::DeviceGradScaler (plain C++) and its three small
// kernels (kernels/mixprec/cuda/backend.cuh installs them, with the
// optimizers' DeviceBackend, when one .cu file of the program includes it).
#pragma once

#include <atomic>

#include "mixprec/amp/scale_update.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace amp {

/// What DeviceGradScaler launches. All asynchronous on `stream`.
class DeviceScalerKernels {
 public:
  virtual ~DeviceScalerKernels() = default;
  /// The end of an iteration: counts it as applied or skipped (by
  /// any_inf), updates the scale when `dynamic`, resets any_inf. One
  /// single-thread launch.
  virtual void update_scale(DeviceScalerState* s, const ScalePolicy& policy, bool dynamic, stream_t stream) = 0;
  /// *dst |= *src (device ints), one single-thread launch.
  virtual void or_flag(const int* src, int* dst, stream_t stream) = 0;
  /// t[i] *= *scale, in t's element type (rounded to nearest even).
  virtual void scale(const TensorRef& t, const float* scale, stream_t stream) = 0;
};

namespace detail {
inline std::atomic<DeviceScalerKernels*>& device_scaler_kernels_slot() {
  static std::atomic<DeviceScalerKernels*> slot{nullptr};
  return slot;
}
}  // namespace detail

/// Installs the kernels' implementation (backend.cuh does this for you).
inline void install_device_scaler_kernels(DeviceScalerKernels* k) { detail::device_scaler_kernels_slot().store(k); }
/// The installed implementation, or null.
inline DeviceScalerKernels* device_scaler_kernels() { return detail::device_scaler_kernels_slot().load(); }

}  // namespace amp
MIXPREC_NAMESPACE_END
