// SPDX-License-Identifier: Apache-2.0
// The spike guard on the device (DeviceGradScaler): planted loss and
// gradient-norm spikes skipped as guard skips, the scale and every bit of
// the state untouched, the same decisions and window as the host
// GradScaler on the same gradients and losses, and the same again from a
// CUDA graph replayed every step (the guard makes no host synchronisation).
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"

namespace mixprec {
namespace {

constexpr int kSteps = 90;
constexpr std::int64_t kSize = 3000;

amp::GradScalerOptions guarded() {
  amp::GradScalerOptions o;
  o.init_scale = 1024;
  o.growth_interval = 1000;
  o.spike_guard.enabled = true;
  o.spike_guard.window = 32;
  o.spike_guard.warmup = 16;
  return o;
}

// Step s's gradient (times the scale) and loss: a stable noise floor, a
// loss spike at 40, a gradient-norm spike at 55 (the loss as usual), an
// overflow at 70.
std::vector<half> gradient(int s, float scale) {
  std::mt19937 rng(static_cast<std::uint32_t>(77 + s));
  std::normal_distribution<float> n(0.0f, 0.01f);
  std::vector<half> g(static_cast<std::size_t>(kSize));
  const float factor = s == 55 ? 40.0f : 1.0f;
  for (half& x : g) x = half(n(rng) * factor * scale);
  if (s == 70) g[5] = half(std::numeric_limits<float>::infinity());
  return g;
}
float loss_of(int s) {
  std::mt19937 rng(static_cast<std::uint32_t>(5 + s));
  std::normal_distribution<float> n(0.0f, 0.01f);
  return s == 40 ? 50.0f : 1.0f + n(rng);
}

struct GuardRun {
  std::vector<int> applied;  // per step: the optimizer stepped
  std::int64_t guard_skips = 0, overflow_skips = 0;
  amp::SpikeGuardSnapshot guard;
  std::vector<float> master;
  float scale = 0;
};

GuardRun host_run() {
  Tensor<half> w(Shape{kSize}), g(Shape{kSize});
  fill_normal(w, 0, 1, 3);
  optim::Adam opt({{"w", w, g}}, optim::AdamOptions{});
  amp::GradScaler scaler(guarded());
  GuardRun r;
  for (int s = 1; s <= kSteps; ++s) {
    const std::vector<half> h = gradient(s, scaler.scale());
    std::memcpy(g.data(), h.data(), h.size() * sizeof(half));
    scaler.set_loss(loss_of(s));
    r.applied.push_back(scaler.step(opt) ? 1 : 0);
    scaler.update();
  }
  r.guard_skips = scaler.guard_skipped_steps();
  r.overflow_skips = scaler.skipped_steps();
  r.guard = scaler.spike_guard_snapshot();
  r.master = opt.save_state().params[0].master;
  r.scale = scaler.scale();
  return r;
}

GuardRun device_run(bool graph) {
  test::OwnedStream owner;
  cudaStream_t stream = owner.s;
  const Device dev = Device::cuda(0);
  Tensor<half> hw(Shape{kSize});
  fill_normal(hw, 0, 1, 3);
  Tensor<half> w = hw.to(dev), g(Shape{kSize}, dev);
  optim::Adam opt({{"w", TensorRef(w), TensorRef(g)}}, optim::AdamOptions{});
  amp::DeviceGradScaler scaler(guarded(), dev, stream);
  Buffer loss(sizeof(float), dev);
  scaler.set_loss(static_cast<const float*>(loss.data()));
  cudaGraphExec_t exec = nullptr;
  cudaGraph_t captured = nullptr;
  if (graph) {
    EXPECT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    scaler.step(opt);
    scaler.update();
    EXPECT_EQ(cudaStreamEndCapture(stream, &captured), cudaSuccess);
    EXPECT_EQ(cudaGraphInstantiate(&exec, captured, 0), cudaSuccess);
  }
  GuardRun r;
  for (int s = 1; s <= kSteps; ++s) {
    const float scale = scaler.scale();  // synchronises: the gradients depend on it, as a backward pass's would
    const std::vector<half> h = gradient(s, scale);
    const float l = loss_of(s);
    EXPECT_EQ(cudaMemcpyAsync(g.data(), h.data(), h.size() * sizeof(half), cudaMemcpyHostToDevice, stream),
              cudaSuccess);
    EXPECT_EQ(cudaMemcpyAsync(loss.data(), &l, sizeof l, cudaMemcpyHostToDevice, stream), cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);  // the host buffers go out of scope
    const std::vector<std::uint32_t> before = test::state_bits(opt);
    const std::int64_t guard_before = scaler.guard_skipped_steps();
    if (graph) {
      EXPECT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    } else {
      scaler.step(opt);
      scaler.update();
    }
    const bool changed = test::state_bits(opt) != before;
    r.applied.push_back(changed ? 1 : 0);
    if (scaler.guard_skipped_steps() > guard_before) {
      // A guard skip: every bit of the optimizer's state as it was, the scale as it was.
      EXPECT_FALSE(changed) << "step " << s;
      EXPECT_EQ(scaler.scale(), scale) << "step " << s;
    }
  }
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  r.guard_skips = scaler.guard_skipped_steps();
  r.overflow_skips = scaler.skipped_steps();
  r.guard = scaler.spike_guard_snapshot();
  r.master = opt.save_state().params[0].master;
  r.scale = scaler.scale();
  if (graph) {
    EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
    EXPECT_EQ(cudaGraphDestroy(captured), cudaSuccess);
  }
  return r;
}

TEST(SpikeGuardGpu, PlantedSpikesSkippedAsOnTheHost) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const GuardRun host = host_run();
  // The planted steps, on the host path first (the oracle).
  ASSERT_EQ(host.applied[40 - 1], 0);
  ASSERT_EQ(host.applied[55 - 1], 0);
  ASSERT_EQ(host.applied[70 - 1], 0);
  ASSERT_EQ(host.guard_skips, 2);
  ASSERT_EQ(host.overflow_skips, 1);
  const GuardRun dev = device_run(false);
  EXPECT_EQ(dev.applied, host.applied);
  EXPECT_EQ(dev.guard_skips, 2);
  EXPECT_EQ(dev.overflow_skips, 1);
  EXPECT_EQ(dev.scale, host.scale) << "one backoff, for the overflow only";
  // The same window: losses bit for bit (the same floats), norms within the
  // rounding of the two check passes' sums of squares (different orders).
  EXPECT_EQ(dev.guard.state.count, host.guard.state.count);
  EXPECT_EQ(dev.guard.state.next, host.guard.state.next);
  EXPECT_EQ(dev.guard.loss, host.guard.loss);
  ASSERT_EQ(dev.guard.grad_norm.size(), host.guard.grad_norm.size());
  for (std::size_t i = 0; i < host.guard.grad_norm.size(); ++i) {
    EXPECT_NEAR(dev.guard.grad_norm[i], host.guard.grad_norm[i], 1e-5 * host.guard.grad_norm[i]) << "slot " << i;
  }
}

TEST(SpikeGuardGpu, AGraphReplayedEveryStepDecidesAsEagerSteps) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const GuardRun eager = device_run(false);
  const GuardRun graphed = device_run(true);
  EXPECT_EQ(graphed.applied, eager.applied);
  EXPECT_EQ(graphed.guard_skips, 2);
  EXPECT_EQ(graphed.overflow_skips, 1);
  EXPECT_EQ(graphed.guard.loss, eager.guard.loss);
  EXPECT_EQ(graphed.guard.grad_norm, eager.guard.grad_norm);
  ASSERT_EQ(graphed.master.size(), eager.master.size());
  EXPECT_EQ(std::memcmp(graphed.master.data(), eager.master.data(), eager.master.size() * sizeof(float)), 0);
}

TEST(SpikeGuardGpu, TheLossPointerIsRequired) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const Device dev = Device::cuda(0);
  Tensor<half> w(Shape{16}, dev), g(Shape{16}, dev);
  optim::Adam opt({{"w", TensorRef(w), TensorRef(g)}}, optim::AdamOptions{});
  amp::DeviceGradScaler scaler(guarded(), dev);
  try {
    scaler.step(opt);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("set_loss"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(scaler.in_iteration());
}

}  // namespace
}  // namespace mixprec
