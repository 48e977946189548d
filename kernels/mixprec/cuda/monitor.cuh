// SPDX-License-Identifier: Apache-2.0
// The instability monitor's kernels: a record of every step in a device
// ring, and on a logged step a snapshot of the masters before the update,
// the parameters' update and weight norms and eps share after it, and one
// write of everything into pinned host memory. The exponent histograms come
// from the check pass (grad_check.cuh), which reads the gradients anyway.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/monitor/device_ops.hpp"
#include "mixprec/tensor/memory.hpp"

namespace mixprec::cuda {

namespace detail {

inline constexpr int monitor_threads = 256;
inline constexpr int monitor_bins = 64;

// The monitor's counters in device memory.
struct MonitorControl {
  long long steps;      // steps recorded
  long long published;  // read-backs published
  unsigned blocks_done; // publish: blocks finished (the last one writes)
};

__global__ void monitor_snapshot_kernel(const monitor::DeviceParamInfo* params, float* snapshot,
                                        unsigned long long* hist) {
  const int p = blockIdx.y;
  const monitor::DeviceParamInfo info = params[p];
  float* dst = snapshot + info.snapshot_offset;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < info.numel;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = info.master[i];
  }
  if (blockIdx.x == 0) {
    for (int b = threadIdx.x; b < monitor_bins; b += blockDim.x) hist[p * monitor_bins + b] = 0;
  }
}

__global__ void monitor_record_kernel(monitor::DeviceStepInputs in, MonitorControl* ctl, monitor::DeviceStep* ring,
                                      int* ring_nonfinite, int every, int num_params) {
  const int slot = static_cast<int>(ctl->steps % every);
  if (threadIdx.x == 0) {
    monitor::DeviceStep s;
    s.loss = in.loss != nullptr ? *in.loss : __int_as_float(0x7fffffff);
    s.scale = *in.scale;
    s.found_inf = *in.found_inf;
    s.pad = 0;
    s.sum_squares = *in.total_sum_squares;
    ring[slot] = s;
  }
  for (int p = threadIdx.x; p < num_params; p += blockDim.x) ring_nonfinite[slot * num_params + p] = in.nonfinite[p];
  __syncthreads();  // every thread has read ctl->steps
  if (threadIdx.x == 0) ctl->steps += 1;
}

__device__ inline double block_sum_double(double x, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < monitor_threads / 32; ++w) total += shared[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

// Grid (x, parameter). Each block sums its share of one parameter into its
// partials; the last block to finish adds them up (in a fixed order, so the
// figures do not depend on the order blocks ran in) and writes the read-back.
__global__ void __launch_bounds__(monitor_threads)
    monitor_publish_kernel(monitor::DeviceStepInputs in, const monitor::DeviceParamInfo* params,
                           const float* snapshot, const unsigned long long* hist,
                           MonitorControl* ctl, const monitor::DeviceStep* ring, const int* ring_nonfinite,
                           int every, int num_params, char* pinned, int slots, monitor::ReadbackLayout layout,
                           double* partials) {
  __shared__ double partial[monitor_threads / 32];
  const int p = blockIdx.y;
  const monitor::DeviceParamInfo info = params[p];
  const float* before = snapshot + info.snapshot_offset;
  float v_scale = 1.0f;  // 1 / bias correction
  if (info.v != nullptr && info.beta2 > 0.0f) {
    const long long t = *info.step;
    const double bc = 1.0 - pow(static_cast<double>(info.beta2), static_cast<double>(t));
    v_scale = bc > 0 ? static_cast<float>(1.0 / bc) : 1.0f;
  }
  const float eps2 = info.eps * info.eps;
  double upd = 0, wt = 0, eps_count = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < info.numel;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float w0 = before[i];
    const float d = info.master[i] - w0;
    upd += static_cast<double>(d) * d;
    wt += static_cast<double>(w0) * w0;
    if (info.v != nullptr) eps_count += (info.v[i] * v_scale < eps2) ? 1.0 : 0.0;
  }
  upd = block_sum_double(upd, partial);
  wt = block_sum_double(wt, partial);
  eps_count = block_sum_double(eps_count, partial);
  if (threadIdx.x == 0) {  // this block's partials; the last block adds them up in a fixed order
    double* mine = partials + (static_cast<std::size_t>(p) * gridDim.x + blockIdx.x) * 3;
    mine[0] = upd;
    mine[1] = wt;
    mine[2] = eps_count;
  }
  __shared__ bool is_last;
  __threadfence();
  if (threadIdx.x == 0) is_last = atomicAdd(&ctl->blocks_done, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The last block: everything into pinned slot (published % slots).
  const long long seq = ctl->published;
  char* out = pinned + static_cast<std::size_t>(seq % slots) * layout.bytes;
  auto* steps = reinterpret_cast<monitor::DeviceStep*>(out + layout.steps);
  for (int k = threadIdx.x; k < every; k += blockDim.x) steps[k] = ring[k];
  auto* flags = reinterpret_cast<int*>(out + layout.nonfinite);
  for (int k = threadIdx.x; k < every * num_params; k += blockDim.x) flags[k] = ring_nonfinite[k];
  auto* out_sums = reinterpret_cast<monitor::DeviceParamSums*>(out + layout.sums);
  // One warp per parameter adds up its blocks' partials (lanes strided
  // over the blocks, then a fixed shuffle tree).
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int q = static_cast<int>(threadIdx.x / 32); q < num_params; q += monitor_threads / 32) {
    double a[3] = {0, 0, 0};
    for (unsigned b = static_cast<unsigned>(lane); b < gridDim.x; b += 32) {
      const double* part = partials + (static_cast<std::size_t>(q) * gridDim.x + b) * 3;
      for (int k = 0; k < 3; ++k) a[k] += __ldcg(part + k);
    }
    for (int k = 0; k < 3; ++k) {
      for (int offset = 16; offset > 0; offset /= 2) a[k] += __shfl_down_sync(0xffffffffu, a[k], offset);
    }
    if (lane == 0) {
      monitor::DeviceParamSums s;
      s.grad_sum_squares = in.sum_squares[q];
      s.update_sum_squares = a[0];
      s.weight_sum_squares = a[1];
      s.eps_count = a[2];
      s.nonfinite = in.nonfinite[q];
      s.has_v = params[q].v != nullptr;
      out_sums[q] = s;
    }
  }
  auto* out_hist = reinterpret_cast<unsigned long long*>(out + layout.hist);
  for (int k = threadIdx.x; k < num_params * monitor_bins; k += blockDim.x) out_hist[k] = __ldcg(hist + k);
  __threadfence_system();  // the data reaches the host before the seq that says it is there
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* header = reinterpret_cast<volatile monitor::ReadbackHeader*>(out);
    header->steps = ctl->steps;
    __threadfence_system();
    header->seq = seq + 1;
    ctl->published = seq + 1;
    ctl->blocks_done = 0;  // ready for the next launch (or replay)
  }
}

}  // namespace detail

/// The device side of one monitor::Monitor.
class MonitorPlan final : public monitor::DeviceMonitorPlan {
 public:
  MonitorPlan(const std::vector<monitor::DeviceParamInfo>& params, int every, Device device)
      : device_(device), every_(every), num_params_(static_cast<int>(params.size())),
        layout_(monitor::ReadbackLayout::of(every, num_params_)) {
    mixprec::detail::DeviceGuard guard(device);
    std::int64_t total = 0;
    for (const auto& p : params) {
      total = p.snapshot_offset + p.numel > total ? p.snapshot_offset + p.numel : total;
      max_numel_ = p.numel > max_numel_ ? p.numel : max_numel_;
    }
    params_ = Buffer(params.size() * sizeof(monitor::DeviceParamInfo), device);
    snapshot_ = Buffer(static_cast<std::size_t>(total > 0 ? total : 1) * sizeof(float), device);
    hist_ = Buffer(params.size() * detail::monitor_bins * sizeof(unsigned long long), device);
    control_ = Buffer(sizeof(detail::MonitorControl), device);
    ring_ = Buffer(static_cast<std::size_t>(every) * sizeof(monitor::DeviceStep), device);
    ring_nonfinite_ = Buffer(static_cast<std::size_t>(every) * params.size() * sizeof(int), device);
    partials_ = Buffer(static_cast<std::size_t>(grid().x) * params.size() * 3 * sizeof(double), device);
    MIXPREC_CUDA_CHECK(cudaMemcpy(params_.data(), params.data(), params_.bytes(), cudaMemcpyHostToDevice));
    for (Buffer* b : {&hist_, &control_, &ring_, &ring_nonfinite_}) {
      MIXPREC_CUDA_CHECK(cudaMemset(b->data(), 0, b->bytes()));
    }
    MIXPREC_CUDA_CHECK(cudaDeviceSynchronize());  // ready before any stream uses them
  }

  void snapshot(stream_t stream) override {
    mixprec::detail::DeviceGuard guard(device_);
    detail::monitor_snapshot_kernel<<<grid(), detail::monitor_threads, 0, stream>>>(
        static_cast<const monitor::DeviceParamInfo*>(params_.data()), static_cast<float*>(snapshot_.data()),
        static_cast<unsigned long long*>(hist_.data()));
    MIXPREC_CUDA_CHECK_LAUNCH("monitor_snapshot_kernel");
  }
  std::uint64_t* histogram() override { return static_cast<std::uint64_t*>(hist_.data()); }

  void record(const monitor::DeviceStepInputs& in, stream_t stream) override {
    mixprec::detail::DeviceGuard guard(device_);
    detail::monitor_record_kernel<<<1, 128, 0, stream>>>(in, control(), static_cast<monitor::DeviceStep*>(ring_.data()),
                                                        static_cast<int*>(ring_nonfinite_.data()), every_,
                                                        num_params_);
    MIXPREC_CUDA_CHECK_LAUNCH("monitor_record_kernel");
  }

  void publish(const monitor::DeviceStepInputs& in, void* pinned, int slots, stream_t stream) override {
    mixprec::detail::DeviceGuard guard(device_);
    detail::monitor_publish_kernel<<<grid(), detail::monitor_threads, 0, stream>>>(
        in, static_cast<const monitor::DeviceParamInfo*>(params_.data()), static_cast<const float*>(snapshot_.data()),
        static_cast<const unsigned long long*>(hist_.data()),
        control(), static_cast<const monitor::DeviceStep*>(ring_.data()), static_cast<const int*>(ring_nonfinite_.data()),
        every_, num_params_, static_cast<char*>(pinned), slots, layout_, static_cast<double*>(partials_.data()));
    MIXPREC_CUDA_CHECK_LAUNCH("monitor_publish_kernel");
  }

  bool capturing(stream_t stream) override {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    MIXPREC_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    return status != cudaStreamCaptureStatusNone;
  }

 private:
  detail::MonitorControl* control() { return static_cast<detail::MonitorControl*>(control_.data()); }
  // x: enough blocks for the largest parameter, within a few waves overall.
  dim3 grid() const {
    const unsigned per_param = grid_for(max_numel_, detail::monitor_threads,
                                        num_params_ > 0 ? (8 + num_params_ - 1) / num_params_ : 1);
    return dim3(per_param, static_cast<unsigned>(num_params_ > 0 ? num_params_ : 1));
  }

  Device device_;
  int every_, num_params_;
  std::int64_t max_numel_ = 0;
  monitor::ReadbackLayout layout_;
  Buffer params_, snapshot_, hist_, control_, ring_, ring_nonfinite_, partials_;
};

class MonitorKernels final : public monitor::DeviceMonitorKernels {
 public:
  std::unique_ptr<monitor::DeviceMonitorPlan> make_plan(const std::vector<monitor::DeviceParamInfo>& params,
                                                        int every, Device device) override {
    return std::make_unique<MonitorPlan>(params, every, device);
  }
};

}  // namespace mixprec::cuda
