// SPDX-License-Identifier: Apache-2.0
// How much of an optimizer step's state can stay in L2 from one step to the next (issue 17; the figures
// and what they mean: docs/performance.md, "Can the MLP's optimizer state stay in L2?"). A
// read-modify-write pass over a working set of W bytes (three fp32 arrays read and written, one read:
// Adam-like), 20 passes of warm-up, then five batches of 40 back to back: the median batch's time a pass,
// and bytes moved over it, for W from 4 to 160 MB. Then the same with an access-policy window marking
// the set persisting (the L2 set-aside at its maximum). Optionally a 16 MB kernel of other traffic
// between passes (a training step's GEMMs), its time included in the pass's (timed alone first).
// Not a library test: it uses no mixprec code. Run: build/benchmarks/l2_residency
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));         \
      return 1;                                                                                \
    }                                                                                          \
  } while (0)

// n4 float4s of state (read and written) and n4 / 2 ... of gradient-like reads, Adam-like arithmetic.
__global__ void rmw(float4* __restrict__ s0, float4* __restrict__ s1, float4* __restrict__ s2,
                    const float4* __restrict__ g, long long n4) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x) {
    float4 a = s0[i], b = s1[i], c = s2[i];
    const float4 x = g[i];
    a.x = 0.9f * a.x + 0.1f * x.x; a.y = 0.9f * a.y + 0.1f * x.y; a.z = 0.9f * a.z + 0.1f * x.z; a.w = 0.9f * a.w + 0.1f * x.w;
    b.x = 0.999f * b.x + 0.001f * x.x * x.x; b.y = 0.999f * b.y + 0.001f * x.y * x.y;
    b.z = 0.999f * b.z + 0.001f * x.z * x.z; b.w = 0.999f * b.w + 0.001f * x.w * x.w;
    c.x -= 1e-3f * a.x * rsqrtf(b.x + 1e-16f); c.y -= 1e-3f * a.y * rsqrtf(b.y + 1e-16f);
    c.z -= 1e-3f * a.z * rsqrtf(b.z + 1e-16f); c.w -= 1e-3f * a.w * rsqrtf(b.w + 1e-16f);
    s0[i] = a; s1[i] = b; s2[i] = c;
  }
}

__global__ void other(float4* __restrict__ p, long long n4) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x) {
    float4 v = p[i];
    v.x += 1.0f;
    p[i] = v;
  }
}

// The median of five batches of 40 calls of launch(), in microseconds a
// call; negative where CUDA reported an error.
template <class F>
double median_us(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, F launch) {
  std::vector<float> t;
  for (int r = 0; r < 5; ++r) {
    if (cudaEventRecord(e0, st) != cudaSuccess) return -1;
    for (int k = 0; k < 40; ++k) launch();
    if (cudaGetLastError() != cudaSuccess || cudaEventRecord(e1, st) != cudaSuccess ||
        cudaEventSynchronize(e1) != cudaSuccess) {
      return -1;
    }
    float ms = 0;
    if (cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess) return -1;
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[2] * 1000.0 / 40;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int max_persist = 0, max_window = 0;
  CK(cudaDeviceGetAttribute(&max_persist, cudaDevAttrMaxPersistingL2CacheSize, 0));
  CK(cudaDeviceGetAttribute(&max_window, cudaDevAttrMaxAccessPolicyWindowSize, 0));
  std::printf("%s: L2 %d MB, max persisting %d MB, max window %d MB, %d SMs\n", prop.name, prop.l2CacheSize >> 20,
              max_persist >> 20, max_window >> 20, prop.multiProcessorCount);
  const long long max_bytes = 160ll << 20;
  float* base = nullptr;
  float* junk = nullptr;
  CK(cudaMalloc(&base, max_bytes));
  CK(cudaMalloc(&junk, 16 << 20));
  CK(cudaMemset(base, 0, max_bytes));
  CK(cudaMemset(junk, 0, 16 << 20));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const int grid = prop.multiProcessorCount * 8, block = 256;
  auto other_pass = [&] { other<<<grid, block, 0, st>>>(reinterpret_cast<float4*>(junk), (16 << 20) / 16); };
  // The other-traffic kernel alone, before any persisting window exists.
  const double other_us = median_us(st, e0, e1, other_pass);
  if (other_us < 0) {
    std::printf("CUDA error timing the other kernel\n");
    return 1;
  }
  std::printf("other-traffic kernel alone: %.2f us\n", other_us);
  std::printf("%8s %6s %6s %10s %10s %10s\n", "set MB", "persist", "other", "us/pass", "GB/s", "moved MB");
  for (int persist = 0; persist <= 1; ++persist) {
    for (int with_other = 0; with_other <= 1; ++with_other) {
      for (long long mb : {4ll, 8ll, 12ll, 16ll, 20ll, 24ll, 28ll, 32ll, 40ll, 48ll, 64ll, 96ll, 160ll}) {
        // Working set W = mb MB: 4 arrays of W/4 each (3 state read+written, 1 read).
        const long long n4 = (mb << 20) / 4 / 16;
        float4* a = reinterpret_cast<float4*>(base);
        float4 *s0 = a, *s1 = a + n4, *s2 = a + 2 * n4, *g = a + 3 * n4;
        cudaStreamAttrValue attr = {};
        if (persist) {
          CK(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, max_persist));
          attr.accessPolicyWindow.base_ptr = base;
          attr.accessPolicyWindow.num_bytes = std::min<long long>(mb << 20, max_window);
          attr.accessPolicyWindow.hitRatio =
              std::min(1.0f, static_cast<float>(max_persist) / static_cast<float>(attr.accessPolicyWindow.num_bytes));
          attr.accessPolicyWindow.hitProp = cudaAccessPropertyPersisting;
          attr.accessPolicyWindow.missProp = cudaAccessPropertyStreaming;
        } else {
          attr.accessPolicyWindow.num_bytes = 0;
        }
        CK(cudaStreamSetAttribute(st, cudaStreamAttributeAccessPolicyWindow, &attr));
        CK(cudaCtxResetPersistingL2Cache());
        for (int w = 0; w < 20; ++w) {
          rmw<<<grid, block, 0, st>>>(s0, s1, s2, g, n4);
          if (with_other) other_pass();
        }
        // With other traffic the pass's time includes the other kernel's.
        const double us = median_us(st, e0, e1, [&] {
          rmw<<<grid, block, 0, st>>>(s0, s1, s2, g, n4);
          if (with_other) other_pass();
        });
        if (us < 0) {
          std::printf("CUDA error timing %lld MB\n", mb);
          return 1;
        }
        const double moved = (mb << 20) * 7.0 / 4.0;  // 3 arrays read + written, 1 read
        std::printf("%8lld %6d %6d %10.2f %10.0f %10.1f\n", mb, persist, with_other, us, moved / us / 1e3,
                    moved / 1e6);
      }
    }
  }
  return 0;
}
