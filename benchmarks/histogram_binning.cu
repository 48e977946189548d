// SPDX-License-Identifier: Apache-2.0
// Two ways to bin gradients' exponents in shared memory, timed apart from
// the library: the check pass's loop (grad_check.cuh: 16-byte loads, four
// in flight a thread, a histogram of 64 bins a warp, a block's counts added
// to global memory per work item) over fp16 values, with
//   none     no histogram (the pass of an unlogged step);
//   grouped  the lanes of a warp with the same bin found by
//            __match_any_sync, one atomic a group (the check pass before
//            2026-12-06);
//   plain    one shared atomic an element (the check pass since).
// 528 work items of 3,976 elements (about the MLP example's 1.9M
// gradients on 4 blocks an SM), normal values whose scale changes every
// 2^16 elements over three decades (bins as a scaled fp16 gradient's).
// Prints the median of 280 timed launches (CUDA events, after 20) and
// whether the two ways count alike (docs/monitor.md).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "mixprec/cuda/grad_check.cuh"

namespace {

constexpr int kThreads = 256, kBins = 64, kWarps = kThreads / 32, kGroups = 7;
enum Binning { kNone, kGrouped, kPlain };

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "histogram_binning: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// The check pass's own bin.
using mixprec::cuda::detail::exponent_bin;
static_assert(mixprec::cuda::detail::histogram_bins == kBins, "the check pass's bins");

template <Binning B>
__device__ void one(__half h, float& sum, int& bad, unsigned* hist) {
  const float x = __half2float(h);
  sum = __fmaf_rn(x, x, sum);
  bad |= !isfinite(x);
  if constexpr (B == kGrouped) {
    const int b = exponent_bin(x);
    const unsigned peers = __match_any_sync(__activemask(), b);
    if (static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1) atomicAdd(hist + b, static_cast<unsigned>(__popc(peers)));
  } else if constexpr (B == kPlain) {
    atomicAdd(hist + exponent_bin(x), 1u);
  }
}

template <Binning B>
__device__ void eight(const uint4& raw, float& sum, int& bad, unsigned* hist) {
  __half items[8];
  memcpy(items, &raw, 16);
#pragma unroll
  for (int e = 0; e < 8; ++e) one<B>(items[e], sum, bad, hist);
}

template <Binning B>
__global__ void __launch_bounds__(kThreads)
    pass(const __half* g, int per_item, int items, float* sums, unsigned long long* out) {
  __shared__ unsigned hist[B == kNone ? 1 : kWarps * kBins];
  unsigned* mine = hist + (B == kNone ? 0 : threadIdx.x / 32 * kBins);
  for (int item = static_cast<int>(blockIdx.x); item < items; item += static_cast<int>(gridDim.x)) {
    if constexpr (B != kNone) {
      for (int b = static_cast<int>(threadIdx.x); b < kWarps * kBins; b += kThreads) hist[b] = 0;
      __syncthreads();
    }
    const auto* v = reinterpret_cast<const uint4*>(g + static_cast<std::size_t>(item) * per_item);
    const int vectors = per_item / 8;
    float sum = 0;
    int bad = 0;
    int k = static_cast<int>(threadIdx.x);
    for (; k + 3 * kThreads < vectors; k += 4 * kThreads) {
      uint4 raw[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) raw[u] = v[k + u * kThreads];
#pragma unroll
      for (int u = 0; u < 4; ++u) eight<B>(raw[u], sum, bad, mine);
    }
    uint4 raw[3];
#pragma unroll
    for (int u = 0; u < 3; ++u) {
      if (k + u * kThreads < vectors) raw[u] = v[k + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < 3; ++u) {
      if (k + u * kThreads < vectors) eight<B>(raw[u], sum, bad, mine);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    bad = __syncthreads_or(bad);
    if (threadIdx.x % 32 == 0) atomicAdd(sums + item, sum + static_cast<float>(bad));
    if constexpr (B != kNone) {
      for (int b = static_cast<int>(threadIdx.x); b < kBins; b += kThreads) {
        unsigned n = 0;
        for (int w = 0; w < kWarps; ++w) n += hist[w * kBins + b];
        if (n != 0) atomicAdd(out + static_cast<std::int64_t>(item) * kGroups / items * kBins + b, n);
      }
      __syncthreads();
    }
  }
}

// Median microseconds of one launch; the counts of the last in `counts`.
template <Binning B>
float time_pass(const __half* g, int per_item, int items, float* sums, unsigned long long* out,
                std::vector<unsigned long long>& counts) {
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<float> us;
  for (int r = 0; r < 300; ++r) {
    check(cudaMemset(out, 0, sizeof(unsigned long long) * kGroups * kBins), "cudaMemset");
    check(cudaEventRecord(start), "cudaEventRecord");
    pass<B><<<items, kThreads>>>(g, per_item, items, sums, out);
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    if (r >= 20) us.push_back(1000.0f * ms);
  }
  check(cudaGetLastError(), "pass");
  counts.resize(static_cast<std::size_t>(kGroups) * kBins);
  check(cudaMemcpy(counts.data(), out, sizeof(unsigned long long) * counts.size(), cudaMemcpyDeviceToHost),
        "cudaMemcpy");
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace

int main() {
  const int items = 528, per_item = 3976;  // multiples of 8 elements: 16-byte loads throughout
  const std::size_t n = static_cast<std::size_t>(items) * per_item;
  std::vector<__half> host(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  float sigma = 1;
  for (std::size_t i = 0; i < n; ++i) {
    if (i % 65536 == 0) sigma = 65.536f * std::pow(10.0f, -3.0f + 3.0f * static_cast<float>(rng() % 1000) / 1000.0f);
    host[i] = __float2half(normal(rng) * sigma);
  }
  __half* g = nullptr;
  float* sums = nullptr;
  unsigned long long* out = nullptr;
  check(cudaMalloc(&g, n * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&sums, items * sizeof(float)), "cudaMalloc");
  check(cudaMalloc(&out, sizeof(unsigned long long) * kGroups * kBins), "cudaMalloc");
  check(cudaMemcpy(g, host.data(), n * sizeof(__half), cudaMemcpyHostToDevice), "cudaMemcpy");
  std::vector<unsigned long long> none, grouped, plain;
  const float t_none = time_pass<kNone>(g, per_item, items, sums, out, none);
  const float t_grouped = time_pass<kGrouped>(g, per_item, items, sums, out, grouped);
  const float t_plain = time_pass<kPlain>(g, per_item, items, sums, out, plain);
  int used = 0;
  for (unsigned long long c : grouped) used += c != 0 ? 1 : 0;
  std::printf("%zu fp16 values in %d work items: none %.2f us, grouped %.2f us, plain %.2f us; "
              "counts equal: %s (%d group-bins used)\n",
              n, items, t_none, t_grouped, t_plain, grouped == plain ? "yes" : "NO", used);
  return grouped == plain ? 0 : 1;
}
