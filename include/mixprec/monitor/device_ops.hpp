// SPDX-License-Identifier: Apache-2.0
// The seam between the monitor (host C++) and its CUDA kernels
// (kernels/mixprec/cuda/monitor.cuh, installed with the other kernels by
// <mixprec/cuda/backend.cuh>). The layout of a read-back is shared: the
// kernels write it into pinned host memory, the monitor reads it there.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "mixprec/amp/scale_update.hpp"
#include "mixprec/core/config.hpp"
#include "mixprec/core/device.hpp"

MIXPREC_NAMESPACE_BEGIN namespace monitor {

/// One monitored parameter as the kernels see it (device pointers).
struct DeviceParamInfo {
  const float* master = nullptr;        // the fp32 master weight
  std::int64_t numel = 0;
  const float* v = nullptr;             // second moment (null: none)
  const std::int64_t* step = nullptr;   // its step count (for bias correction)
  float eps = 0, beta2 = 0;             // SecondMoment
};

/// What a step's record reads, all device pointers, read when the kernel runs.
struct DeviceStepInputs {
  const float* loss = nullptr;          // null: the loss is not recorded (NaN)
  const float* scale = nullptr;         // the scale this step's gradients carry
  const int* found_inf = nullptr;       // the optimizer's pass 1 flag
  const double* total_sum_squares = nullptr;
  const double* sum_squares = nullptr;  // per parameter
  const int* nonfinite = nullptr;       // per parameter
  const std::int32_t* guard_skip = nullptr;  // the spike guard's decision (null: no guard)
};

/// One step as recorded on the device.
struct DeviceStep {
  float loss;
  float scale;
  std::int32_t found_inf;
  std::int32_t guard_skip;  // the spike guard skipped it
  double sum_squares;  // of the stored (scaled) gradients
};

/// One parameter's sums at a logged step.
struct DeviceParamSums {
  double grad_sum_squares;   // of the stored gradient
  double update_sum_squares; // of master after - master before
  double weight_sum_squares; // of master before
  double eps_count;          // elements where eps dominates
  double v_ratio_sum;        // the update pass's precursor sums (Optimizer::set_precursors):
  double lost_count;         //   g^2 / max(v-hat, eps^2), updates under half an ulp
  std::int32_t nonfinite;
  std::int32_t has_v;
};

/// A published read-back: header, then `every` DeviceSteps (the ring, in
/// slot order), every step's per-parameter non-finite flags (int32
/// [every][params]), the parameters' sums, their histograms (uint64
/// [params][64]). The header's `seq` is written last: a slot is complete
/// when seq equals the number of the read-back it should hold, plus one.
struct ReadbackHeader {
  std::int64_t seq;    // 1-based number of this read-back
  std::int64_t steps;  // steps recorded on the device so far
};

struct ReadbackLayout {
  std::size_t steps = 0, nonfinite = 0, sums = 0, hist = 0, bytes = 0;  // offsets and size

  static constexpr std::size_t align(std::size_t n) { return (n + 15) / 16 * 16; }
  static ReadbackLayout of(int every, int params) {
    ReadbackLayout l;
    const auto k = static_cast<std::size_t>(every), p = static_cast<std::size_t>(params);
    l.steps = align(sizeof(ReadbackHeader));
    l.nonfinite = l.steps + align(k * sizeof(DeviceStep));
    l.sums = l.nonfinite + align(k * p * sizeof(std::int32_t));
    l.hist = l.sums + align(p * sizeof(DeviceParamSums));
    l.bytes = l.hist + align(p * 64 * sizeof(std::uint64_t));
    return l;
  }
};

/// The scaler's end of iteration that a monitored step's last launch also
/// does (amp::FusedUpdate): amp::end_iteration(*state, policy, dynamic).
struct ScalerUpdate {
  amp::DeviceScalerState* state = nullptr;
  amp::ScalePolicy policy;
  bool dynamic = false;
};

/// The device side of one Monitor: its buffers and launches. Every launch is
/// asynchronous on the given stream and can be captured in a CUDA graph.
/// A monitored step adds no launch to an unmonitored one: the record shares
/// the scaler's end-of-iteration launch (end_step), and the buffers a logged
/// step adds to are zeroed by the publish that read them.
class DeviceMonitorPlan {
 public:
  virtual ~DeviceMonitorPlan() = default;
  /// The histograms the logged step's check pass adds to (device, uint64
  /// [params][64]), and the precursor sums its update pass adds to
  /// (Optimizer::set_precursors; [param][kPrecursorSums], device memory).
  /// Both are zero when a logged step begins: allocated zeroed, and zeroed
  /// again by each publish once it has read them.
  virtual std::uint64_t* histogram() = 0;
  virtual double* precursors() = 0;
  /// Zeroes both: only for a logged step that stopped (an exception) after
  /// its check pass and before its publish, whose counts are still there.
  /// One launch.
  virtual void clear(stream_t stream) = 0;
  /// The step's end, one launch, in place of the scaler's own update kernel:
  /// stores the step's figures in ring slot (steps recorded) % every (the
  /// scale and found-inf as this step saw them), then the scaler's end of
  /// iteration (`update`). With `pinned` not null (a logged step) the same
  /// launch also publishes: the parameters' sums (update, weight, eps share:
  /// the precursors where the step moved the masters, else read from the
  /// masters and moments), then the last block records, ends the iteration,
  /// writes the read-back into pinned slot (read-backs published) % slots
  /// and its seq last, and zeroes the histograms and precursors.
  virtual void end_step(const DeviceStepInputs& in, const ScalerUpdate& update, void* pinned, int slots,
                        stream_t stream) = 0;
  /// Whether `stream` is capturing a CUDA graph now.
  virtual bool capturing(stream_t stream) = 0;
};

/// Where a new plan's counts start: the steps recorded and the read-backs
/// published before it (a monitor resumed from a checkpoint, or one whose
/// plan is made again mid-run), so that its ring slots and read-back seqs
/// go on from the host's.
struct PlanStart {
  std::int64_t steps = 0;
  std::int64_t published = 0;
};

class DeviceMonitorKernels {
 public:
  virtual ~DeviceMonitorKernels() = default;
  virtual std::unique_ptr<DeviceMonitorPlan> make_plan(const std::vector<DeviceParamInfo>& params, int every,
                                                       Device device, PlanStart start) = 0;
};

inline std::atomic<DeviceMonitorKernels*>& device_kernels_slot() {
  static std::atomic<DeviceMonitorKernels*> slot{nullptr};
  return slot;
}
inline void install_device_kernels(DeviceMonitorKernels* k) { device_kernels_slot().store(k); }
inline DeviceMonitorKernels* device_kernels() { return device_kernels_slot().load(); }

}  // namespace monitor
MIXPREC_NAMESPACE_END
