// SPDX-License-Identifier: Apache-2.0
// The instability monitor's kernels: a record of every step in a device
// ring, and on a logged step the parameters' update and weight norms and
// eps share (from the update pass's precursor sums; a skipped step's from
// its masters and moments), and one write of everything into pinned host
// memory. Each of them also ends the scaler's iteration (amp::FusedUpdate),
// so the monitor adds no launch to a step. The exponent histograms come
// from the check pass (grad_check.cuh), which reads the gradients anyway.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "mixprec/core/cuda_check.hpp"
#include "mixprec/cuda/launch.cuh"
#include "mixprec/monitor/device_ops.hpp"
#include "mixprec/optim/precursors.hpp"
#include "mixprec/tensor/memory.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

namespace detail {

inline constexpr int monitor_threads = 256;
inline constexpr int monitor_bins = 64;

// Which parameter each block works on: parameter p has blocks
// [first[p], first[p] + count[p]), as many as its size needs (at least one,
// at most a wave), so a bias does not get the blocks of the largest weight.
struct BlockMap {
  const int* param;   // [blocks]
  const int* first;   // [params]
  const int* count;   // [params]
};

// The monitor's counters in device memory.
struct MonitorControl {
  long long steps;      // steps recorded
  long long published;  // read-backs published
  unsigned blocks_done; // publish: blocks finished (the last one writes)
};

inline __device__ bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The step's record, then the scaler's end of iteration, by every thread of
// one block. The scale and the found-inf flags are read before
// amp::end_iteration changes the scaler's state (in.scale points into it):
// the record holds the scale this step's gradients carried, as the host
// monitor's does. Every read comes before every write: they are independent
// of one another, so they take one memory round trip (the kernel is on the
// step's critical path; read after a write that might alias them, as the
// compiler must assume, each read waited for the one before it). On return
// the block sees the ring slot written and ctl->steps counted.
__device__ inline long long record_and_end_iteration(const monitor::DeviceStepInputs& in, MonitorControl* ctl,
                                                     monitor::DeviceStep* ring, int* ring_nonfinite, int every,
                                                     int num_params, const monitor::ScalerUpdate& update) {
  const long long steps = ctl->steps;
  monitor::DeviceStep s{};
  amp::DeviceScalerState state{};
  if (threadIdx.x == 0) {
    s.loss = in.loss != nullptr ? *in.loss : __int_as_float(0x7fffffff);
    s.scale = *in.scale;
    s.found_inf = *in.found_inf;
    s.guard_skip = in.guard_skip != nullptr ? *in.guard_skip : 0;
    s.sum_squares = *in.total_sum_squares;
    state = *update.state;
  }
  const int slot = static_cast<int>(steps % every);
  int* flags = ring_nonfinite + static_cast<std::size_t>(slot) * num_params;
  for (int p = static_cast<int>(threadIdx.x); p < num_params; p += static_cast<int>(blockDim.x)) {
    flags[p] = in.nonfinite[p];
  }
  if (threadIdx.x == 0) {
    ring[slot] = s;
    amp::end_iteration(state, update.policy, update.dynamic);
    *update.state = state;
  }
  __syncthreads();  // every thread has read ctl->steps
  if (threadIdx.x == 0) ctl->steps = steps + 1;
  __syncthreads();  // the slot and the count, for the publish's copy
  return steps + 1;
}

// An unlogged step's end: the scaler's update kernel with the record in it
// (one block; the kernel the scaler would launch anyway).
__global__ void monitor_record_kernel(monitor::DeviceStepInputs in, MonitorControl* ctl, monitor::DeviceStep* ring,
                                      int* ring_nonfinite, int every, int num_params, monitor::ScalerUpdate update) {
  wait_for_prior_kernels();  // launched dependent on the step (launch_dependent)
  record_and_end_iteration(in, ctl, ring, ring_nonfinite, every, num_params, update);
}

// Sums a[0..2] over the block; valid in thread 0.
__device__ inline void block_sum3(double (&a)[3], double (*shared)[3]) {
  for (int k = 0; k < 3; ++k) {
    for (int offset = 16; offset > 0; offset /= 2) a[k] += __shfl_down_sync(0xffffffffu, a[k], offset);
  }
  if (threadIdx.x % 32 == 0) {
    for (int k = 0; k < 3; ++k) shared[threadIdx.x / 32][k] = a[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) {
      a[k] = 0;
      for (int w = 0; w < monitor_threads / 32; ++w) a[k] += shared[w][k];
    }
  }
}

// One element's weight and eps terms on a skipped step (its update is 0).
__device__ inline void publish_terms(float w, float v, bool has_v, float v_scale, float eps2, double (&a)[3]) {
  a[1] += static_cast<double>(w) * w;
  if (has_v) a[2] += (v * v_scale < eps2) ? 1.0 : 0.0;
}

// This thread's weight and eps terms of work item `local` of the `count`
// that share one parameter, on a skipped step.
__device__ inline void skipped_step_terms(const monitor::DeviceParamInfo& info, int local, int count, double (&a)[3]) {
  // 1 / bias correction (the host's definition, optim/precursors.hpp).
  const float v_scale = info.v != nullptr ? optim::v_hat_scale(info.beta2, static_cast<double>(*info.step)) : 1.0f;
  const float eps2 = info.eps * info.eps;
  const bool has_v = info.v != nullptr;
  const std::int64_t stride = static_cast<std::int64_t>(count) * blockDim.x;
  const std::int64_t first = local * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  std::int64_t done = 0;
  if (aligned16(info.master) && (!has_v || aligned16(info.v))) {  // 16-byte loads
    const std::int64_t vectors = info.numel / 4;
    for (std::int64_t i = first; i < vectors; i += stride) {
      const float4 w = reinterpret_cast<const float4*>(info.master)[i];
      const float4 v = has_v ? reinterpret_cast<const float4*>(info.v)[i] : make_float4(0, 0, 0, 0);
      publish_terms(w.x, v.x, has_v, v_scale, eps2, a);
      publish_terms(w.y, v.y, has_v, v_scale, eps2, a);
      publish_terms(w.z, v.z, has_v, v_scale, eps2, a);
      publish_terms(w.w, v.w, has_v, v_scale, eps2, a);
    }
    done = vectors * 4;
  }
  for (std::int64_t i = done + first; i < info.numel; i += stride) {
    publish_terms(info.master[i], has_v ? info.v[i] : 0.0f, has_v, v_scale, eps2, a);
  }
}

// A logged step's end. Work items as BlockMap says (`items` of them), taken
// by the grid's blocks in turn (a grid of one wave or less: most logged
// steps moved the masters and the items have nothing to read). A step that
// moved the masters: the update pass summed the update, weight and eps
// terms already (the precursors), and the items do nothing. A skipped step
// (overflow or the spike guard) moved nothing: each item sums its share of
// one parameter's weight and eps terms into its partials (the same partials
// whatever the grid: an item's elements and its sum's order do not depend
// on which block takes it). The last block to finish records the step and
// ends the scaler's iteration (as monitor_record_kernel does: nothing the
// other blocks read is the scaler's), adds the partials up (in a fixed
// order, so the figures do not depend on the order blocks ran in), adds the
// precursors (zero where the update pass did not run), writes the
// read-back, and zeroes the histograms and precursors it has read, for the
// next logged step's check and update passes. (A step skipped for a
// non-finite lr alone leaves both at zero: its update ratio reads NaN.)
__global__ void __launch_bounds__(monitor_threads)
    monitor_publish_kernel(monitor::DeviceStepInputs in, const monitor::DeviceParamInfo* params, BlockMap map,
                           unsigned long long* hist, MonitorControl* ctl, monitor::DeviceStep* ring,
                           int* ring_nonfinite, int every, int num_params, char* pinned, int slots,
                           monitor::ReadbackLayout layout, double* partials, double* precursors, int items,
                           monitor::ScalerUpdate update) {
  wait_for_prior_kernels();  // launched dependent on the step (launch_dependent)
  __shared__ double partial[monitor_threads / 32][3];
  const bool moved = *in.found_inf == 0 && (in.guard_skip == nullptr || *in.guard_skip == 0);
  for (int item = static_cast<int>(blockIdx.x); !moved && item < items; item += static_cast<int>(gridDim.x)) {
    double* mine = partials + static_cast<std::size_t>(item) * 3;
    const int p = map.param[item];
    double a[3] = {0, 0, 0};  // update (0: nothing moved), weight, eps count
    skipped_step_terms(params[p], item - map.first[p], map.count[p], a);
    block_sum3(a, partial);
    if (threadIdx.x == 0) {  // this item's partials; the last block adds them up in a fixed order
      for (int k = 0; k < 3; ++k) mine[k] = a[k];
    }
    __syncthreads();  // thread 0 has read `partial` before the next item writes it
  }
  __shared__ bool is_last;
  __threadfence();
  if (threadIdx.x == 0) is_last = atomicAdd(&ctl->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const long long seq = ctl->published;  // read with the record's reads, before any write
  const long long steps_now = record_and_end_iteration(in, ctl, ring, ring_nonfinite, every, num_params, update);
  // Everything into pinned slot (published % slots).
  char* out = pinned + static_cast<std::size_t>(seq % slots) * layout.bytes;
  auto* steps = reinterpret_cast<monitor::DeviceStep*>(out + layout.steps);
  for (int k = threadIdx.x; k < every; k += blockDim.x) steps[k] = ring[k];
  auto* flags = reinterpret_cast<int*>(out + layout.nonfinite);
  for (int k = threadIdx.x; k < every * num_params; k += blockDim.x) flags[k] = ring_nonfinite[k];
  auto* out_sums = reinterpret_cast<monitor::DeviceParamSums*>(out + layout.sums);
  // One warp per parameter adds up its blocks' partials (lanes strided
  // over the blocks, then a fixed shuffle tree). A step that moved the
  // masters wrote no partials: its terms are all in the precursors.
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int q = static_cast<int>(threadIdx.x / 32); q < num_params; q += monitor_threads / 32) {
    double t[3] = {0, 0, 0};
    for (int b = map.first[q] + lane; !moved && b < map.first[q] + map.count[q]; b += 32) {
      const double* part = partials + static_cast<std::size_t>(b) * 3;
      for (int k = 0; k < 3; ++k) t[k] += __ldcg(part + k);
    }
    for (int k = 0; k < 3; ++k) {
      for (int offset = 16; offset > 0; offset /= 2) t[k] += __shfl_down_sync(0xffffffffu, t[k], offset);
    }
    if (lane == 0) {
      double* pre = precursors + static_cast<std::size_t>(q) * optim::kPrecursorSums;
      monitor::DeviceParamSums s;
      s.grad_sum_squares = in.sum_squares[q];
      s.update_sum_squares = t[0] + __ldcg(pre + 2);
      s.weight_sum_squares = t[1] + __ldcg(pre + 3);
      s.eps_count = t[2] + __ldcg(pre + 1);
      s.v_ratio_sum = __ldcg(pre);
      s.lost_count = __ldcg(pre + 4);
      s.nonfinite = in.nonfinite[q];
      s.has_v = params[q].v != nullptr;
      out_sums[q] = s;
      for (std::size_t k = 0; k < optim::kPrecursorSums; ++k) pre[k] = 0;
    }
  }
  auto* out_hist = reinterpret_cast<unsigned long long*>(out + layout.hist);
  for (int k = threadIdx.x; k < num_params * monitor_bins; k += blockDim.x) {
    out_hist[k] = __ldcg(hist + k);
    hist[k] = 0;
  }
  auto* header = reinterpret_cast<volatile monitor::ReadbackHeader*>(out);
  // The data reaches the host before the seq that says it is there: the
  // block's writes are ordered before thread 0's by the barrier, and
  // thread 0's system fence (cumulative) orders all of them, the header's
  // step count included, before the seq. One fence, one thread.
  __syncthreads();
  if (threadIdx.x == 0) {
    header->steps = steps_now;
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
  MonitorPlan(const std::vector<monitor::DeviceParamInfo>& params, int every, Device device,
              monitor::PlanStart start)
      : device_(device), every_(every), num_params_(static_cast<int>(params.size())),
        layout_(monitor::ReadbackLayout::of(every, num_params_)) {
    mixprec::detail::DeviceGuard guard(device);
    // Blocks per parameter: one per 16 elements a thread, at least one, at
    // most two per multiprocessor (the loops stride beyond that).
    std::vector<int> block_param, first, count;
    const std::int64_t most = static_cast<std::int64_t>(multiprocessor_count()) * 2;
    for (std::size_t p = 0; p < params.size(); ++p) {
      const std::int64_t want = (params[p].numel + detail::monitor_threads * 16 - 1) / (detail::monitor_threads * 16);
      const int n = static_cast<int>(want < 1 ? 1 : want > most ? most : want);
      first.push_back(static_cast<int>(block_param.size()));
      count.push_back(n);
      block_param.insert(block_param.end(), static_cast<std::size_t>(n), static_cast<int>(p));
    }
    blocks_ = static_cast<unsigned>(block_param.size());
    record_threads_ = static_cast<unsigned>(std::min((num_params_ + 31) / 32 * 32, detail::monitor_threads));
    grid_ = static_cast<unsigned>(std::min<std::int64_t>(blocks_, multiprocessor_count()));
    std::vector<int> map_host(block_param);
    map_host.insert(map_host.end(), first.begin(), first.end());
    map_host.insert(map_host.end(), count.begin(), count.end());
    map_ = Buffer(map_host.size() * sizeof(int), device);
    MIXPREC_CUDA_CHECK(cudaMemcpy(map_.data(), map_host.data(), map_.bytes(), cudaMemcpyHostToDevice));
    params_ = Buffer(params.size() * sizeof(monitor::DeviceParamInfo), device);
    hist_ = Buffer(params.size() * detail::monitor_bins * sizeof(unsigned long long), device);
    control_ = Buffer(sizeof(detail::MonitorControl), device);
    ring_ = Buffer(static_cast<std::size_t>(every) * sizeof(monitor::DeviceStep), device);
    ring_nonfinite_ = Buffer(static_cast<std::size_t>(every) * params.size() * sizeof(int), device);
    partials_ = Buffer(static_cast<std::size_t>(blocks_) * 3 * sizeof(double), device);
    precursors_ = Buffer(params.size() * optim::kPrecursorSums * sizeof(double), device);
    MIXPREC_CUDA_CHECK(cudaMemcpy(params_.data(), params.data(), params_.bytes(), cudaMemcpyHostToDevice));
    // Zeroed: the first logged step adds to the histograms and precursors
    // with no clear before it (each publish zeroes them for the next).
    for (Buffer* b : {&hist_, &ring_, &ring_nonfinite_, &precursors_}) {
      MIXPREC_CUDA_CHECK(cudaMemset(b->data(), 0, b->bytes()));
    }
    // The counts go on from the host's (a resumed monitor's steps).
    const detail::MonitorControl counts{static_cast<long long>(start.steps), static_cast<long long>(start.published),
                                        0u};
    MIXPREC_CUDA_CHECK(cudaMemcpy(control_.data(), &counts, sizeof counts, cudaMemcpyHostToDevice));
    MIXPREC_CUDA_CHECK(cudaDeviceSynchronize());  // ready before any stream uses them
  }

  std::uint64_t* histogram() override { return static_cast<std::uint64_t*>(hist_.data()); }
  double* precursors() override { return static_cast<double*>(precursors_.data()); }
  void clear(stream_t stream) override {
    mixprec::detail::DeviceGuard guard(device_);
    MIXPREC_CUDA_CHECK(cudaMemsetAsync(hist_.data(), 0, hist_.bytes(), stream));
    MIXPREC_CUDA_CHECK(cudaMemsetAsync(precursors_.data(), 0, precursors_.bytes(), stream));
  }

  void end_step(const monitor::DeviceStepInputs& in, const monitor::ScalerUpdate& update, void* pinned, int slots,
                stream_t stream) override {
    mixprec::detail::DeviceGuard guard(device_);
    auto* ring = static_cast<monitor::DeviceStep*>(ring_.data());
    auto* ring_nonfinite = static_cast<int*>(ring_nonfinite_.data());
    if (pinned == nullptr) {
      // Dependent launches (launch.cuh), as the scaler's own update kernel:
      // scheduled while the step kernel runs, waiting for its end.
      launch_dependent("monitor_record_kernel", detail::monitor_record_kernel, 1, record_threads_, stream, in,
                       control(), ring, ring_nonfinite, every_, num_params_, update);
      return;
    }
    launch_dependent("monitor_publish_kernel", detail::monitor_publish_kernel, grid_, detail::monitor_threads, stream,
                     in, static_cast<const monitor::DeviceParamInfo*>(params_.data()), map(),
                     static_cast<unsigned long long*>(hist_.data()), control(), ring, ring_nonfinite, every_,
                     num_params_, static_cast<char*>(pinned), slots, layout_, static_cast<double*>(partials_.data()),
                     static_cast<double*>(precursors_.data()), static_cast<int>(blocks_), update);
  }

  bool capturing(stream_t stream) override {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    MIXPREC_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    return status != cudaStreamCaptureStatusNone;
  }

 private:
  detail::MonitorControl* control() { return static_cast<detail::MonitorControl*>(control_.data()); }
  detail::BlockMap map() const {
    const int* m = static_cast<const int*>(map_.data());
    return {m, m + blocks_, m + blocks_ + num_params_};
  }

  Device device_;
  int every_, num_params_;
  unsigned blocks_ = 0;  // the publish kernel's work items (BlockMap)
  unsigned grid_ = 0;    // its blocks: one a multiprocessor at most
  unsigned record_threads_ = 32;  // the record's block: a warp per 32 parameters, up to monitor_threads
  monitor::ReadbackLayout layout_;
  Buffer params_, map_, hist_, control_, ring_, ring_nonfinite_, partials_, precursors_;
};

class MonitorKernels final : public monitor::DeviceMonitorKernels {
 public:
  std::unique_ptr<monitor::DeviceMonitorPlan> make_plan(const std::vector<monitor::DeviceParamInfo>& params,
                                                        int every, Device device,
                                                        monitor::PlanStart start) override {
    return std::make_unique<MonitorPlan>(params, every, device, start);
  }
};

}  // namespace cuda
MIXPREC_NAMESPACE_END
