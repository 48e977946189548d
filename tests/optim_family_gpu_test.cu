// SPDX-License-Identifier: Apache-2.0
// The optimizer family on the GPU: Lion and a user's own optimizer
// (user_adagrad.hpp, registered below with its one line) give the CPU's bits
// through the one templated step kernel, skips included; so do the
// optimizers with a pre-pass (LAMB, AdamW with update clipping: per-tensor
// sums in one documented order on both sides), eagerly and replayed from a
// CUDA graph; an optimizer whose kernel part is not registered is a clear
// error, and nothing changes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/cuda/backend.cuh"
#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"
#include "user_adagrad.hpp"

MIXPREC_REGISTER_OPTIMIZER(user::AdagradKernel)

namespace unregistered {
// Adagrad's rule under another key, which no .cu file registers.
struct Kernel;
struct Hyper : user::AdagradHyper {
  using kernel = Kernel;
};
struct Kernel : user::AdagradKernel {
  using Hyper = unregistered::Hyper;
  static constexpr const char* kKey = "test.unregistered";
};
struct Rule : user::AdagradRule {
  using Kernel = unregistered::Kernel;
  static Hyper hyper(const Options& o, double lr, unsigned f) {
    Hyper h;
    static_cast<user::AdagradHyper&>(h) = user::AdagradRule::hyper(o, lr, f);
    return h;
  }
};
}  // namespace unregistered

namespace mixprec {
namespace {

using test::first_difference;

// The same 12 steps (an inf at step 4) on host and device tensors: skip
// decisions, scales, step counts, masters, state and weights bit for bit.
template <class Opt>
void host_equals_device(const typename Opt::options_type& o) {
  const std::int64_t n = 4099;  // not a multiple of 4: the kernel's scalar tail too
  Tensor<half> hw({n}), hg({n});
  fill_normal(hw, 0, 1, 3);
  Tensor<half> dw = hw.to(Device::cuda(0)), dg({n}, Device::cuda(0));
  Opt host({{"w", hw, hg}}, o), device({{"w", dw, dg}}, o);
  amp::GradScalerOptions so;
  so.init_scale = 1024;
  amp::GradScaler hs(so);
  amp::DeviceGradScaler ds(so, Device::cuda(0));
  for (int s = 0; s < 12; ++s) {
    fill_normal(hg, 0, 0.5f * hs.scale(), 50 + static_cast<std::uint64_t>(s));
    if (s == 4) hg.at(n - 1) = from_float<half>(INFINITY);
    copy(hg, dg);
    hs.step(host);
    hs.update();
    ds.step(device);
    ds.update();
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(ds.skipped_steps(), hs.skipped_steps());
  EXPECT_EQ(hs.skipped_steps(), 1);
  EXPECT_EQ(ds.scale(), hs.scale());
  const optim::OptimizerState a = host.save_state(), b = device.save_state();
  ASSERT_EQ(b.params[0].step, a.params[0].step);
  ASSERT_EQ(first_difference(b.params[0].master, a.params[0].master), -1) << "master";
  ASSERT_EQ(first_difference(*b.params[0].state[0], *a.params[0].state[0]), -1) << "state 0";
  const Tensor<half> back = dw.to(Device::cpu());
  for (std::int64_t e = 0; e < n; ++e) ASSERT_EQ(to_bits(back.at(e)), to_bits(hw.at(e))) << "weight " << e;
}

TEST(FamilyGpu, LionGivesTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  optim::LionOptions o;
  o.lr = 1e-3;
  o.weight_decay = 0.1;
  host_equals_device<optim::Lion>(o);
}

TEST(FamilyGpu, OwnOptimizerGivesTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  user::AdagradOptions o;
  o.lr_decay = 0.01;
  o.weight_decay = 0.001;
  host_equals_device<user::Adagrad>(o);
}

// --- the pre-pass: LAMB and update clipping -----------------------------------------------------

// Three parameters of weight type T, the same on host and device: one over
// two device chunks (2^16 elements) with a tail not a multiple of 4, two
// small ones. Steps with gradients of sd(s) (an inf planted at step 4, so
// one skip), the device step eager or replayed from a CUDA graph captured
// once (global mode: a synchronising call fails the capture). Skip
// decisions, scales, step counts, masters, every state tensor and weights
// must be the host's, bit for bit.
// With `second`, the last parameter is a group of its own with those
// options, and both optimizers follow a cosine schedule.
template <class Opt, class T, class Sd>
void prepass_host_equals_device(const typename Opt::options_type& o, Sd sd, bool graph,
                                const typename Opt::options_type* second = nullptr) {
  const std::vector<std::int64_t> sizes = {70001, 4099, 333};
  test::OwnedStream owner;
  cudaStream_t stream = owner.s;
  std::vector<Tensor<T>> hw, hg, dw, dg;
  std::vector<optim::Param> hp, dp;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    hw.emplace_back(Shape{sizes[i]});
    hg.emplace_back(Shape{sizes[i]});
    fill_normal(hw.back(), 0, 1, 3 + i);
    dw.push_back(hw.back().to(Device::cuda(0)));
    dg.emplace_back(Shape{sizes[i]}, Device::cuda(0));
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    hp.push_back({"p" + std::to_string(i), hw[i], hg[i]});
    dp.push_back({"p" + std::to_string(i), dw[i], dg[i]});
  }
  const std::size_t first = second ? sizes.size() - 1 : sizes.size();
  Opt host(std::vector<optim::Param>(hp.begin(), hp.begin() + first), o),
      device(std::vector<optim::Param>(dp.begin(), dp.begin() + first), o);
  if (second) {
    host.add_param_group({hp.back()}, *second);
    device.add_param_group({dp.back()}, *second);
    host.set_schedule(optim::LRSchedule::cosine(10, 0.1));
    device.set_schedule(optim::LRSchedule::cosine(10, 0.1));
  }
  amp::GradScalerOptions so;
  so.init_scale = 1024;
  amp::GradScaler hs(so);
  amp::DeviceGradScaler ds(so, Device::cuda(0), stream);
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    ds.step(device);
    ds.update();
    ASSERT_EQ(cudaStreamEndCapture(stream, &g), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
  }
  const int steps = 10;
  for (int s = 0; s < steps; ++s) {
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);  // the last step read the gradients
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      fill_normal(hg[i], 0, sd(s) * hs.scale(), 50 + 7 * static_cast<std::uint64_t>(s) + i);
      if (s == 4 && i == 1) hg[i].at(sizes[i] - 1) = from_float<T>(INFINITY);
      copy(hg[i], dg[i]);
    }
    // The copies ran on the legacy default stream (their DMA may still be in
    // flight when copy() returns); the step runs on `stream`.
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    hs.step(host);
    hs.update();
    if (graph) {
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    } else {
      ds.step(device);
      ds.update();
    }
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(hs.skipped_steps(), 1);
  EXPECT_EQ(ds.skipped_steps(), hs.skipped_steps());
  EXPECT_EQ(ds.scale(), hs.scale());
  const optim::OptimizerState a = host.save_state(), b = device.save_state();
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    ASSERT_EQ(b.params[i].step, a.params[i].step);
    ASSERT_EQ(first_difference(b.params[i].master, a.params[i].master), -1) << "master " << i;
    ASSERT_EQ(b.params[i].state.size(), a.params[i].state.size());
    for (std::size_t k = 0; k < a.params[i].state.size(); ++k) {
      ASSERT_EQ(b.params[i].state[k].has_value(), a.params[i].state[k].has_value());
      if (a.params[i].state[k]) {
        ASSERT_EQ(first_difference(*b.params[i].state[k], *a.params[i].state[k]), -1) << "state " << k << " of " << i;
      }
    }
    const Tensor<T> back = dw[i].to(Device::cpu());
    ASSERT_EQ(std::memcmp(back.data(), hw[i].data(), back.bytes()), 0) << "weight " << i;
  }
  if (graph) {
    EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
    EXPECT_EQ(cudaGraphDestroy(g), cudaSuccess);
  }
}

float steady(int) { return 0.05f; }
// Small gradients, then 30x larger: update clipping's RMS goes far above 1.
float jump(int s) { return s < 3 ? 0.01f : 0.3f; }

TEST(FamilyGpu, LambGivesTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  optim::LambOptions o;  // Apex's defaults: trust ratio, bias correction, the norm's clamp (the norm is ~40)
  o.lr = 1e-2;
  prepass_host_equals_device<optim::LAMB, half>(o, steady, false);
  prepass_host_equals_device<optim::LAMB, bfloat16>(o, steady, false);
  o.bias_correction = false;
  o.adam_w_mode = false;
  o.grad_averaging = false;
  o.max_grad_norm = 0;
  prepass_host_equals_device<optim::LAMB, half>(o, steady, false);
  o = {};
  o.weight_decay = 0;
  o.use_nvlamb = true;
  prepass_host_equals_device<optim::LAMB, bfloat16>(o, jump, false);
}

TEST(FamilyGpu, AdamWUpdateClippingGivesTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.1;
  o.update_clipping = true;
  prepass_host_equals_device<optim::AdamW, half>(o, jump, false);
  prepass_host_equals_device<optim::AdamW, bfloat16>(o, jump, false);
  optim::AdamOptions a;
  a.lr = 1e-2;
  a.weight_decay = 0.01;
  a.amsgrad = true;
  a.update_clipping = true;
  prepass_host_equals_device<optim::Adam, half>(a, jump, false);
}

// Groups with different pre-pass needs in one launch (the flags of every
// group), under a schedule the kernels apply on the device.
TEST(FamilyGpu, PrepassGroupsAndScheduleGiveTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  optim::LambOptions a, b;
  a.lr = 1e-2;
  b.lr = 5e-3;
  b.weight_decay = 0;
  b.max_grad_norm = 0;
  prepass_host_equals_device<optim::LAMB, half>(a, steady, false, &b);
  prepass_host_equals_device<optim::LAMB, bfloat16>(a, jump, true, &b);
  optim::AdamWOptions c, d;
  c.lr = 1e-2;
  c.update_clipping = true;
  d.lr = 1e-2;  // no clipping: no pre-pass for this group
  prepass_host_equals_device<optim::AdamW, half>(c, jump, false, &d);
}

TEST(FamilyGpu, PrepassStepsReplayedFromACudaGraphGiveTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  optim::LambOptions l;
  l.lr = 1e-2;
  prepass_host_equals_device<optim::LAMB, half>(l, jump, true);
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.update_clipping = true;
  prepass_host_equals_device<optim::AdamW, bfloat16>(o, jump, true);
}

TEST(FamilyGpu, AnUnregisteredKernelIsAClearError) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Tensor<half> w({8}, Device::cuda(0)), g({8}, Device::cuda(0));
  fill(w, 1.0f);
  fill(g, 0.5f);
  optim::Family<unregistered::Rule> opt({{"w", w, g}}, user::AdagradOptions{});
  const optim::OptimizerState before = opt.save_state();
  test::expect_error([&] { opt.step(); }, {"no kernel for optimizer \"test.unregistered\"",
                                           "MIXPREC_REGISTER_OPTIMIZER"});
  const optim::OptimizerState after = opt.save_state();
  EXPECT_EQ(after.params[0].step, before.params[0].step);
  EXPECT_EQ(first_difference(after.params[0].master, before.params[0].master), -1);
}

}  // namespace
}  // namespace mixprec
