// SPDX-License-Identifier: Apache-2.0
// The seam between the host API (plain C++, compiled by g++) and the CUDA
// kernels (compiled by nvcc). Optimizers and DeviceGradScaler hold their
// state in device memory and call the kernels through DeviceBackend, an
// interface whose one implementation lives in kernels/mixprec/cuda/backend.cuh.
// A program gets it by compiling one .cu file that includes that header (it
// installs itself); see docs/getting-started.md, "GPU training from .cpp
// files".
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/device.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/optim/schedule.hpp"
#include "mixprec/optim/state_layout.hpp"
#include "mixprec/tensor/tensor_ref.hpp"

MIXPREC_NAMESPACE_BEGIN namespace optim {

/// Parameter groups one device step launch can carry: their hyperparameters
/// travel as kernel arguments (64 x 48 bytes fits the portable 4 KiB), so a
/// step is one launch whatever the number of groups. An optimizer's Hyper
/// (its header, optim/optimizers/) must keep 64 of them within that.
inline constexpr std::size_t kMaxDeviceGroups = 64;

/// A parameter's lean state (optim/state_layout.hpp) as the device step
/// sees it, in device memory; inactive (and unread) where its group keeps
/// fp32 moments and an fp32 master.
struct DeviceLeanState {
  bool active = false;
  Moments moments = Moments::fp32;
  Master master = Master::fp32;
  unsigned nonnegative = 0;                          // bit k: state k takes the unsigned 8-bit code
  void* packed[3] = {nullptr, nullptr, nullptr};    // bf16 values or 8-bit codes (moments not fp32)
  float* scales[3] = {nullptr, nullptr, nullptr};   // 8-bit: one per lean::kBlock values
  std::uint16_t* remainder = nullptr;               // Master::remainder: the lower halves
  std::uint32_t* tie_bits = nullptr;                // Master::remainder: one bit an element
  std::uint64_t seed = 0;                           // Master::none, Moments::bf16_sr: StateLayout::seed
  std::uint64_t index = 0;                          // Master::none, bf16_sr: the parameter's index in its optimizer
};

/// One parameter as the device step sees it: the user's weight and gradient
/// views and mixprec's fp32 master, state (unused entries null) and step
/// count, all in device memory.
struct DeviceParam {
  TensorRef weight;
  TensorRef grad;
  float* master = nullptr;
  float* state[3] = {nullptr, nullptr, nullptr};
  std::int64_t* step = nullptr;
  int group = 0;  // its parameter group: the index into a step's hyperparameters
  DeviceLeanState lean;
  /// The precursors' second moment: its state index (-1: none), eps^2 and
  /// beta2 (0: no bias correction).
  int v_state = -1;
  float eps2 = 0;
  double beta2 = 0;
};

/// Device inputs and counters of a step launch, read (and counted) when
/// the kernel runs.
struct DeviceStepInputs {
  const int* found_inf = nullptr;              // nonzero: the launch changes nothing
  const float* scale = nullptr;                // gradients are multiplied by float(1 / *scale)
  const double* total_sum_squares = nullptr;   // of the stored gradients; null: no clipping
  double max_norm = 0;                         // clip_grad_norm's max_norm
  /// The stored gradients are the sum of this many ranks' gradients (data
  /// parallelism): the update multiplies them by float(1 / (*scale * it)),
  /// which averages them in the unscale, with no pass of its own.
  double grad_divisor = 1.0;
  std::int64_t* applied_steps = nullptr;       // the optimizer's: read for the lr schedule, +1 when applied
  int* any_inf = nullptr;                      // optional: set to 1 when *found_inf
  /// Optional: +1 when a group's scheduled lr (or its float) is not finite,
  /// a step the launch then skips whole (validated options never give one).
  std::int64_t* nonfinite_lr_steps = nullptr;
  /// Optional (Optimizer::set_precursors): per parameter kPrecursorSums
  /// doubles the applied step adds its precursor terms to (device memory,
  /// zeroed by the caller; a skipped step adds nothing).
  double* precursors = nullptr;
};

/// The device lists of one optimizer (made once, reused by every launch)
/// and the results of its check pass. All launches are asynchronous on the
/// given stream; only the read_* functions synchronise.
class DevicePlan {
 public:
  virtual ~DevicePlan() = default;

  /// Uploads new master/state pointers for the same parameters (state made
  /// later); synchronises. Pass 1's result buffers stay valid.
  virtual void set_params(const std::vector<DeviceParam>& params) = 0;

  /// Pass 1 over every gradient: non-finite per parameter, sums of squares
  /// per parameter and overall. One launch. With `histogram` (device,
  /// [parameter][64]) it also adds each gradient's log2 exponent histogram
  /// (Optimizer::set_grad_histogram).
  virtual void check(stream_t stream, std::uint64_t* histogram = nullptr) = 0;
  virtual const int* found_inf() const = 0;
  virtual const double* total_sum_squares() const = 0;
  /// Per parameter, in device memory: sums of squares, non-finite flags.
  virtual const double* sum_squares() const = 0;
  virtual const int* nonfinite() const = 0;
  /// Copies pass 1's per-parameter results to the host (synchronises).
  virtual void read_check(std::vector<double>& sum_squares, std::vector<int>& nonfinite,
                          stream_t stream) const = 0;

  /// Pass 2 over every parameter, and the step's count, in ONE launch, so
  /// that a step is either queued whole or (when this throws) not at all.
  /// `kernel` names the optimizer's kernel part (its kKey: "adam", "sgd",
  /// ...; a user's own is registered by MIXPREC_REGISTER_OPTIMIZER in one
  /// .cu file) and `hypers` points to `count` of its Hyper structs of
  /// `hyper_bytes` each, group g's at index g (DeviceParam::group), at most
  /// kMaxDeviceGroups. Unless *found_inf (or a non-finite lr), the kernel
  /// updates every parameter and then adds one to every step count and
  /// *applied_steps (saturating); *any_inf is set when *found_inf.
  virtual void step(const char* kernel, const void* hypers, std::size_t count, std::size_t hyper_bytes,
                    const LRSchedule& schedule, const DeviceStepInputs& in, stream_t stream) = 0;
};

/// What the kernels do for the host API.
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;

  /// Device lists for these parameters (uploads them: synchronises).
  virtual std::unique_ptr<DevicePlan> make_plan(const std::vector<DeviceParam>& params) = 0;
  /// dst[i] = float(src[i]) for a device tensor of any element type.
  virtual void to_float(const TensorRef& src, float* dst, stream_t stream) = 0;
  /// Asynchronous copy of `bytes` from device memory to pinned host memory.
  virtual void copy_to_host_async(void* host, const void* device, std::size_t bytes, stream_t stream) = 0;
  /// Pinned host memory that a copy_to_host_async can target; freed with
  /// free_pinned, which first waits for the device (no copy into it can
  /// still be in flight).
  virtual void* alloc_pinned(std::size_t bytes) = 0;
  virtual void free_pinned(void* p) noexcept = 0;
  /// Waits for the work queued on `stream`.
  virtual void synchronize(stream_t stream) = 0;
  /// Makes the work queued on `next` from now on wait for the work queued
  /// on `previous` so far (an event recorded on `previous`, waited on by
  /// `next`), without blocking the host. `*event` is created on first use
  /// and freed with destroy_event. Does nothing while `next` or `previous`
  /// is capturing a graph (a graph orders its own nodes).
  virtual void order_after(stream_t previous, stream_t next, void** event) = 0;
  virtual void destroy_event(void* event) noexcept = 0;
  /// Whether `stream` is capturing a graph (a failed query counts as yes).
  virtual bool capturing(stream_t stream) = 0;
  /// Whether [p, p + bytes) lies in live device memory on `device` (the
  /// first and the last byte are device allocations): what a parameter's
  /// buffers must be when a step runs. Never synchronises.
  virtual bool is_device_memory(const void* p, std::size_t bytes, Device device) = 0;
  /// Whether everything queued on `stream` has finished; does not wait
  /// (cudaStreamQuery). Not on a stream that is capturing a graph.
  virtual bool idle(stream_t stream) = 0;
};

}  // namespace optim
MIXPREC_NAMESPACE_END

MIXPREC_NAMESPACE_BEGIN namespace detail {
inline std::atomic<optim::DeviceBackend*>& device_backend_slot() {
  static std::atomic<optim::DeviceBackend*> slot{nullptr};
  return slot;
}
}  // namespace detail
MIXPREC_NAMESPACE_END

MIXPREC_NAMESPACE_BEGIN namespace optim {

/// Installs the kernels' implementation (backend.cuh does this for you).
inline void install_device_backend(DeviceBackend* backend) { mixprec::detail::device_backend_slot().store(backend); }

/// The installed implementation, or null when no .cu file of this program
/// included <mixprec/cuda/backend.cuh>.
inline DeviceBackend* device_backend() { return mixprec::detail::device_backend_slot().load(); }

}  // namespace optim
MIXPREC_NAMESPACE_END

MIXPREC_NAMESPACE_BEGIN namespace detail {
/// The backend, or an error naming `what`, the device and the fix.
inline optim::DeviceBackend& require_device_backend(const char* what, Device device) {
  optim::DeviceBackend* b = optim::device_backend();
  MIXPREC_CHECK(b != nullptr, what, ": the tensors are on ", device,
                " but no CUDA kernels are linked into this program; compile one .cu file that includes "
                "<mixprec/cuda/backend.cuh> (see docs/getting-started.md, \"GPU training from .cpp files\")");
  return *b;
}
}  // namespace detail
MIXPREC_NAMESPACE_END
