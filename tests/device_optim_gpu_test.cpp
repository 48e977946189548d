// SPDX-License-Identifier: Apache-2.0
// The host API on the GPU, compiled by g++ (the kernels come from
// device_backend.cu, the one .cu file a .cpp trainer adds): SGD, Adam, AdamW
// and RMSprop with device parameters, driven by DeviceGradScaler, against
// the same optimizers on the host driven by GradScaler (themselves checked
// against PyTorch). Same gradients, same injected overflows: skip decisions,
// scales, counters and step counts equal; masters bit-identical after the
// first step without clipping (the kernels run the CPU's formulas without
// contraction) and within torch's fp32 tolerance after 50 steps; with
// clipping the norm is summed in another order, so those cases are held to
// torch's tolerance from the first step (optimizer_step_gpu_test explains).
// Also: a whole step captured in a CUDA graph from the first step and
// replayed 100 times equals the eager run; which parameter overflowed; the
// lazily raised min_scale error; several optimizers on one scaler; errors.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::ulp_distance;

/// The same model twice: host tensors for the CPU optimizer, device tensors
/// for the GPU one, equal initial weights.
template <class T>
struct Model {
  std::vector<std::int64_t> sizes;
  std::vector<Tensor<T>> hw, hg, dw, dg;

  explicit Model(std::vector<std::int64_t> s = {7, 65536 + 3, 0, 1000, 3 * 65536 + 5}) : sizes(std::move(s)) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      hw.emplace_back(Shape{sizes[i]});
      hg.emplace_back(Shape{sizes[i]});
      fill_normal(hw.back(), 0, 1, 100 + i);
      dw.push_back(hw.back().to(Device::cuda(0)));
      dg.emplace_back(Shape{sizes[i]}, Device::cuda(0));
    }
  }
  std::vector<optim::Param> params(bool device, std::size_t begin = 0, std::size_t end = SIZE_MAX) {
    std::vector<optim::Param> ps;
    for (std::size_t i = begin; i < std::min(end, sizes.size()); ++i) {
      ps.push_back({"p" + std::to_string(i), device ? TensorRef(dw[i]) : TensorRef(hw[i]),
                    device ? TensorRef(dg[i]) : TensorRef(hg[i])});
    }
    return ps;
  }
  /// Fresh gradients for step `step` on both sides (scaled by `scale` so that
  /// fp16 overflows when the scale grows), an inf in the last element of the
  /// last tensor at the `inject` steps.
  void gradients(int step, float sigma, bool inject, stream_t stream = nullptr) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      fill_normal(hg[i], 0, sigma, 1000 * step + i);
      if (inject && i + 1 == sizes.size() && sizes[i] > 0) hg[i].at(sizes[i] - 1) = from_float<T>(INFINITY);
      copy(hg[i], dg[i], stream);
    }
  }
};

template <class T, class Opt>
void compare(const typename Opt::options_type& options, double max_norm, const std::string& what,
             bool two_groups = false, const optim::LRSchedule& schedule = optim::LRSchedule::constant()) {
  SCOPED_TRACE(what + " " + dtype_traits<T>::name);
  Model<T> m;
  std::unique_ptr<Opt> cpu, gpu;
  if (two_groups) {
    // Groups of different options: pass 2 launches once per group.
    typename Opt::options_type second = options;
    second.lr = options.lr * 0.5;
    second.weight_decay = 0;
    cpu = std::make_unique<Opt>(m.params(false, 0, 2), options);
    cpu->add_param_group(m.params(false, 2), second);
    gpu = std::make_unique<Opt>(m.params(true, 0, 2), options);
    gpu->add_param_group(m.params(true, 2), second);
  } else {
    cpu = std::make_unique<Opt>(m.params(false), options);
    gpu = std::make_unique<Opt>(m.params(true), options);
  }
  cpu->set_schedule(schedule);
  gpu->set_schedule(schedule);
  ASSERT_TRUE(gpu->on_device());
  amp::GradScalerOptions so = amp::GradScalerOptions::for_dtype(dtype_of<T>);
  so.init_scale = 1024;
  so.growth_interval = 3;
  amp::GradScaler cpu_scaler(so);
  amp::DeviceGradScaler gpu_scaler(so);
  std::int64_t worst = 0;
  for (int step = 0; step < 50; ++step) {
    m.gradients(step, 30.0f * cpu_scaler.scale() / 1024, step == 4 || step == 17);
    const bool applied = max_norm > 0 ? cpu_scaler.step(*cpu, max_norm) : cpu_scaler.step(*cpu);
    if (max_norm > 0) {
      gpu_scaler.step(*gpu, max_norm);
    } else {
      gpu_scaler.step(*gpu);
    }
    ASSERT_EQ(gpu_scaler.found_inf(*gpu), !applied) << "step " << step;
    if (!applied) {
      EXPECT_EQ(gpu_scaler.nonfinite_params(*gpu), cpu_scaler.nonfinite_params(*cpu));
    }
    if (applied && max_norm > 0) {
      const float want = cpu_scaler.grad_norm(*cpu), have = gpu_scaler.grad_norm(*gpu);
      ASSERT_NEAR(have, want, 1e-6 * want) << "step " << step;
    }
    cpu_scaler.update();
    gpu_scaler.update();
    ASSERT_EQ(gpu_scaler.scale(), cpu_scaler.scale()) << "step " << step;
    const amp::ScalerState cs = cpu_scaler.state(), gs = gpu_scaler.state();
    ASSERT_EQ(gs.growth_tracker, cs.growth_tracker);
    ASSERT_EQ(gs.hysteresis_tracker, cs.hysteresis_tracker);
    ASSERT_EQ(gpu_scaler.applied_steps(), cpu_scaler.applied_steps());
    ASSERT_EQ(gpu_scaler.skipped_steps(), cpu_scaler.skipped_steps());
    ASSERT_EQ(gpu->applied_steps(), cpu->applied_steps());
    if (step == 4 || step == 17) {
      ASSERT_FALSE(applied);
    }
    for (std::size_t i = 0; i < m.sizes.size(); ++i) {
      ASSERT_EQ(gpu->step_count(i), cpu->step_count(i));
      const Tensor<float> have = gpu->master(i).to(Device::cpu());
      const Tensor<T> weight = m.dw[i].to(Device::cpu());
      for (std::int64_t e = 0; e < have.numel(); ++e) {
        const float want = cpu->master(i).at(e), got = have.at(e);
        // The model weight is the master rounded, on the device as on the host.
        ASSERT_EQ(to_bits(weight.at(e)), to_bits(from_float<T>(got))) << "p" << i << "[" << e << "]";
        if (step == 0 && max_norm == 0) {
          worst = std::max(worst, ulp_distance(got, want));
          // The issue allows 2 ulp; the kernels give the host's bits.
          ASSERT_EQ(ulp_distance(got, want), 0) << "p" << i << "[" << e << "]";
        } else {
          ASSERT_LE(std::fabs(got - want), 1e-5 + 1.3e-6 * std::fabs(want))
              << "p" << i << "[" << e << "] step " << step;
        }
      }
    }
  }
  EXPECT_GT(cpu_scaler.skipped_steps(), 1);
  if (max_norm == 0) {
    std::printf("%-36s %-9s worst ulp after the first step: %lld\n", what.c_str(), dtype_traits<T>::name,
                static_cast<long long>(worst));
  }
}

template <class T>
void all_optimizers() {
  optim::AdamWOptions adamw;
  compare<T, optim::AdamW>(adamw, 0, "AdamW");
  compare<T, optim::AdamW>(adamw, 1.0, "AdamW clip");
  compare<T, optim::AdamW>(adamw, 0, "AdamW two groups, cosine", true, optim::LRSchedule::cosine(40, 0.1));
  optim::AdamOptions adam;
  adam.amsgrad = true;
  adam.weight_decay = 0.1;
  adam.maximize = true;
  compare<T, optim::Adam>(adam, 0, "Adam amsgrad wd maximize");
  optim::SGDOptions sgd;
  sgd.lr = 0.01;
  compare<T, optim::SGD>(sgd, 0, "SGD");
  sgd.momentum = 0.9;
  sgd.nesterov = true;
  sgd.weight_decay = 1e-3;
  compare<T, optim::SGD>(sgd, 0, "SGD nesterov wd");
  compare<T, optim::SGD>(sgd, 0.5, "SGD nesterov clip");
  sgd.nesterov = false;
  sgd.dampening = 0.3;
  compare<T, optim::SGD>(sgd, 0, "SGD dampening, step decay", true, optim::LRSchedule::step_decay(10, 0.5));
  optim::RMSpropOptions rms;
  rms.lr = 1e-3;
  compare<T, optim::RMSprop>(rms, 0, "RMSprop");
  rms.centered = true;
  rms.momentum = 0.9;
  rms.weight_decay = 0.01;
  compare<T, optim::RMSprop>(rms, 0, "RMSprop centered momentum wd");
}

TEST(DeviceOptim, MatchesHostHalf) {
  MIXPREC_SKIP_WITHOUT_GPU();
  all_optimizers<half>();
}
TEST(DeviceOptim, MatchesHostBfloat16) {
  MIXPREC_SKIP_WITHOUT_GPU();
  all_optimizers<bfloat16>();
}
TEST(DeviceOptim, MatchesHostFloat) {
  MIXPREC_SKIP_WITHOUT_GPU();
  all_optimizers<float>();
}

TEST(DeviceOptim, PlainStepMatchesHost) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Model<half> m;
  optim::SGDOptions o;
  o.lr = 0.01;
  o.momentum = 0.9;
  o.dampening = 0.1;
  optim::SGD cpu(m.params(false), o), gpu(m.params(true), o);
  for (int step = 0; step < 5; ++step) {
    m.gradients(step, 1.0f, false);
    cpu.step();
    gpu.step();
  }
  // Momentum switched on later: the new buffers start as a copy of the gradient.
  optim::SGD cpu2(m.params(false), {}), gpu2(m.params(true), {});
  for (int step = 0; step < 4; ++step) {
    if (step == 2) {
      cpu2.set_options(0, o);
      gpu2.set_options(0, o);
    }
    m.gradients(10 + step, 1.0f, false);
    cpu2.step();
    gpu2.step();
  }
  for (std::size_t i = 0; i < m.sizes.size(); ++i) {
    for (auto [c, g] : {std::pair{&cpu, &gpu}, std::pair{&cpu2, &gpu2}}) {
      const Tensor<float> have = g->master(i).to(Device::cpu());
      ASSERT_EQ(std::memcmp(have.data(), c->master(i).data(), have.bytes()), 0) << "p" << i;
      EXPECT_EQ(g->step_count(i), c->step_count(i));
    }
  }
}

// Fresh gradients, then one training step; the same with a graph captured
// from the very first step (global capture mode: any call that would
// synchronise fails the capture) and replayed.
TEST(DeviceOptim, GraphReplayMatchesEager) {
  MIXPREC_SKIP_WITHOUT_GPU();
  // Declared first, destroyed last: the stream outlives the scalers.
  test::OwnedStream owner;
  cudaStream_t stream = owner.s;
  Model<half> eager_model, graph_model;
  optim::AdamWOptions o;
  optim::AdamW eager(eager_model.params(true), o), graphed(graph_model.params(true), o);
  for (auto* opt : {&eager, &graphed}) opt->set_schedule(optim::LRSchedule::cosine(100, 0.1));
  amp::GradScalerOptions so;
  so.init_scale = 4096;
  so.growth_interval = 5;
  amp::DeviceGradScaler eager_scaler(so, Device::cuda(0), stream), graph_scaler(so, Device::cuda(0), stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  graph_scaler.step(graphed, 1.0);
  graph_scaler.update();
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int it = 0; it < 100; ++it) {
    const float sigma = 400;  // overflows fp16 now and then as the scale grows
    eager_model.gradients(it, sigma, it % 23 == 7, stream);
    graph_model.gradients(it, sigma, it % 23 == 7, stream);
    eager_scaler.step(eager, 1.0);
    eager_scaler.update();
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(eager_scaler.applied_steps() + eager_scaler.skipped_steps(), 100);
  EXPECT_GT(eager_scaler.skipped_steps(), 2);
  EXPECT_GT(eager_scaler.applied_steps(), 50);
  EXPECT_EQ(graph_scaler.applied_steps(), eager_scaler.applied_steps());
  EXPECT_EQ(graph_scaler.skipped_steps(), eager_scaler.skipped_steps());
  const amp::ScalerState a = eager_scaler.state(), b = graph_scaler.state();
  EXPECT_EQ(a.scale, b.scale);
  EXPECT_EQ(a.growth_tracker, b.growth_tracker);
  EXPECT_EQ(graphed.applied_steps(), eager.applied_steps());
  for (std::size_t i = 0; i < eager_model.sizes.size(); ++i) {
    EXPECT_EQ(graphed.step_count(i), eager.step_count(i));
    const Tensor<float> x = eager.master(i).to(Device::cpu()), y = graphed.master(i).to(Device::cpu());
    ASSERT_EQ(std::memcmp(x.data(), y.data(), x.bytes()), 0) << "master " << i;
    const Tensor<half> u = eager_model.dw[i].to(Device::cpu()), v = graph_model.dw[i].to(Device::cpu());
    ASSERT_EQ(std::memcmp(u.data(), v.data(), u.bytes()), 0) << "weight " << i;
  }
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
}

TEST(DeviceOptim, NamesTheParametersThatOverflowedAndSkipsWhole) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Model<half> m;
  optim::AdamW opt(m.params(true));
  amp::DeviceGradScaler scaler;
  m.gradients(0, 1.0f, false);
  scaler.step(opt);
  scaler.update();
  std::vector<Tensor<float>> before;
  for (std::size_t i = 0; i < m.sizes.size(); ++i) before.push_back(opt.master(i).to(Device::cpu()));
  m.gradients(1, 1.0f, false);
  m.hg[1].at(65536) = from_float<half>(-INFINITY);  // first element of the second chunk
  m.hg[3].at(0) = from_float<half>(NAN);
  copy(m.hg[1], m.dg[1]);
  copy(m.hg[3], m.dg[3]);
  scaler.unscale(opt);
  EXPECT_TRUE(scaler.found_inf(opt));
  EXPECT_EQ(scaler.nonfinite_params(opt), (std::vector<std::string>{"p1", "p3"}));
  EXPECT_TRUE(std::isnan(scaler.grad_norm(opt)) || std::isinf(scaler.grad_norm(opt)));
  scaler.step(opt);
  scaler.update();
  EXPECT_EQ(scaler.scale(), 32768.0f);
  EXPECT_EQ(scaler.skipped_steps(), 1);
  EXPECT_EQ(opt.applied_steps(), 1);
  for (std::size_t i = 0; i < m.sizes.size(); ++i) {
    EXPECT_EQ(opt.step_count(i), 1);
    const Tensor<float> after = opt.master(i).to(Device::cpu());
    ASSERT_EQ(std::memcmp(after.data(), before[i].data(), after.bytes()), 0) << "p" << i;
  }
}

TEST(DeviceOptim, UnscaleWithoutStepStillCountsTheOverflow) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Model<half> m;
  optim::AdamW opt(m.params(true));
  amp::DeviceGradScaler scaler;
  m.gradients(0, 1.0f, true);
  scaler.unscale(opt);  // the user inspects, then decides not to step
  scaler.update();
  EXPECT_EQ(scaler.skipped_steps(), 1);
  EXPECT_EQ(scaler.scale(), 32768.0f);
  EXPECT_EQ(opt.applied_steps(), 0);
}

TEST(DeviceOptim, MinScaleErrorIsRaisedOnceAndLazily) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Model<half> m({100});
  optim::SGD opt(m.params(true));
  amp::GradScalerOptions so;
  so.init_scale = 4;
  so.min_scale = 1;
  so.error_at_min_scale = true;
  amp::DeviceGradScaler scaler(so);
  int raised = 0;
  for (int it = 0; it < 6; ++it) {
    m.gradients(it, 1.0f, true);  // every step overflows
    scaler.step(opt);
    try {
      scaler.update();
    } catch (const Error& e) {
      ++raised;
      EXPECT_NE(std::string(e.what()).find("min_scale = 1"), std::string::npos) << e.what();
    }
    if (it == 2) {
      // The third backoff is the first clamped one; once the stream is
      // idle, the copy shows it.
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      try {
        scaler.check_errors();
      } catch (const Error&) {
        ++raised;
      }
      EXPECT_EQ(raised, 1);
    }
  }
  scaler.check_errors();  // raised once only
  EXPECT_EQ(raised, 1);
  EXPECT_EQ(scaler.scale(), 1.0f);
  EXPECT_EQ(scaler.state().min_scale_hits, 4);
  EXPECT_EQ(opt.applied_steps(), 0);
}

TEST(DeviceOptim, SeveralOptimizersOnOneScaler) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Model<half> m;
  optim::AdamW cpu_a(m.params(false, 0, 3)), gpu_a(m.params(true, 0, 3));
  optim::SGDOptions so;
  so.momentum = 0.9;
  optim::SGD cpu_b(m.params(false, 3), so), gpu_b(m.params(true, 3), so);
  amp::GradScaler cpu_scaler;
  amp::DeviceGradScaler gpu_scaler;
  for (int step = 0; step < 8; ++step) {
    m.gradients(step, 1.0f, step == 3);  // the inf is in the SGD's last parameter
    const bool a = cpu_scaler.step(cpu_a), b = cpu_scaler.step(cpu_b);
    gpu_scaler.step(gpu_a);
    gpu_scaler.step(gpu_b);
    EXPECT_TRUE(a);  // each optimizer skips on its own gradients, as in torch
    EXPECT_EQ(b, step != 3);
    cpu_scaler.update();
    gpu_scaler.update();
    ASSERT_EQ(gpu_scaler.scale(), cpu_scaler.scale());
  }
  EXPECT_EQ(gpu_scaler.skipped_steps(), 1);
  EXPECT_EQ(gpu_a.applied_steps(), 8);
  EXPECT_EQ(gpu_b.applied_steps(), 7);
  for (std::size_t i = 0; i < 3; ++i) {
    const Tensor<float> x = gpu_a.master(i).to(Device::cpu());
    ASSERT_EQ(std::memcmp(x.data(), cpu_a.master(i).data(), x.bytes()), 0);
  }
  for (std::size_t i = 0; i < 2; ++i) {
    const Tensor<float> x = gpu_b.master(i).to(Device::cpu());
    ASSERT_EQ(std::memcmp(x.data(), cpu_b.master(i).data(), x.bytes()), 0);
  }
}

TEST(DeviceOptim, ScaleMultipliesInPlaceWithoutSync) {
  MIXPREC_SKIP_WITHOUT_GPU();
  amp::GradScalerOptions so;
  so.init_scale = 1024;
  amp::DeviceGradScaler scaler(so);
  Tensor<half> h(Shape{5});
  const float values[5] = {1.0f, -0.5f, 3e-7f, 100.0f, 70.0f};
  for (int i = 0; i < 5; ++i) h.at(i) = from_float<half>(values[i]);
  Tensor<half> d = h.to(Device::cuda(0));
  scaler.scale(d);
  const Tensor<half> out = d.to(Device::cpu());
  for (int i = 0; i < 5; ++i) {
    const float want = to_float(h.at(i)) * 1024.0f;  // 70 * 1024 overflows fp16: inf
    EXPECT_EQ(to_bits(out.at(i)), to_bits(from_float<half>(want))) << i;
  }
  // The device pointer is what a loss kernel reads.
  float s = 0;
  ASSERT_EQ(cudaMemcpy(&s, scaler.scale_data(), sizeof s, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(s, 1024.0f);
}

TEST(DeviceOptim, MisuseIsAClearError) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Model<half> m({16});
  optim::AdamW host(m.params(false)), device(m.params(true));
  amp::GradScaler host_scaler;
  amp::DeviceGradScaler device_scaler;
  test::expect_error([&] { host_scaler.step(device); }, {"GradScaler", "cuda:0", "DeviceGradScaler"});
  // The refused call left no record behind.
  test::expect_error([&] { host_scaler.update(); }, {"GradScaler::update", "no unscale() or step()"});
  test::expect_error([&] { device_scaler.step(host); }, {"DeviceGradScaler", "cpu", "amp::GradScaler"});
  test::expect_error([&] { device.apply(); }, {"AdamW::apply", "cuda:0"});
  // Parameters of one optimizer on two devices.
  test::expect_error([&] { optim::AdamW mixed({{"w", m.hw[0], m.dg[0]}}); }, {"AdamW", "\"w\"", "cpu", "cuda:0"});
  test::expect_error([&] { device.add_param_group({{"host", m.hw[0], m.hg[0]}}, {}); },
                     {"AdamW", "\"host\"", "one device", "cuda:0"});
  test::expect_error([&] { device_scaler.clip_grad_norm(device, 1.0); }, {"DeviceGradScaler::clip_grad_norm",
                                                                         "no unscale()"});
  test::expect_error([&] { device_scaler.step(device, -1.0); }, {"DeviceGradScaler", "max_norm = -1"});
  test::expect_error([&] { device_scaler.update(); }, {"DeviceGradScaler::update", "no unscale() or step()"});
  EXPECT_EQ(device.num_params(), 1u);  // nothing was added by the refused group
}

}  // namespace
}  // namespace mixprec
