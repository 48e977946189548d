// SPDX-License-Identifier: Apache-2.0
// The seam between amp::DeviceGradScaler (plain C++) and its three small
// kernels (kernels/mixprec/cuda/backend.cuh installs them, with the
// optimizers' DeviceBackend, when one .cu file of the program includes it).
#pragma once

#include <atomic>

#include "mixprec/amp/scale_update.hpp"
#include "mixprec/amp/spike_guard.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/tensor/tensor_ref.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace amp {

/// What the spike guard's decision reads on the device (DeviceGradScaler,
/// at an iteration's first step): the loss (null when it is not judged) and
/// the found-inf flags and sums of squares of the optimizers unscaled so far.
struct GuardDecideInputs {
  static constexpr int kMaxOptimizers = 8;
  const float* loss = nullptr;
  const int* found_inf[kMaxOptimizers] = {};
  const double* total_sum_squares[kMaxOptimizers] = {};
  int count = 0;
  const float* scale = nullptr;  // the iteration's scale: norm = float(sqrt(sum) * float(1 / (scale * divisor)))
  double grad_divisor = 1.0;
};

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
  /// The spike guard's decision (spike_guard_step on the global norm and
  /// the loss of `in`), window and counters updated in place. One
  /// single-thread launch.
  virtual void guard_decide(SpikeGuardState* s, double* window, const SpikeGuardPolicy& policy,
                            const GuardDecideInputs& in, stream_t stream) = 0;
  /// *combined = *found_inf || s->skip (what one optimizer's step reads);
  /// *any_inf |= *found_inf (what the scale update reads). One single-thread launch.
  virtual void guard_combine(const SpikeGuardState* s, const int* found_inf, int* combined, int* any_inf,
                             stream_t stream) = 0;
};

/// The end of an iteration launched by someone else: DeviceGradScaler::update(FusedUpdate&)
/// calls launch() where update() would launch DeviceScalerKernels::update_scale, so work
/// that must run once an iteration (monitor::Monitor's record of the step) shares that launch
/// instead of adding one to every step. The one launch must do what update_scale does to *s,
/// bit for bit (amp::end_iteration in one thread, after every read of the scale or any_inf
/// that the fused work makes: they describe the iteration that ends). Asynchronous on
/// `stream`; capturable. An exception means nothing was launched.
class FusedUpdate {
 public:
  virtual ~FusedUpdate() = default;
  virtual void launch(DeviceScalerState* s, const ScalePolicy& policy, bool dynamic, stream_t stream) = 0;
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
