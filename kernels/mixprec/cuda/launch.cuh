// SPDX-License-Identifier: Apache-2.0
// Launch-configuration helpers shared by mixprec's kernels: grid sizing from
// the device's multiprocessor count.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "mixprec/core/cuda_check.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

/// Threads per block for mixprec's elementwise kernels.
inline constexpr int block_threads = 256;

/// V consecutive elements of T, aligned for one vector load or store.
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

/// Multiprocessor count of the current device, asked of the driver once per
/// device and cached: launchers call this on every launch.
inline int multiprocessor_count() {
  int device = 0;
  MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
  static std::atomic<int> cache[64] = {};
  if (device < 0 || device >= 64) {
    int count = 0;
    MIXPREC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    MIXPREC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);  // every thread stores the same value
  }
  return count;
}

namespace detail {
struct KernelQueries {
  std::mutex mutex;
  std::map<std::tuple<int, int, const void*, int>, int> values;  // (query, device, kernel, argument)
};
inline KernelQueries& kernel_queries() {
  static KernelQueries queries;
  return queries;
}

/// What `ask()` tells of `kernel` on the current device (query `what`, with
/// `arg`): asked of the runtime once per query, device, kernel and argument,
/// then cached, since launchers call this on every launch.
template <class Ask>
int kernel_query(int what, const void* kernel, int arg, Ask ask) {
  int device = 0;
  MIXPREC_CUDA_CHECK(cudaGetDevice(&device));
  KernelQueries& q = kernel_queries();
  const std::lock_guard<std::mutex> lock(q.mutex);
  const auto key = std::make_tuple(what, device, kernel, arg);
  const auto it = q.values.find(key);
  if (it != q.values.end()) return it->second;
  const int value = ask();
  q.values.emplace(key, value);
  return value;
}
}  // namespace detail

/// Blocks of `threads` threads of `kernel` one multiprocessor holds at once
/// (its registers and shared memory decide); cached.
template <class Kernel>
int resident_blocks(Kernel* kernel, int threads) {
  return detail::kernel_query(0, reinterpret_cast<const void*>(kernel), threads, [&] {
    int blocks = 0;
    MIXPREC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
    return blocks < 1 ? 1 : blocks;
  });
}

/// Programmatic dependent launch (sm_90 and later): a kernel launched with
/// launch_dependent may be scheduled while the kernel before it on its
/// stream is still running, so its launch and its blocks' start overlap that
/// kernel's tail (in a CUDA graph too: stream capture records the edge). Such
/// a kernel must call wait_for_prior_kernels() before it touches memory, in
/// every block: from there on it sees everything the kernel before it wrote,
/// exactly as with an ordinary launch. allow_dependent_launch() lets the next
/// kernel be scheduled early; without it, that happens when this kernel ends.
/// Both are no-ops where the kernel was launched the ordinary way.
__device__ inline void wait_for_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ inline void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// A hint that [p, p + bytes) will be read soon: the lanes of the calling
/// warp ask L2 for its 128-byte lines (one line a lane a round), so the
/// DRAM reads start while the warp computes on what it already holds. No
/// register holds the data and nothing waits on it; a line past the data's
/// end must not be asked for (the caller bounds `bytes`).
__device__ inline void prefetch_l2(const void* p, std::int64_t bytes) {
  const char* base = static_cast<const char*>(p);
  for (std::int64_t off = static_cast<std::int64_t>(threadIdx.x % 32) * 128; off < bytes; off += 32 * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off));
  }
}

/// The last-block pattern: every thread of every block calls it once, after
/// the block's writes; it makes them visible device-wide, counts the block
/// done in `*counter`, and tells every thread of the block whether it was the
/// last one (which then reads the others' writes through L2, __ldcg, and
/// sets *counter back to 0 for the next launch or graph replay).
__device__ inline bool last_block_to_finish(unsigned* counter) {
  __shared__ bool is_last;
  __syncthreads();
  __threadfence();  // this block's writes are visible before it counts itself done
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (is_last) __threadfence();
  return is_last;
}

/// Whether `kernel` runs code built for sm_90 or later on the current
/// device (cudaFuncAttributes::binaryVersion), so that its
/// wait_for_prior_kernels() is compiled in: only then may it be launched
/// dependent (a kernel whose sm_80 code runs on an H100 would not wait).
/// Cached.
// The sum of every thread's s over the block, in a fixed order (a shuffle
// tree a warp, then the warps in order), so the bits do not depend on
// scheduling; the result is thread 0's return value. Every thread calls it;
// warp_sums: blockDim.x / 32 floats of shared memory.
__device__ inline float block_sum_in_order(float s, float* warp_sums) {
  for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  float total = 0;
  if (threadIdx.x == 0) {
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += warp_sums[w];
  }
  return total;
}

// The sum of values[i * stride] for i in [0, n) by one warp, in a fixed
// order (lane l adds i = l, l + 32, ...; then a shuffle tree), so the bits
// do not depend on scheduling; the result is lane 0's return value. Every
// lane of the warp calls it.
__device__ inline float warp_sum_in_order(const float* values, std::int64_t n, std::int64_t stride) {
  float s = 0;
  for (std::int64_t i = threadIdx.x % 32; i < n; i += 32) s += values[i * stride];
  for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
  return s;
}

template <class Kernel>
bool dependent_launch_ok(Kernel* kernel) {
  return detail::kernel_query(1, reinterpret_cast<const void*>(kernel), 0, [&] {
           cudaFuncAttributes attributes{};
           MIXPREC_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
           return attributes.binaryVersion >= 90 ? 1 : 0;
         }) != 0;
}

namespace detail {
// cudaLaunchKernelEx with `count` attributes (0 or 1 here); a failed launch
// throws an error naming `name`, and leaves no error for the next check.
template <class... Params, class... Args>
void launch_ex(const char* name, void (*kernel)(Params...), unsigned grid, unsigned block, cudaStream_t stream,
               cudaLaunchAttribute* attributes, unsigned count, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = count;
  const cudaError_t status = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();  // not left for the next check to find
    ::mixprec::detail::throw_cuda_error(status, (std::string("launch of ") + name).c_str(), __FILE__, __LINE__);
  }
}
}  // namespace detail

/// Launches `kernel` dependent on the kernel before it on `stream` where
/// dependent_launch_ok, the ordinary way elsewhere. The kernel must call
/// wait_for_prior_kernels() first in every block.
/// `name` goes into the error a failed launch throws.
template <class... Params, class... Args>
void launch_dependent(const char* name, void (*kernel)(Params...), unsigned grid, unsigned block,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  detail::launch_ex(name, kernel, grid, block, stream, attribute, dependent_launch_ok(kernel) ? 1u : 0u,
                    std::forward<Args>(args)...);
}

/// Launches `kernel` cooperatively (cudaLaunchAttributeCooperative: every
/// block resident at once, so that cooperative_groups' grid barrier may be
/// used; also in a CUDA graph). `grid` must not exceed the blocks the GPU
/// holds at once (resident_blocks times the multiprocessors), or the launch
/// fails. `name` goes into the error a failed launch throws.
template <class... Params, class... Args>
void launch_cooperative(const char* name, void (*kernel)(Params...), unsigned grid, unsigned block,
                        cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;
  attribute[0].val.cooperative = 1;
  detail::launch_ex(name, kernel, grid, block, stream, attribute, 1u, std::forward<Args>(args)...);
}

/// Blocks for a grid-stride loop over `work_items` items of `per_block` each:
/// enough to fill every multiprocessor several times over, never more than
/// the work needs, at least one.
inline unsigned grid_for(std::int64_t work_items, int per_block = block_threads,
                         int blocks_per_sm = 8) {
  const std::int64_t needed = (work_items + per_block - 1) / per_block;
  const std::int64_t cap = static_cast<std::int64_t>(multiprocessor_count()) * blocks_per_sm;
  const std::int64_t blocks = needed < cap ? needed : cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace cuda
MIXPREC_NAMESPACE_END
