// SPDX-License-Identifier: Apache-2.0
// Lean optimizer state on the GPU (cuda/lean_step.cuh): every layout gives
// the CPU's bits (optim_lean_test checks the CPU against references), the
// 8-bit blocks, tie bits and stochastic rounding (weights and bf16_sr
// moments) included, eagerly and
// replayed from a CUDA graph; a device checkpoint resumes on the host.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/cuda/backend.cuh"
#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using optim::Master;
using optim::Moments;
using optim::StateLayout;
using test::first_difference;

std::vector<StateLayout> lean_layouts(bool bf16_weights) {
  std::vector<StateLayout> out;
  for (Moments mo : {Moments::fp32, Moments::bf16, Moments::bf16_sr, Moments::int8}) {
    for (Master ma : {Master::fp32, Master::remainder, Master::none}) {
      if (ma == Master::remainder && !bf16_weights) continue;
      StateLayout l;
      l.moments = mo;
      l.master = ma;
      l.seed = 7;
      if (l.lean()) out.push_back(l);
    }
  }
  return out;
}

template <class T>
void upload(const Tensor<T>& host, T* device) {
  ASSERT_EQ(cudaMemcpy(device, host.data(), host.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
}
template <class T>
Tensor<T> download(const T* device, std::int64_t n) {
  Tensor<T> host(Shape{n});
  EXPECT_EQ(cudaMemcpy(host.data(), device, host.bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

// Six parameters (one over two device chunks with a tail that is not a
// whole tile or tie word, two small ones, one whose device weight and
// gradient start an element into their buffers: not aligned for the
// 8-element accesses, so it takes the element-wise path, one with
// gradients about 2^-30, whose second moments' 8-bit blocks have scales
// below 2^-60: the encoder's division path, not its reciprocal's (checked
// below), and one with gradients about 2^-27.5, whose blocks' scales come
// near 2^-60, the reciprocal's edge), 10 steps with an
// inf at step 4, host and device: skips, scales, step counts, masters (as
// master_values), every state tensor (decoded) and the weights, bit for bit.
template <class Opt, class T>
void lean_host_equals_device(typename Opt::options_type o, const StateLayout& layout, bool graph) {
  o.layout = layout;
  const std::vector<std::int64_t> sizes = {70001, 4099, 333, 2051, 1500, 1500};
  const std::vector<std::int64_t> offsets = {0, 0, 0, 1, 0, 0};
  // The gradients' (unscaled) spread.
  const std::vector<float> spreads = {0.5f, 0.5f, 0.5f, 0.5f, 0x1p-30f, 0x1.6a09e6p-28f};
  test::OwnedStream owner;
  cudaStream_t stream = owner.s;
  std::vector<Tensor<T>> hw, hg, dw, dg;  // dw, dg: the device buffers, the views at offsets[i]
  std::vector<optim::Param> hp, dp;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    hw.emplace_back(Shape{sizes[i]});
    hg.emplace_back(Shape{sizes[i]});
    fill_normal(hw.back(), 0, 1, 3 + i);
    dw.emplace_back(Shape{sizes[i] + offsets[i]}, Device::cuda(0));
    dg.emplace_back(Shape{sizes[i] + offsets[i]}, Device::cuda(0));
    upload(hw.back(), dw.back().data() + offsets[i]);
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    hp.push_back({"p" + std::to_string(i), hw[i], hg[i]});
    dp.push_back({"p" + std::to_string(i), TensorView<T>(dw[i].data() + offsets[i], Shape{sizes[i]}, Device::cuda(0)),
                  TensorView<T>(dg[i].data() + offsets[i], Shape{sizes[i]}, Device::cuda(0))});
  }
  Opt host(hp, o), device(dp, o);
  device.set_stream(stream);
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
  for (int s = 0; s < 10; ++s) {
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      fill_normal(hg[i], 0, spreads[i] * hs.scale(), 50 + 7 * static_cast<std::uint64_t>(s) + i);
      if (s == 4 && i == 1) hg[i].at(sizes[i] - 1) = from_float<T>(INFINITY);
      upload(hg[i], dg[i].data() + offsets[i]);
    }
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
  if (graph) {
    ASSERT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
    ASSERT_EQ(cudaGraphDestroy(g), cudaSuccess);
  }
  EXPECT_EQ(hs.skipped_steps(), 1);
  EXPECT_EQ(ds.skipped_steps(), hs.skipped_steps());
  EXPECT_EQ(ds.scale(), hs.scale());
  EXPECT_EQ(test::state_bits(device), test::state_bits(host));
  if (layout.moments == Moments::int8) {
    // Parameter 4's nonnegative states (second moments) stayed below 2^-60
    // in every block: the division path ran (the bits above cover it).
    const optim::ParamState& tiny = host.save_state().params[4];
    for (std::size_t k = 0; k < tiny.state.size(); ++k) {
      if (!host.nonnegative_state(k) || !tiny.state[k]) continue;
      float most = 0.0f;
      for (float v : *tiny.state[k]) most = std::max(most, v);
      EXPECT_GT(most, 0.0f) << "state " << k;
      EXPECT_LT(most, 0x1p-60f) << "state " << k;
    }
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const Tensor<T> back = download(dw[i].data() + offsets[i], sizes[i]);
    ASSERT_EQ(std::memcmp(back.data(), hw[i].data(), back.bytes()), 0) << "weight " << i;
  }
  // The device's state loads into a host optimizer, which then steps as the
  // host run does.
  std::vector<Tensor<T>> cw, cg;
  std::vector<optim::Param> cp;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    cw.push_back(download(dw[i].data() + offsets[i], sizes[i]));
    cg.emplace_back(Shape{sizes[i]});
    cp.push_back({"p" + std::to_string(i), cw[i], cg[i]});
  }
  Opt resumed(cp, o);
  resumed.load_state(device.save_state());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    fill_normal(hg[i], 0, 0.5f, 999 + i);
    copy(hg[i], cg[i]);
  }
  host.step();
  resumed.step();
  EXPECT_EQ(test::state_bits(resumed), test::state_bits(host));
}

optim::AdamWOptions adamw() {
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.amsgrad = true;
  return o;
}

TEST(LeanGpu, AdamWEveryLayoutGivesTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (const StateLayout& l : lean_layouts(true)) {
    SCOPED_TRACE(std::string("bf16 weights, moments ") + to_string(l.moments) + ", master " + to_string(l.master));
    lean_host_equals_device<optim::AdamW, bfloat16>(adamw(), l, false);
  }
  for (const StateLayout& l : lean_layouts(false)) {
    SCOPED_TRACE(std::string("fp16 weights, moments ") + to_string(l.moments) + ", master " + to_string(l.master));
    lean_host_equals_device<optim::AdamW, half>(adamw(), l, false);
  }
}

TEST(LeanGpu, OtherOptimizersAndAGraphGiveTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  StateLayout leanest;
  leanest.moments = Moments::int8;
  leanest.master = Master::none;
  leanest.seed = 3;
  StateLayout remainder;
  remainder.moments = Moments::bf16;
  remainder.master = Master::remainder;
  StateLayout stochastic;  // both streams: the moments' and the weight's
  stochastic.moments = Moments::bf16_sr;
  stochastic.master = Master::none;
  stochastic.seed = 5;
  for (const StateLayout& l : {leanest, remainder, stochastic}) {
    SCOPED_TRACE(std::string("moments ") + to_string(l.moments) + ", master " + to_string(l.master));
    optim::SGDOptions sgd;
    sgd.lr = 1e-2;
    sgd.momentum = 0.9;
    sgd.nesterov = true;
    lean_host_equals_device<optim::SGD, bfloat16>(sgd, l, true);
    optim::RMSpropOptions rms;
    rms.lr = 1e-3;
    rms.centered = true;
    rms.momentum = 0.5;
    lean_host_equals_device<optim::RMSprop, bfloat16>(rms, l, true);
    optim::LionOptions lion;
    lion.lr = 1e-3;
    lion.weight_decay = 0.1;
    lean_host_equals_device<optim::Lion, bfloat16>(lion, l, true);
    lean_host_equals_device<optim::AdamW, bfloat16>(adamw(), l, true);
  }
}

// The lists the uniform lean kernels take (cuda::uniform_lean_step: bf16
// throughout, one layout for every parameter, no third state): AdamW
// without amsgrad and SGD with momentum in the four layouts that have such
// a kernel, and bf16_sr, which shares the bf16 one; eager and in a graph.
// The parameter at an offset of one element runs that kernel's element-a-
// thread path. Same bits as the host.
TEST(LeanGpu, UniformLeanKernelsGiveTheCpuBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const std::pair<Moments, Master> layouts[] = {{Moments::bf16, Master::fp32},
                                                {Moments::bf16_sr, Master::fp32},
                                                {Moments::int8, Master::fp32},
                                                {Moments::fp32, Master::remainder},
                                                {Moments::fp32, Master::none}};
  for (const auto& [moments, master] : layouts) {
    StateLayout l;
    l.moments = moments;
    l.master = master;
    l.seed = 11;
    SCOPED_TRACE(std::string("moments ") + to_string(l.moments) + ", master " + to_string(l.master));
    ASSERT_NE(cuda::detail::uniform_lean_kernel<optim::AdamKernel>(
                  master, cuda::ParamList::lean_moments_class(moments)),
              nullptr);
    optim::AdamWOptions adam;
    adam.lr = 1e-2;
    optim::SGDOptions sgd;
    sgd.lr = 1e-2;
    sgd.momentum = 0.9;
    for (bool graph : {false, true}) {
      lean_host_equals_device<optim::AdamW, bfloat16>(adam, l, graph);
      lean_host_equals_device<optim::SGD, bfloat16>(sgd, l, graph);
    }
  }
}

// Which lists ParamList calls uniform in a lean layout: every entry lean in
// the same one (bf16_sr counted as bf16), whatever else differs.
TEST(LeanGpu, ParamListFindsAUniformLeanLayout) {
  MIXPREC_SKIP_WITHOUT_GPU();
  cuda::ParamEntry a{};
  a.weight_dtype = DType::bfloat16;
  a.lean.active = true;
  a.lean.moments = Moments::bf16;
  a.lean.master = Master::fp32;
  cuda::ParamEntry b = a;
  b.lean.moments = Moments::bf16_sr;
  const auto both = cuda::ParamList({a, b}).uniform_lean();
  ASSERT_TRUE(both.has_value());
  EXPECT_EQ(both->first, Master::fp32);
  EXPECT_EQ(both->second, Moments::bf16);
  cuda::ParamEntry c = a;
  c.lean.master = Master::none;
  EXPECT_FALSE(cuda::ParamList({a, c}).uniform_lean().has_value());
  cuda::ParamEntry d = a;
  d.lean = optim::DeviceLeanState{};  // the default layout: not lean
  EXPECT_FALSE(cuda::ParamList({a, d}).uniform_lean().has_value());
  EXPECT_FALSE(cuda::ParamList({d}).uniform_lean().has_value());
}

}  // namespace
}  // namespace mixprec
