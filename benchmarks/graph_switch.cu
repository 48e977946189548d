// SPDX-License-Identifier: Apache-2.0
// What replaying a different CUDA graph costs the device. The examples keep
// two captured steps, a plain one and the monitor's logged one, and switch
// between them twice every `--monitor-every` steps; this measures a switch
// apart from the work inside the graphs (docs/monitor.md, "What the monitor
// costs").
//
// Three graphs of the same shape: `kernels` bandwidth-bound kernels over
// `n` floats in a chain, each launched dependent on the one before
// (programmatic dependent launch, as mixprec's step kernels are) or not.
// Graph 1 holds the same kernels as graph 0; graph 2 swaps one kernel for
// another instantiation of the template. Replays 2000 steps of graph 0 with
// every k-th step graph 1 or 2, timed with CUDA events (median of 7), and
// prints the cost per step and per switch against graph 0 alone.
//
//     graph_switch [n = 262144] [kernels = 17] [dependent = 1]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "graph_switch: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <int Variant>
__global__ void scale_add(float* y, const float* x, int n) {
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) y[i] = y[i] * 0.999f + x[i] * (0.001f + Variant);
}

cudaGraphExec_t capture(cudaStream_t s, float* y, const float* x, int n, int kernels, bool dependent, bool other) {
  cudaGraph_t graph = nullptr;
  check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  for (int k = 0; k < kernels; ++k) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>((n + 255) / 256));
    cfg.blockDim = dim3(256);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = dependent ? 1 : 0;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (other && k == kernels / 2) {
      check(cudaLaunchKernelEx(&cfg, scale_add<1>, y, x, n), "launch");
    } else {
      check(cudaLaunchKernelEx(&cfg, scale_add<0>, y, x, n), "launch");
    }
  }
  check(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  check(cudaGraphUpload(exec, s), "cudaGraphUpload");
  check(cudaGraphDestroy(graph), "cudaGraphDestroy");
  return exec;
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 262144;
  const int kernels = argc > 2 ? std::atoi(argv[2]) : 17;
  const bool dependent = argc > 3 ? std::atoi(argv[3]) != 0 : true;
  if (n <= 0 || kernels <= 0) {
    std::fprintf(stderr, "graph_switch: n = %d and kernels = %d must be positive\n", n, kernels);
    return 2;
  }
  float *x = nullptr, *y = nullptr;
  check(cudaMalloc(&x, sizeof(float) * n), "cudaMalloc");
  check(cudaMalloc(&y, sizeof(float) * n), "cudaMalloc");
  check(cudaMemset(x, 0, sizeof(float) * n), "cudaMemset");
  check(cudaMemset(y, 0, sizeof(float) * n), "cudaMemset");
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  const cudaGraphExec_t graphs[3] = {capture(s, y, x, n, kernels, dependent, false),
                                     capture(s, y, x, n, kernels, dependent, false),
                                     capture(s, y, x, n, kernels, dependent, true)};
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  constexpr int kSteps = 2000;
  // Microseconds a step, median of 7 timed runs after 50 warm-up replays:
  // graph 0, and every `every`-th step graph `other` (every 0: never).
  auto step_us = [&](int every, int other) {
    std::vector<float> us;
    for (int r = 0; r < 7; ++r) {
      for (int i = 0; i < 50; ++i) check(cudaGraphLaunch(graphs[0], s), "cudaGraphLaunch");
      check(cudaEventRecord(start, s), "cudaEventRecord");
      for (int i = 1; i <= kSteps; ++i) {
        check(cudaGraphLaunch(every > 0 && i % every == 0 ? graphs[other] : graphs[0], s), "cudaGraphLaunch");
      }
      check(cudaEventRecord(stop, s), "cudaEventRecord");
      check(cudaEventSynchronize(stop), "cudaEventSynchronize");
      float ms = 0;
      check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      us.push_back(1000.0f * ms / kSteps);
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  };
  const float base = step_us(0, 0);
  std::printf("%d kernels of %d floats a graph, %s: one graph %.3f us a step\n", kernels, n,
              dependent ? "dependent launches" : "plain launches", base);
  for (int other = 1; other <= 2; ++other) {
    for (int every : {10, 2, 1}) {
      const float t = step_us(every, other);
      std::printf("  graph %d (%s) every %2d steps: %.3f us a step, %+.3f us a step it replaces\n", other,
                  other == 1 ? "same kernels" : "one kernel differs", every, t, (t - base) * every);
    }
  }
  return 0;
}
