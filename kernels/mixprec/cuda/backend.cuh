// SPDX-License-Identifier: Apache-2.0
// The kernels behind the host API. Include this header in one .cu file of
// a program (any one; more do no harm) and the optimizers and
// amp::DeviceGradScaler of every translation unit, .cpp files compiled by
// g++ included, run their device work through it: including it installs the
// backend before main() starts. A program that constructs device optimizers
// during static initialisation, or that links this .cu file from a static
// library whose objects the linker may drop, calls
// mixprec::cuda::install_backend() first.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "mixprec/amp/device_kernels.hpp"
#include "mixprec/amp/scale_update.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/convert.cuh"
#include "mixprec/cuda/grad_check.cuh"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/cuda/monitor.cuh"
#include "mixprec/cuda/multi_tensor.cuh"
#include "mixprec/cuda/nn_ops.cuh"
#include "mixprec/cuda/optimizer_step.cuh"
#include "mixprec/cuda/spike_guard.cuh"
#include "mixprec/optim/device_backend.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

namespace detail {

__global__ inline void or_flag_kernel(const int* src, int* dst) {
  if (*src) *dst = 1;
}

template <class T>
__global__ void scale_kernel(T* data, std::int64_t n, const float* scale) {
  const float s = *scale;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    data[i] = mixprec::from_float<T>(mixprec::to_float(data[i]) * s);
  }
}

// A subnormal product in the arithmetic the update formulas use: 0 when
// this translation unit was compiled with -ftz=true or --use_fast_math
// (nvcc then flushes even the _rn intrinsics' subnormals).
__global__ inline void ieee_probe_kernel(float* out, float x) {
  out[0] = static_cast<float>(exact_float(x) * 0.5f);
}

// Throws unless the kernels of this translation unit keep subnormals: the
// update formulas give the CPU's bits only then. Once per process.
inline void require_ieee_kernels() {
  static const bool ok = [] {
    int device = 0;
    MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
    Buffer b(sizeof(float), Device::cuda(device));
    float got = 0;
    ieee_probe_kernel<<<1, 1>>>(static_cast<float*>(b.data()), 1.17549435e-38f);
    MIXPREC_CUDA_CHECK_LAUNCH("ieee_probe_kernel");
    MIXPREC_CUDA_CHECK(cudaMemcpy(&got, b.data(), sizeof got, cudaMemcpyDeviceToHost));
    return got != 0.0f;
  }();
  MIXPREC_CHECK(ok, "mixprec's CUDA kernels were compiled with -ftz=true or --use_fast_math (a subnormal product "
                "came out 0): the update would flush subnormal gradients, moments and masters and differ from the "
                "CPU path; compile the .cu file that includes <mixprec/cuda/backend.cuh> without those flags");
}

inline std::vector<TensorRef> grads_of(const std::vector<optim::DeviceParam>& params) {
  std::vector<TensorRef> grads;
  grads.reserve(params.size());
  for (const optim::DeviceParam& p : params) grads.push_back(p.grad);
  return grads;
}

inline std::vector<ParamEntry> entries_of(const std::vector<optim::DeviceParam>& params) {
  std::vector<ParamEntry> entries;
  entries.reserve(params.size());
  for (const optim::DeviceParam& p : params) {
    entries.push_back(
        {p.weight.data(), p.weight.dtype(), p.master, {p.state[0], p.state[1], p.state[2]}, p.step, p.group, p.lean, p.v_state, p.eps2, p.beta2});
  }
  return entries;
}

/// One optimizer's device lists (gradients; weights, masters, state, step
/// counts) and its pass 1 results. Made with the parameters' device current
/// (make_plan), which is where ParamList uploads.
class Plan final : public optim::DevicePlan {
 public:
  explicit Plan(const std::vector<optim::DeviceParam>& params)
      : device_(params.at(0).grad.device()),
        grads_(grads_of(params)),
        params_(entries_of(params), grads_.num_chunks()),
        check_(grads_) {}

  // The gradient list is made again too: a rebound gradient (Optimizer::
  // rebind, a layer moved to another precision) has a new address and may
  // have a new dtype, and pass 1 and the step read gradients through it.
  // The shapes stay, so the chunks do, and pass 1's result buffers (whose
  // addresses the scaler and the monitor hold) stay valid.
  void set_params(const std::vector<optim::DeviceParam>& params) override {
    MIXPREC_CHECK(static_cast<int>(params.size()) == params_.size(), "DevicePlan::set_params: ", params.size(),
                  " parameters, the plan has ", params_.size());
    mixprec::detail::DeviceGuard guard(device_);
    TensorList grads(grads_of(params));
    MIXPREC_CHECK(grads.num_chunks() == grads_.num_chunks(), "DevicePlan::set_params: the gradients make ",
                  grads.num_chunks(), " chunks, the plan's ", grads_.num_chunks(), " (a parameter changed shape)");
    ParamList list(entries_of(params), grads.num_chunks());
    // The old lists are freed below: launches queued on any stream may
    // still read them. Rare (after rebind or new state), so wait for all.
    MIXPREC_CUDA_CHECK(cudaDeviceSynchronize());
    grads_ = std::move(grads);
    params_ = std::move(list);
  }

  void check(stream_t stream, std::uint64_t* histogram) override { check_.launch(grads_, stream, histogram); }
  const int* found_inf() const override { return check_.found_inf(); }
  const double* total_sum_squares() const override { return check_.total_sum_squares(); }
  const double* sum_squares() const override { return check_.sum_squares(); }
  const int* nonfinite() const override { return check_.nonfinite(); }
  void read_check(std::vector<double>& sum_squares, std::vector<int>& nonfinite, stream_t stream) const override {
    mixprec::detail::DeviceGuard guard(device_);
    GradCheck::Host h = check_.read(stream);
    sum_squares = std::move(h.sum_squares);
    nonfinite = std::move(h.nonfinite);
  }

  void step(const char* kernel, const void* hypers, std::size_t count, std::size_t hyper_bytes,
            const optim::LRSchedule& schedule, const optim::DeviceStepInputs& in, stream_t stream) override {
    const StepLauncher launch = find_step_kernel(kernel, hyper_bytes);
    mixprec::detail::DeviceGuard guard(device_);
    launch(grads_, params_, hypers, count, schedule, in, static_cast<cudaStream_t>(stream));
  }

 private:
  Device device_;
  TensorList grads_;
  ParamList params_;
  GradCheck check_;
};

// DeviceGradScaler's kernels (amp/device_kernels.hpp).
class ScalerKernels final : public amp::DeviceScalerKernels {
 public:
  void update_scale(amp::DeviceScalerState* s, const amp::ScalePolicy& policy, bool dynamic,
                    stream_t stream) override {
    launch_update_scale(s, policy, dynamic, stream);
  }
  void or_flag(const int* src, int* dst, stream_t stream) override {
    detail::or_flag_kernel<<<1, 1, 0, stream>>>(src, dst);
    MIXPREC_CUDA_CHECK_LAUNCH("or_flag_kernel");
  }

  void scale(const TensorRef& t, const float* scale, stream_t stream) override {
    MIXPREC_CHECK(!t.read_only(), "DeviceGradScaler::scale: the tensor is a read-only view");
    if (t.numel() == 0) return;
    mixprec::detail::DeviceGuard guard(t.device());
    t.visit([&](auto view) {
      using T = std::remove_const_t<typename decltype(view)::value_type>;
      detail::scale_kernel<T><<<grid_for(view.numel()), block_threads, 0, stream>>>(
          const_cast<T*>(view.data()), view.numel(), scale);
    });
    MIXPREC_CUDA_CHECK_LAUNCH("scale_kernel");
  }
  void guard_decide(amp::SpikeGuardState* s, double* window, const amp::SpikeGuardPolicy& policy,
                    const amp::GuardDecideInputs& in, stream_t stream) override {
    launch_spike_guard_decide(s, window, policy, in, static_cast<cudaStream_t>(stream));
  }
  void guard_combine(const amp::SpikeGuardState* s, const int* found_inf, int* combined, int* any_inf,
                     stream_t stream) override {
    launch_spike_guard_combine(s, found_inf, combined, any_inf, static_cast<cudaStream_t>(stream));
  }
};

class Backend final : public optim::DeviceBackend {
 public:
  std::unique_ptr<optim::DevicePlan> make_plan(const std::vector<optim::DeviceParam>& params) override {
    MIXPREC_CHECK(!params.empty(), "DeviceBackend::make_plan: no parameters");
    mixprec::detail::DeviceGuard guard(params[0].grad.device());
    detail::require_ieee_kernels();
    return std::make_unique<Plan>(params);
  }

  void to_float(const TensorRef& src, float* dst, stream_t stream) override {
    mixprec::detail::DeviceGuard guard(src.device());
    src.visit([&](auto view) { launch_convert(view.data(), dst, view.numel(), stream); });
  }


  void copy_to_host_async(void* host, const void* device, std::size_t bytes, stream_t stream) override {
    MIXPREC_CUDA_CHECK(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream));
  }
  void* alloc_pinned(std::size_t bytes) override {
    void* p = nullptr;
    MIXPREC_CUDA_CHECK(cudaMallocHost(&p, bytes));
    return p;
  }
  void free_pinned(void* p) noexcept override {
    (void)cudaDeviceSynchronize();
    (void)cudaFreeHost(p);
  }
  void synchronize(stream_t stream) override { MIXPREC_CUDA_CHECK(cudaStreamSynchronize(stream)); }
  void order_after(stream_t previous, stream_t next, void** event) override {
    if (previous == next) return;
    if (capturing(previous) || capturing(next)) return;
    if (*event == nullptr) {
      cudaEvent_t e = nullptr;
      MIXPREC_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      *event = e;
    }
    MIXPREC_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(*event), previous));
    MIXPREC_CUDA_CHECK(cudaStreamWaitEvent(next, static_cast<cudaEvent_t>(*event), 0));
  }
  // (A query that fails, the legacy stream's while another stream captures,
  // counts as capturing.)
  bool capturing(stream_t stream) override {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
      (void)cudaGetLastError();
      return true;
    }
    return status != cudaStreamCaptureStatusNone;
  }
  void destroy_event(void* event) noexcept override {
    if (event != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(event));
  }
  bool is_device_memory(const void* p, std::size_t bytes, Device device) override {
    if (bytes == 0) return true;
    for (const char* at : {static_cast<const char*>(p), static_cast<const char*>(p) + bytes - 1}) {
      cudaPointerAttributes a{};
      const cudaError_t e = cudaPointerGetAttributes(&a, at);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();  // an invalid pointer is an answer here, not a sticky error
        return false;
      }
      const bool on_device = a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
      if (!on_device || a.device != device.index()) return false;
    }
    return true;
  }
  bool idle(stream_t stream) override {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaErrorNotReady) return false;
    MIXPREC_CUDA_CHECK(e);
    return true;
  }
};

}  // namespace detail

/// The process's backend object.
inline optim::DeviceBackend& backend() {
  static detail::Backend instance;
  return instance;
}

/// The layers' kernels (cuBLASLt handle, workspace, GEMM plans). Never
/// destroyed: tearing down cuBLASLt after the CUDA runtime at exit is unsafe.
inline nn::DeviceOps& nn_ops() {
  static NnOps* instance = new NnOps;
  return *instance;
}

/// Installs the kernels behind the host API, optimizers and layers (done
/// for you when this header is included; see the top of the file for when
/// to call it yourself).
inline void install_backend() {
  register_step_kernel<optim::AdamKernel>();
  register_step_kernel<optim::SgdKernel>();
  register_step_kernel<optim::RmspropKernel>();
  register_step_kernel<optim::LionKernel>();
  register_step_kernel<optim::LambKernel>();
  optim::install_device_backend(&backend());
  static detail::ScalerKernels scaler_kernels;
  amp::install_device_scaler_kernels(&scaler_kernels);
  nn::install_device_ops(&nn_ops());
  static MonitorKernels monitor_kernels;
  monitor::install_device_kernels(&monitor_kernels);
}

namespace detail {
inline const bool backend_installed = (install_backend(), true);
}  // namespace detail

}  // namespace cuda
MIXPREC_NAMESPACE_END
