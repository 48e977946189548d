// SPDX-License-Identifier: Apache-2.0
// The audit's faults on the device path (issue 15): one optimizer's checks
// on two streams, a launch that fails mid-step, subnormals against the CPU,
// the norm's summation order on any GPU, buffers freed under the optimizer,
// an unusable lr reaching the kernel, and counters at their limits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "check_order.hpp"
#include "gpu_skip.hpp"
#include "state_bits.hpp"
#include "mixprec/cuda/backend.cuh"
#include "mixprec/mixprec.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::expect_error;
using test::state_bits;

template <class T>
std::vector<std::uint16_t> host_bits(const TensorRef& t) {
  std::vector<std::uint16_t> out(t.bytes() / 2);
  detail::copy_raw(out.data(), Device::cpu(), t.data(), t.device(), t.bytes());
  return out;
}

// --- item 3: one optimizer checked on two streams -----------------------------

TEST(ReliabilityGpu, ChecksOnTwoStreamsAreOrderedAndFindEveryInjectedInf) {
  MIXPREC_SKIP_WITHOUT_GPU();
  test::OwnedStream a, b;
  const std::vector<std::int64_t> sizes = {3 * 65536 + 17, 300, 5};
  std::vector<Tensor<half>> w, g;
  std::vector<optim::Param> params;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    Tensor<half> hw({sizes[i]}), hg({sizes[i]});
    fill_normal(hw, 0, 1, 1 + i);
    fill_normal(hg, 0, 1, 10 + i);
    w.push_back(hw.to(Device::cuda(0)));
    g.push_back(hg.to(Device::cuda(0)));
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) params.push_back({"p" + std::to_string(i), w[i], g[i]});
  optim::AdamW opt(params);
  // The values to write, in pinned memory: an inf and, to restore, the
  // element's own bits.
  half* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, 2 * sizeof(half)), cudaSuccess);
  std::mt19937_64 rng(7);
  int found = 0;
  for (int it = 0; it < 1000; ++it) {
    const std::size_t t = rng() % sizes.size();
    const std::int64_t e = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(sizes[t]));
    half* where = g[t].data() + e;
    pinned[0] = from_float<half>(it % 3 == 0 ? NAN : INFINITY);
    ASSERT_EQ(cudaMemcpyAsync(&pinned[1], where, sizeof(half), cudaMemcpyDeviceToHost, a.s), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(where, &pinned[0], sizeof(half), cudaMemcpyHostToDevice, a.s), cudaSuccess);
    opt.launch_check(a.s);  // on A, after the write
    opt.launch_check(b.s);  // on B: must wait for A's work, so it sees the inf
    const optim::GradStats st = opt.read_check(b.s);
    ASSERT_TRUE(st.any_nonfinite()) << "iteration " << it << ": the check on the second stream missed it";
    for (std::size_t k = 0; k < sizes.size(); ++k) ASSERT_EQ(st.nonfinite[k] != 0, k == t) << it;
    found += 1;
    // Restore on A; the next check on B sees a clean list.
    ASSERT_EQ(cudaMemcpyAsync(where, &pinned[1], sizeof(half), cudaMemcpyHostToDevice, a.s), cudaSuccess);
    opt.launch_check(b.s);
    ASSERT_FALSE(opt.read_check(b.s).any_nonfinite()) << "iteration " << it;
  }
  EXPECT_EQ(found, 1000);
  ASSERT_EQ(cudaStreamSynchronize(a.s), cudaSuccess);
  ASSERT_EQ(cudaFreeHost(pinned), cudaSuccess);
}

// --- item 7: a launch that fails mid-step ---------------------------------------

// The real backend, with plans whose step() throws while armed: what a
// failed kernel launch does (nothing is queued).
struct FailingPlan final : optim::DevicePlan {
  std::unique_ptr<optim::DevicePlan> real;
  bool* armed;
  FailingPlan(std::unique_ptr<optim::DevicePlan> r, bool* a) : real(std::move(r)), armed(a) {}
  void set_params(const std::vector<optim::DeviceParam>& p) override { real->set_params(p); }
  void check(stream_t s, std::uint64_t* h) override { real->check(s, h); }
  const int* found_inf() const override { return real->found_inf(); }
  const double* total_sum_squares() const override { return real->total_sum_squares(); }
  const double* sum_squares() const override { return real->sum_squares(); }
  const int* nonfinite() const override { return real->nonfinite(); }
  void read_check(std::vector<double>& s, std::vector<int>& n, stream_t st) const override {
    real->read_check(s, n, st);
  }
  void step(const char* kernel, const void* hypers, std::size_t count, std::size_t bytes,
            const optim::LRSchedule& sch, const optim::DeviceStepInputs& in, stream_t st) override {
    if (*armed) detail::throw_error("step_kernel: launch failed (injected)");
    real->step(kernel, hypers, count, bytes, sch, in, st);
  }
};
struct FailingBackend final : optim::DeviceBackend {
  optim::DeviceBackend& real = cuda::backend();
  bool armed = false;
  std::unique_ptr<optim::DevicePlan> make_plan(const std::vector<optim::DeviceParam>& p) override {
    return std::make_unique<FailingPlan>(real.make_plan(p), &armed);
  }
  void to_float(const TensorRef& s, float* d, stream_t st) override { real.to_float(s, d, st); }
  void copy_to_host_async(void* h, const void* d, std::size_t n, stream_t st) override {
    real.copy_to_host_async(h, d, n, st);
  }
  void* alloc_pinned(std::size_t n) override { return real.alloc_pinned(n); }
  void free_pinned(void* p) noexcept override { real.free_pinned(p); }
  void synchronize(stream_t s) override { real.synchronize(s); }
  bool idle(stream_t s) override { return real.idle(s); }
  void order_after(stream_t p, stream_t n, void** e) override { real.order_after(p, n, e); }
  void destroy_event(void* e) noexcept override { real.destroy_event(e); }
  bool capturing(stream_t s) override { return real.capturing(s); }
  bool is_device_memory(const void* p, std::size_t n, Device d) override { return real.is_device_memory(p, n, d); }
};

// Three groups of fp16 parameters on the device, and their gradients for step s.
struct ThreeGroups {
  std::vector<Tensor<half>> w, g;
  explicit ThreeGroups(std::uint64_t seed) {
    const std::int64_t sizes[] = {70000, 129, 3};
    for (int i = 0; i < 3; ++i) {
      Tensor<half> hw({sizes[i]});
      fill_normal(hw, 0, 1, seed + i);
      w.push_back(hw.to(Device::cuda(0)));
      g.push_back(Tensor<half>({sizes[i]}, Device::cuda(0)));
    }
  }
  void gradients(int s) {
    for (int i = 0; i < 3; ++i) {
      Tensor<half> hg(g[i].shape());
      fill_normal(hg, 0, 100, 100 * s + i);
      copy(hg, g[i]);
    }
  }
  std::unique_ptr<optim::AdamW> make() {
    optim::AdamWOptions o;
    auto opt = std::make_unique<optim::AdamW>(std::vector<optim::Param>{{"a", w[0], g[0]}}, o);
    o.lr = 3e-3;
    o.amsgrad = true;
    opt->add_param_group({{"b", w[1], g[1]}}, o);
    o.lr = 1e-4;
    o.weight_decay = 0;
    opt->add_param_group({{"c", w[2], g[2]}}, o);
    opt->set_schedule(optim::LRSchedule::cosine(50));
    return opt;
  }
};

TEST(ReliabilityGpu, AStepWhoseLaunchFailsChangesNothingAndTheRetryIsExact) {
  MIXPREC_SKIP_WITHOUT_GPU();
  FailingBackend failing;
  optim::install_device_backend(&failing);
  struct Restore {
    ~Restore() { optim::install_device_backend(&cuda::backend()); }
  } restore;
  ThreeGroups m(1), ref(1);
  auto opt = m.make();
  auto want = ref.make();
  amp::DeviceGradScaler scaler, ref_scaler;
  for (int s = 0; s < 6; ++s) {
    m.gradients(s);
    ref.gradients(s);
    if (s == 3) {  // this step fails once, then is retried
      const std::vector<std::uint32_t> before = state_bits(*opt);
      const std::vector<std::uint16_t> wbefore = host_bits<half>(m.w[1]);
      failing.armed = true;
      expect_error([&] { scaler.step(*opt, 1.0); }, {"injected"});
      failing.armed = false;
      EXPECT_EQ(state_bits(*opt), before) << "state after the failed step";
      EXPECT_EQ(host_bits<half>(m.w[1]), wbefore);
      EXPECT_TRUE(scaler.in_iteration());
      scaler.step(*opt);  // unscaled and clipped already: the retry steps
    } else {
      scaler.step(*opt, 1.0);
    }
    scaler.update();
    ref_scaler.step(*want, 1.0);
    ref_scaler.update();
  }
  EXPECT_EQ(state_bits(*opt), state_bits(*want));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(host_bits<half>(m.w[i]), host_bits<half>(ref.w[i])) << i;
  EXPECT_EQ(scaler.applied_steps(), 6);
}

int g_device_allocations_left = -1;
bool fail_device_after_n(std::size_t, Device d) {
  if (!d.is_cuda() || g_device_allocations_left < 0) return false;
  if (g_device_allocations_left == 0) return true;
  --g_device_allocations_left;
  return false;
}

TEST(ReliabilityGpu, AFailedStateAllocationMidStepChangesNothing) {
  MIXPREC_SKIP_WITHOUT_GPU();
  ThreeGroups m(2);
  auto opt = m.make();
  amp::DeviceGradScaler scaler;
  m.gradients(0);
  scaler.step(*opt);
  scaler.update();
  // amsgrad switched on for group 0: its max_exp_avg_sq is made at the next step.
  optim::AdamWOptions o = opt->options(0);
  o.amsgrad = true;
  opt->set_options(0, o);
  m.gradients(1);
  const std::vector<std::uint32_t> before = state_bits(*opt);
  g_device_allocations_left = 0;
  detail::allocation_fault_hook().store(&fail_device_after_n);
  expect_error([&] { scaler.step(*opt); }, {"injected"});
  detail::allocation_fault_hook().store(nullptr);
  g_device_allocations_left = -1;
  EXPECT_EQ(state_bits(*opt), before);
  scaler.step(*opt);
  scaler.update();
  EXPECT_EQ(opt->step_count(0), 2);
  EXPECT_EQ(opt->save_state().params[0].state[2].has_value(), true);
}

// --- item 4: subnormals against the CPU ---------------------------------------------

TEST(ReliabilityGpu, SubnormalBf16RunMatchesTheHostBitForBit) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Tensor<bfloat16> w({256}), g({256});
  for (std::int64_t e = 0; e < w.numel(); ++e) {
    w.at(e) = from_float<bfloat16>(std::ldexp(1.0f + static_cast<float>(e % 7) / 8.0f, -126 - static_cast<int>(e % 9)));
    g.at(e) = from_float<bfloat16>(std::ldexp(1.0f + static_cast<float>(e % 5) / 4.0f, -127 - static_cast<int>(e % 6)));
  }
  Tensor<bfloat16> dg = g.to(Device::cuda(0));
  for (int kind = 0; kind < 2; ++kind) {
    Tensor<bfloat16> hw = w.to(Device::cpu());
    Tensor<bfloat16> dw2 = w.to(Device::cuda(0));
    std::unique_ptr<optim::Optimizer> host, dev;
    if (kind == 0) {
      optim::SGDOptions o;
      o.lr = 0.5;
      o.momentum = 0.9;
      host = std::make_unique<optim::SGD>(std::vector<optim::Param>{{"w", hw, g}}, o);
      dev = std::make_unique<optim::SGD>(std::vector<optim::Param>{{"w", dw2, dg}}, o);
    } else {
      optim::AdamOptions o;
      o.eps = 1e-40;  // a subnormal eps: still > 0 as a float
      host = std::make_unique<optim::Adam>(std::vector<optim::Param>{{"w", hw, g}}, o);
      dev = std::make_unique<optim::Adam>(std::vector<optim::Param>{{"w", dw2, dg}}, o);
    }
    amp::GradScaler hs(amp::GradScalerOptions::for_dtype(DType::bfloat16));
    amp::DeviceGradScaler ds(amp::GradScalerOptions::for_dtype(DType::bfloat16));
    for (int s = 0; s < 5; ++s) {
      hs.step(*host);
      hs.update();
      ds.step(*dev);
      ds.update();
    }
    EXPECT_EQ(state_bits(*dev), state_bits(*host)) << kind;
    EXPECT_EQ(host_bits<bfloat16>(dw2), host_bits<bfloat16>(hw)) << kind;
    // Not vacuous: subnormal values in the state (SGD: masters and momenta;
    // Adam: its normalised step moves masters far from 0, exp_avg stays tiny).
    std::size_t subnormal = 0;
    const optim::OptimizerState st = host->save_state();
    auto count = [&](const std::vector<float>& v) {
      for (float x : v) subnormal += x != 0.0f && std::fabs(x) < std::numeric_limits<float>::min();
    };
    count(st.params[0].master);
    for (const auto& t : st.params[0].state) {
      if (t) count(*t);
    }
    EXPECT_GT(subnormal, 50u) << kind;
  }
}

// --- item 10: the norm's summation order ------------------------------------------

// The GPU's sums against the host emulation of the order grad_check.cuh
// fixes (check_order.hpp): nothing in that order depends on the GPU it
// runs on, only on the list (its slices).
TEST(ReliabilityGpu, TheNormsSummationOrderIsFixedByTheListNotTheGpu) {
  MIXPREC_SKIP_WITHOUT_GPU();
  EXPECT_EQ(cuda::GradCheck::slices_for(1), 32);
  EXPECT_EQ(cuda::GradCheck::slices_for(33), 16);
  EXPECT_EQ(cuda::GradCheck::slices_for(600), 1);
  // A small model (few chunks: sliced) and a larger one (one slice per chunk).
  for (const std::vector<std::int64_t>& sizes :
       {std::vector<std::int64_t>{3 * 65536 + 100, 1000, 7}, std::vector<std::int64_t>{600 * 65536, 64}}) {
    std::vector<Tensor<half>> host, dev;
    std::vector<TensorRef> refs;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      host.emplace_back(Shape{sizes[i]});
      fill_normal(host.back(), 0, 3, 40 + i);
      dev.push_back(host.back().to(Device::cuda(0)));
      refs.push_back(dev.back());
    }
    cuda::TensorList list(refs);
    cuda::GradCheck check(list);
    check.launch(list);
    const cuda::GradCheck::Host got = check.read();
    double total = 0;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      std::vector<float> x(static_cast<std::size_t>(sizes[i]));
      for (std::int64_t e = 0; e < sizes[i]; ++e) x[static_cast<std::size_t>(e)] = to_float(host[i].at(e));
      const double want = test::emulate_sum_squares(x, check.slices(), 8);  // fp16, 16-byte aligned
      EXPECT_EQ(std::memcmp(&got.sum_squares[i], &want, 8), 0)
          << "tensor " << i << ": " << got.sum_squares[i] << " vs emulated " << want;
      total += want;
    }
    EXPECT_EQ(got.total_sum_squares, total);
  }
}

// --- item 12: buffers freed under the optimizer --------------------------------------

TEST(ReliabilityGpu, AFreedGradientIsAClearErrorAndRebindFixesIt) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Tensor<half> hw({1000});
  fill_normal(hw, 0, 1, 3);
  Tensor<half> w = hw.to(Device::cuda(0));
  half* raw = nullptr;
  ASSERT_EQ(cudaMalloc(&raw, 1000 * sizeof(half)), cudaSuccess);
  ASSERT_EQ(cudaMemset(raw, 0, 1000 * sizeof(half)), cudaSuccess);
  optim::AdamW opt({{"w", w, TensorView<half>(raw, {1000}, Device::cuda(0))}});
  amp::DeviceGradScaler scaler;
  scaler.step(opt);
  scaler.update();
  ASSERT_EQ(cudaFree(raw), cudaSuccess);  // the trainer reallocates its gradient ...
  const std::vector<std::uint32_t> before = state_bits(opt);
  expect_error([&] { opt.check_buffers(); }, {"\"w\"", "gradient", "no longer device memory", "rebind"});
  opt.set_buffer_checks(true);  // every eager step checks first
  expect_error([&] { opt.step(); }, {"\"w\"", "no longer device memory"});
  expect_error([&] { scaler.step(opt); }, {"\"w\"", "no longer device memory"});
  EXPECT_FALSE(scaler.in_iteration());  // refused before the check: no record
  EXPECT_EQ(state_bits(opt), before);
  Tensor<half> g2({1000}, Device::cuda(0));  // ... and says so
  fill(g2, 0.5f);
  // A rebound buffer is checked when the lists are made again, without
  // set_buffer_checks: the next launch after rebind() refuses a dead one.
  opt.set_buffer_checks(false);
  opt.rebind(0, w, g2);
  opt.check_buffers();
  scaler.step(opt);
  scaler.update();
  EXPECT_EQ(opt.step_count(0), 2);
}

// --- item 1: an unusable lr reaching the kernel (the low-level API: the
// optimizers' validation never lets one through) ------------------------------

TEST(ReliabilityGpu, TheKernelSkipsAStepWithANonFiniteLrWhole) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Tensor<half> hw({5000}), hg({5000});
  fill_normal(hw, 0, 1, 1);
  fill_normal(hg, 0, 1, 2);
  Tensor<half> w = hw.to(Device::cuda(0)), g = hg.to(Device::cuda(0)), w2 = hw.to(Device::cuda(0)),
               g2 = hg.to(Device::cuda(0));
  Tensor<float> hm({5000});
  convert(hw, hm);
  Tensor<float> m = hm.to(Device::cuda(0)), m2 = hm.to(Device::cuda(0));
  Tensor<float> s0({5000}, Device::cuda(0)), s1({5000}, Device::cuda(0)), s2({5000}, Device::cuda(0)),
      s3({5000}, Device::cuda(0));
  for (Tensor<float>* t : {&s0, &s1, &s2, &s3}) fill(*t, 0.0f);
  Buffer counts(4 * sizeof(std::int64_t), Device::cuda(0));  // steps x2, applied, nonfinite-lr
  ASSERT_EQ(cudaMemset(counts.data(), 0, counts.bytes()), cudaSuccess);
  auto* c = static_cast<std::int64_t*>(counts.data());
  cuda::TensorList list({g, g2});
  cuda::ParamList params({{w.data(), DType::float16, m.data(), {s0.data(), s1.data(), nullptr}, c, 0},
                          {w2.data(), DType::float16, m2.data(), {s2.data(), s3.data(), nullptr}, c + 1, 1}});
  cuda::GradCheck check(list);
  check.launch(list);
  Buffer one(sizeof(float), Device::cuda(0));
  const float f1 = 1.0f;
  ASSERT_EQ(cudaMemcpy(one.data(), &f1, 4, cudaMemcpyHostToDevice), cudaSuccess);
  optim::DeviceStepInputs in;
  in.found_inf = check.found_inf();
  in.scale = static_cast<const float*>(one.data());
  in.applied_steps = c + 2;
  in.nonfinite_lr_steps = c + 3;
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), 1e39}) {
    optim::AdamHyper good, wrong;
    wrong.lr = bad;  // group 1 only: group 0 must not move either
    cuda::launch_step(list, params, std::vector<optim::AdamHyper>{good, wrong}, optim::LRSchedule::constant(), in);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(std::memcmp(m.to(Device::cpu()).data(), hm.data(), hm.bytes()), 0) << bad;
    EXPECT_EQ(std::memcmp(m2.to(Device::cpu()).data(), hm.data(), hm.bytes()), 0) << bad;
    EXPECT_EQ(std::memcmp(w.to(Device::cpu()).data(), hw.data(), hw.bytes()), 0) << bad;
  }
  std::int64_t host[4];
  ASSERT_EQ(cudaMemcpy(host, c, sizeof host, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(host[0], 0);
  EXPECT_EQ(host[1], 0);
  EXPECT_EQ(host[2], 0);
  EXPECT_EQ(host[3], 3);
  // And a usable lr steps both groups.
  cuda::launch_step(list, params, std::vector<optim::AdamHyper>{optim::AdamHyper{}, optim::AdamHyper{}},
                    optim::LRSchedule::constant(), in);
  ASSERT_EQ(cudaMemcpy(host, c, sizeof host, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(host[0], 1);
  EXPECT_EQ(host[1], 1);
  EXPECT_EQ(host[2], 1);
  EXPECT_NE(std::memcmp(m.to(Device::cpu()).data(), hm.data(), hm.bytes()), 0);
}

// --- item 6: the device scaler's counters at their limits ------------------------------

TEST(ReliabilityGpu, DeviceCountersSaturate) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Tensor<half> hw({64});
  fill(hw, 1.0f);
  Tensor<half> w = hw.to(Device::cuda(0)), g({64}, Device::cuda(0));
  fill(g, INFINITY);
  optim::SGD opt({{"w", w, g}});
  amp::GradScalerOptions so;
  so.init_scale = 1.0;
  so.min_scale = 1.0;
  amp::DeviceGradScaler scaler(so);
  amp::ScalerState st = scaler.state();
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  st.min_scale_hits = std::numeric_limits<std::int32_t>::max();
  st.skip_streak = big;
  scaler.load_state(st, big, big);
  scaler.step(opt);
  scaler.update();
  const amp::ScalerState after = scaler.state();
  EXPECT_EQ(after.min_scale_hits, std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(after.skip_streak, big);
  EXPECT_EQ(scaler.skipped_steps(), big);
  EXPECT_EQ(scaler.applied_steps(), big);
  optim::OptimizerState os = opt.save_state();
  os.params[0].step = big;
  os.applied_steps = big;
  opt.load_state(os);
  fill(g, 1.0f);
  scaler.step(opt);
  scaler.update();
  EXPECT_EQ(opt.step_count(0), big);
  EXPECT_EQ(opt.applied_steps(), big);
}

// --- review: reads and the lazy give-up error ----------------------------------

TEST(ReliabilityGpu, ReadsSeeEveryStepQueuedOnAnotherStream) {
  // The scaler launches on its own non-blocking stream; the optimizer's
  // synchronising reads run on its stream (the default): they must wait
  // for the steps queued so far (they returned step k - 1 before).
  MIXPREC_SKIP_WITHOUT_GPU();
  Stream stream(Device::cuda(0));
  Tensor<half> w({std::int64_t{1} << 26}, Device::cuda(0)), g({std::int64_t{1} << 26}, Device::cuda(0));
  fill(w, 1.0f);
  fill(g, 0.5f);
  optim::AdamW opt({{"w", w, g}});
  amp::DeviceGradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float16), Device::cuda(0), stream.get());
  for (int k = 1; k <= 20; ++k) {
    scaler.step(opt);
    scaler.update();
    ASSERT_EQ(opt.applied_steps(), k);
    ASSERT_EQ(opt.step_count(0), k);
  }
  EXPECT_EQ(opt.save_state().params[0].step, 20);
}

TEST(ReliabilityGpu, EveryStreakThatGivesUpIsRaisedEvenWhenReadLate) {
  MIXPREC_SKIP_WITHOUT_GPU();
  Stream stream(Device::cuda(0));
  Tensor<half> w({64}, Device::cuda(0)), g({64}, Device::cuda(0));
  fill(w, 1.0f);
  optim::SGD opt({{"w", w, g}});
  amp::GradScalerOptions so;
  so.max_consecutive_skips = 3;
  amp::DeviceGradScaler scaler(so, Device::cuda(0), stream.get());
  int raised = 0;
  auto iteration = [&](float value) {
    fill(g, value, stream.get());  // on the scaler's stream: ordered with its check
    scaler.step(opt);
    try {
      scaler.update();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("3 consecutive iterations skipped"), std::string::npos) << e.what();
      raised += 1;
    }
  };
  // Two streaks that reach the limit, one that does not, no read between.
  for (float v : {NAN, NAN, NAN, NAN, 1.0f, NAN, NAN, 1.0f, NAN, NAN, NAN, 1.0f}) iteration(v);
  stream.synchronize();
  try {
    scaler.check_errors();
  } catch (const Error&) {
    raised += 1;
  }
  try {
    scaler.check_errors();  // each streak once
  } catch (const Error&) {
    raised += 1;
  }
  EXPECT_EQ(raised, 2);
  EXPECT_EQ(scaler.skipped_steps(), 9);
}

}  // namespace
}  // namespace mixprec
