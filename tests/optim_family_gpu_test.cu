// SPDX-License-Identifier: Apache-2.0
// The optimizer family on the GPU: Lion and a user's own optimizer
// (user_adagrad.hpp, registered below with its one line) give the CPU's bits
// through the one templated step kernel, skips included; an optimizer whose
// kernel part is not registered is a clear error, and nothing changes.
#include <gtest/gtest.h>

#include <cstdint>
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
