// SPDX-License-Identifier: Apache-2.0
// The faults an outside audit found on the host path (issue 15), each with
// the test that exposed it: schedules and options that made the lr or a
// coefficient overflow, corrupt checkpoint values, counters that wrapped,
// half-applied steps after an exception, the caller's FPU mode, eps = 0,
// buffers that move, and the anchor scenarios of the PyTorch / apex suites
// (updates smaller than an fp16 ulp, gradients changed between unscale and
// step, a run that keeps overflowing).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "mixprec/io/checkpoint.hpp"
#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::expect_error;
using test::state_bits;

template <class T>
std::vector<std::uint16_t> weight_bits(const Tensor<T>& w) {
  std::vector<std::uint16_t> out(static_cast<std::size_t>(w.numel()));
  std::memcpy(out.data(), w.data(), out.size() * 2);
  return out;
}

// --- 1. the lr that reaches the update --------------------------------------

TEST(Reliability, ScheduleThatGrowsTheLrIsRefused) {
  // Before: step_decay(1, 10) was accepted; 10^k overflowed after ~309
  // steps and every master went NaN while each step counted as applied.
  expect_error([] { (void)optim::LRSchedule::step_decay(1, 10.0); }, {"gamma = 10", "(0, 1]"});
  expect_error([] { (void)optim::LRSchedule::step_decay(1, 1.0000001); }, {"gamma"});
  (void)optim::LRSchedule::step_decay(1, 1.0);  // a constant lr: allowed
  Tensor<half> w({8}), g({8});
  fill(w, 1.0f);
  optim::SGD opt({{"w", w, g}});
  optim::LRSchedule s = optim::LRSchedule::step_decay(1, 0.5);
  s.gamma = 3.0;  // assembled field by field
  expect_error([&] { opt.set_schedule(s); }, {"gamma = 3"});
  EXPECT_EQ(opt.schedule().kind, optim::LRSchedule::Kind::constant);  // unchanged
}

TEST(Reliability, EveryScheduledLrStaysAtOrBelowTheBaseLr) {
  // The contract that makes a non-finite scheduled lr impossible: every
  // valid schedule's factor lies in [0, 1] at every step, far past its end.
  const optim::LRSchedule schedules[] = {
      optim::LRSchedule::constant(), optim::LRSchedule::linear_warmup(10, 1e-3),
      optim::LRSchedule::cosine(100, 0.1), optim::LRSchedule::cosine(7), optim::LRSchedule::step_decay(3, 0.5),
      optim::LRSchedule::step_decay(1, 1e-300)};
  for (const optim::LRSchedule& s : schedules) {
    for (std::int64_t k : {std::int64_t{0}, std::int64_t{1}, std::int64_t{99}, std::int64_t{100000},
                           std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::max()}) {
      const double f = s.factor(k);
      EXPECT_TRUE(f >= 0.0 && f <= 1.0) << static_cast<int>(s.kind) << " k=" << k << " factor " << f;
    }
  }
}

TEST(Reliability, OptionsWhoseStepOverflowsAFloatAreRefused) {
  Tensor<half> w({8}), g({8});
  fill(w, 1.0f);
  // lr beyond FLT_MAX: float(lr) = inf in the update.
  optim::SGDOptions so;
  so.lr = 1e39;
  expect_error([&] { optim::SGD opt({{"w", w, g}}, so); }, {"SGD", "lr = 1e+39", "float"});
  // Adam's first step size lr / (1 - beta1): 1e30 / 2^-52 overflows a float.
  optim::AdamOptions ao;
  ao.lr = 1e30;
  ao.betas = {1.0 - std::ldexp(1.0, -52), 0.999};
  expect_error([&] { optim::Adam opt({{"w", w, g}}, ao); }, {"Adam", "lr / (1 - betas[0])"});
  // AdamW's decay 1 - lr * weight_decay.
  optim::AdamWOptions wo;
  wo.lr = 1e20;
  wo.weight_decay = 1e20;
  expect_error([&] { optim::AdamW opt({{"w", w, g}}, wo); }, {"AdamW", "lr * weight_decay"});
  // set_lr goes through the same checks, and a refused one changes nothing.
  optim::Adam opt({{"w", w, g}}, optim::AdamOptions{});
  expect_error([&] { opt.set_lr(0, 1e39); }, {"lr = 1e+39"});
  EXPECT_EQ(opt.lr(0), 1e-3);
  optim::AdamOptions near_one;
  near_one.betas = {1.0 - std::ldexp(1.0, -52), 0.999};
  near_one.lr = 1e-20;
  optim::Adam tight({{"w", w, g}}, near_one);
  expect_error([&] { tight.set_lr(0, 1e30); }, {"lr / (1 - betas[0])"});
  EXPECT_EQ(tight.lr(0), 1e-20);
}

// --- 2. corrupt checkpoint values -------------------------------------------

TEST(Reliability, CorruptStateValuesAreRefusedNamingTensorAndIndex) {
  Tensor<half> w({16}), g({16});
  fill_normal(w, 0, 1, 1);
  optim::AdamOptions o;
  o.amsgrad = true;
  optim::Adam opt({{"w", w, g}}, o);
  amp::GradScaler scaler;
  for (int s = 0; s < 3; ++s) {
    fill_normal(g, 0, 1000, 10 + s);
    ASSERT_TRUE(scaler.step(opt));
    scaler.update();
  }
  const optim::OptimizerState good = opt.save_state();
  const std::vector<std::uint32_t> before = state_bits(opt);
  const std::vector<std::uint16_t> wbefore = weight_bits(w);
  struct Bad {
    const char* what;
    void (*corrupt)(optim::OptimizerState&);
    std::vector<const char*> words;
  };
  const Bad cases[] = {
      {"negative second moment", [](optim::OptimizerState& s) { (*s.params[0].state[1])[3] = -1.0f; },
       {"exp_avg_sq[3] = -1", ">= 0"}},
      {"NaN master", [](optim::OptimizerState& s) { s.params[0].master[5] = NAN; }, {"master[5]", "finite"}},
      {"inf first moment", [](optim::OptimizerState& s) { (*s.params[0].state[0])[0] = -INFINITY; },
       {"exp_avg[0]", "finite"}},
      {"max below the moment",
       [](optim::OptimizerState& s) {
         (*s.params[0].state[2])[7] = 0.5f * (*s.params[0].state[1])[7];
       },
       {"max_exp_avg_sq[7]", "exp_avg_sq[7]"}},
      {"NaN max", [](optim::OptimizerState& s) { (*s.params[0].state[2])[2] = NAN; }, {"max_exp_avg_sq[2]"}},
  };
  for (const Bad& c : cases) {
    SCOPED_TRACE(c.what);
    optim::OptimizerState bad = good;
    c.corrupt(bad);
    try {
      opt.load_state(bad);
      ADD_FAILURE() << "loaded";
    } catch (const Error& e) {
      for (const char* word : c.words) EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("\"w\""), std::string::npos) << e.what();
    }
    EXPECT_EQ(state_bits(opt), before);
    EXPECT_EQ(weight_bits(w), wbefore);
  }
  // RMSprop's square_avg, and a NaN weight for load_weights.
  Tensor<float> x({4}), gx({4});
  fill(x, 1.0f);
  fill(gx, 1.0f);
  optim::RMSprop rms({{"x", x, gx}});
  amp::GradScaler s32(amp::GradScalerOptions::for_dtype(DType::float32));
  ASSERT_TRUE(s32.step(rms));
  s32.update();
  optim::OptimizerState r = rms.save_state();
  (*r.params[0].state[0])[1] = -0.25f;
  expect_error([&] { rms.load_state(r); }, {"RMSprop", "square_avg[1] = -0.25"});
  expect_error([&] { rms.load_weights({{1.0f, 2.0f, NAN, 4.0f}}); }, {"load_weights", "weight[2]", "finite"});
  EXPECT_EQ(x.at(2), rms.master(0).at(2));
}

TEST(Reliability, CorruptValuesInACheckpointFileAreRefused) {
  Tensor<half> w({16}), g({16});
  fill_normal(w, 0, 1, 1);
  optim::AdamW opt({{"w", w, g}});
  amp::GradScaler scaler;
  fill_normal(g, 0, 1000, 2);
  ASSERT_TRUE(scaler.step(opt));
  scaler.update();
  const std::string path = test::temp_path("reliability_corrupt.safetensors");
  io::save_checkpoint(path, opt, scaler);
  // Rewrite the file with one moment negative, through the format layer.
  const io::SafetensorsFile f = io::SafetensorsFile::read(path);
  io::SafetensorsWriter out;
  std::vector<std::vector<std::uint8_t>> bytes;
  for (const io::TensorInfo& t : f.tensors()) bytes.emplace_back(f.data(t), f.data(t) + t.nbytes());
  std::size_t k = 0;
  for (const io::TensorInfo& t : f.tensors()) {
    std::vector<std::uint8_t>& b = bytes[k++];
    if (t.name.find("exp_avg_sq") != std::string::npos) {
      const float minus_one = -1.0f;
      std::memcpy(b.data() + 4 * 9, &minus_one, 4);
    }
    out.add(t.name, t.dtype, t.shape, b.data(), b.size());
  }
  for (const auto& kv : f.metadata()) out.set_metadata(kv.first, kv.second);
  out.write(path);
  optim::AdamW other({{"w", w, g}});
  const std::vector<std::uint32_t> before = state_bits(other);
  amp::GradScaler s2;
  expect_error([&] { io::load_checkpoint(path, other, s2); }, {"exp_avg_sq[9] = -1", "\"w\""});
  EXPECT_EQ(state_bits(other), before);
  std::remove(path.c_str());
}

TEST(Reliability, WeightsBeyondFloatRangeAreRefused) {
  // An F64 weight file with a value no float can hold: the conversion
  // would be undefined; it is refused with the tensor and the index.
  Tensor<half> w({4}), g({4});
  fill(w, 1.0f);
  optim::SGD opt({{"w", w, g}});
  const std::string path = test::temp_path("reliability_f64.safetensors");
  const double values[4] = {0.5, -2.0, 1e300, 3.0};
  io::SafetensorsWriter out;
  out.add("w", std::vector<std::int64_t>{4}, values, 4);
  out.write(path);
  const std::vector<std::uint32_t> before = state_bits(opt);
  expect_error([&] { io::load_weights(path, opt); }, {"\"w\"[2] = 1e+300", "finite as a float"});
  EXPECT_EQ(state_bits(opt), before);
  EXPECT_EQ(to_float(w.at(0)), 1.0f);
  std::remove(path.c_str());
}

// --- 5. eps ------------------------------------------------------------------

TEST(Reliability, EpsThatCannotKeepZeroOverZeroFiniteIsRefused) {
  Tensor<half> w({4}), g({4});
  optim::AdamOptions a;
  a.eps = 0.0;
  expect_error([&] { optim::Adam opt({{"w", w, g}}, a); }, {"Adam", "eps = 0", "NaN"});
  a.eps = 1e-50;  // > 0 in double, 0 as a float
  expect_error([&] { optim::Adam opt({{"w", w, g}}, a); }, {"eps = 1e-50"});
  optim::RMSpropOptions r;
  r.eps = 0.0;
  expect_error([&] { optim::RMSprop opt({{"w", w, g}}, r); }, {"RMSprop", "eps = 0"});
  optim::AdamWOptions aw;
  aw.eps = 0.0;
  expect_error([&] { optim::AdamW opt({{"w", w, g}}, aw); }, {"AdamW", "eps = 0"});
}

TEST(Reliability, HalfParametersWithZeroGradientsStayFinite) {
  // fp16 weights, eps = 1e-8 (below fp16's smallest subnormal: it lives in
  // the fp32 arithmetic), gradients exactly zero for 1000 steps.
  Tensor<half> w({64}), g({64});
  fill_normal(w, 0, 1, 3);
  const std::vector<std::uint16_t> start = weight_bits(w);
  fill(g, 0.0f);
  for (int amsgrad = 0; amsgrad < 2; ++amsgrad) {
    optim::AdamOptions o;
    o.amsgrad = amsgrad != 0;
    optim::Adam adam({{"w", w, g}}, o);
    optim::RMSprop rms({{"w2", w, g}});
    amp::GradScaler scaler;
    for (int s = 0; s < 1000; ++s) {
      ASSERT_TRUE(scaler.step(adam));
      scaler.update();
    }
    amp::GradScaler s2;
    for (int s = 0; s < 1000; ++s) {
      ASSERT_TRUE(s2.step(rms));
      s2.update();
    }
    for (std::int64_t e = 0; e < w.numel(); ++e) {
      ASSERT_TRUE(std::isfinite(adam.master(0).at(e))) << e;
      ASSERT_TRUE(std::isfinite(rms.master(0).at(e))) << e;
    }
    EXPECT_EQ(weight_bits(w), start);  // a zero gradient moves nothing
  }
}

// --- 6. counters at their limits ---------------------------------------------

TEST(Reliability, CountersSaturateAndTheStateStillLoads) {
  Tensor<half> w({8}), g({8});
  fill(w, 1.0f);
  optim::SGD opt({{"w", w, g}});
  amp::GradScalerOptions so;
  so.min_scale = 1.0;
  so.init_scale = 1.0;
  amp::GradScaler scaler(so);
  amp::ScalerState st = scaler.state();
  st.min_scale_hits = std::numeric_limits<std::int32_t>::max();
  const std::int64_t big = std::numeric_limits<std::int64_t>::max();
  st.skip_streak = big;
  scaler.load_state(st, big, big);
  fill(g, INFINITY);
  EXPECT_FALSE(scaler.step(opt));
  scaler.update();  // a backoff clamped at min_scale: the hit count stays, the counts stay
  EXPECT_EQ(scaler.state().min_scale_hits, std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(scaler.state().skip_streak, big);
  EXPECT_EQ(scaler.skipped_steps(), big);
  EXPECT_EQ(scaler.state().scale, 1.0f);
  // Step counts: a state at the limit steps without wrapping (UBSan traps
  // a signed overflow here).
  optim::OptimizerState os = opt.save_state();
  os.params[0].step = big;
  os.applied_steps = big;
  opt.load_state(os);
  fill(g, 1.0f);
  EXPECT_TRUE(scaler.step(opt));
  scaler.update();
  EXPECT_EQ(opt.step_count(0), big);
  EXPECT_EQ(opt.applied_steps(), big);
  EXPECT_EQ(scaler.applied_steps(), big);
  EXPECT_EQ(scaler.state().skip_streak, 0);
  // Save and load the whole thing.
  const std::string path = test::temp_path("reliability_limits.safetensors");
  io::save_checkpoint(path, opt, scaler);
  optim::SGD other({{"w", w, g}});
  amp::GradScaler s2(so);
  io::load_checkpoint(path, other, s2);
  EXPECT_EQ(other.step_count(0), big);
  EXPECT_EQ(s2.state().min_scale_hits, std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(s2.applied_steps(), big);
  std::remove(path.c_str());
}

TEST(Reliability, GiveUpAfterKConsecutiveSkips) {
  Tensor<half> w({8}), g({8});
  fill(w, 1.0f);
  optim::AdamW opt({{"w", w, g}});
  amp::GradScalerOptions so;
  so.max_consecutive_skips = 5;
  amp::GradScaler scaler(so);
  expect_error([] {
    amp::GradScalerOptions o;
    o.max_consecutive_skips = -1;
    amp::GradScaler s(o);
  }, {"max_consecutive_skips = -1"});
  fill(g, NAN);
  for (int round = 0; round < 2; ++round) {  // once per streak
    for (int s = 1; s <= 8; ++s) {
      EXPECT_FALSE(scaler.step(opt));
      if (s == 5) {
        expect_error([&] { scaler.update(); }, {"5 consecutive iterations skipped", "max_consecutive_skips"});
        EXPECT_EQ(scaler.state().skip_streak, 5);  // the update completed before the error
      } else {
        scaler.update();
      }
    }
    EXPECT_EQ(scaler.state().skip_streak, 8);
    fill(g, 1.0f);
    EXPECT_TRUE(scaler.step(opt));
    scaler.update();
    EXPECT_EQ(scaler.state().skip_streak, 0);
    fill(g, NAN);
  }
  EXPECT_EQ(scaler.skipped_steps(), 16);
  EXPECT_EQ(opt.step_count(0), 2);
}

// --- 7. an exception mid-step -----------------------------------------------

int g_allocations_left = -1;  // -1: no fault
bool fail_after_n(std::size_t, Device) {
  if (g_allocations_left < 0) return false;
  if (g_allocations_left == 0) return true;
  --g_allocations_left;
  return false;
}

TEST(Reliability, AFailedAllocationMidStepLeavesNothingHalfApplied) {
  for (int fail_at = 0; fail_at < 5; ++fail_at) {  // Adam + amsgrad: 3 params x 3 state tensors
    SCOPED_TRACE("allocation " + std::to_string(fail_at) + " fails");
    Tensor<half> a({33}), ga({33});
    Tensor<bfloat16> b({7}), gb({7});
    Tensor<float> c({5}), gc({5});
    fill_normal(a, 0, 1, 1);
    fill_normal(b, 0, 1, 2);
    fill_normal(c, 0, 1, 3);
    fill_normal(ga, 0, 100, 4);
    fill_normal(gb, 0, 100, 5);
    fill_normal(gc, 0, 100, 6);
    optim::AdamOptions o;
    o.amsgrad = true;
    optim::Adam opt({{"a", a, ga}, {"b", b, gb}, {"c", c, gc}}, o);
    amp::GradScaler scaler;
    const std::vector<std::uint32_t> before = state_bits(opt);
    const std::vector<std::uint16_t> abefore = weight_bits(a);
    g_allocations_left = fail_at;
    detail::allocation_fault_hook().store(&fail_after_n);
    expect_error([&] { scaler.step(opt); }, {"injected"});
    detail::allocation_fault_hook().store(nullptr);
    g_allocations_left = -1;
    // Fully before the step: no state made, counts 0, weights unchanged.
    EXPECT_EQ(state_bits(opt), before);
    EXPECT_EQ(weight_bits(a), abefore);
    EXPECT_EQ(opt.applied_steps(), 0);
    for (std::size_t k = 0; k < 3; ++k) EXPECT_EQ(opt.step_count(k), 0);
    // The retry is the step a run without the fault takes.
    EXPECT_TRUE(scaler.step(opt));
    scaler.update();
    Tensor<half> a2({33});
    Tensor<bfloat16> b2({7});
    Tensor<float> c2({5});
    fill_normal(a2, 0, 1, 1);
    fill_normal(b2, 0, 1, 2);
    fill_normal(c2, 0, 1, 3);
    optim::Adam clean({{"a", a2, ga}, {"b", b2, gb}, {"c", c2, gc}}, o);
    amp::GradScaler s2;
    EXPECT_TRUE(s2.step(clean));
    s2.update();
    EXPECT_EQ(state_bits(opt), state_bits(clean));
    EXPECT_EQ(weight_bits(a), weight_bits(a2));
  }
}

// --- 4. the caller's FPU mode --------------------------------------------------

#if defined(__SSE__)
// A bf16 SGD run whose gradients, momenta and masters are subnormal floats
// (bf16 has float's exponent range: these are real bf16 values). The inputs
// are made in IEEE mode; only the optimizer runs under the caller's `csr`.
std::vector<std::uint32_t> subnormal_run(unsigned csr) {
  Tensor<bfloat16> w({256}), g({256});
  for (std::int64_t e = 0; e < w.numel(); ++e) {
    w.at(e) = from_float<bfloat16>(std::ldexp(1.0f + static_cast<float>(e % 7) / 8.0f, -126 - static_cast<int>(e % 9)));
    g.at(e) = from_float<bfloat16>(std::ldexp(1.0f + static_cast<float>(e % 5) / 4.0f, -127 - static_cast<int>(e % 6)));
  }
  optim::SGDOptions o;
  o.lr = 0.5;
  o.momentum = 0.9;
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(csr);
  {
    optim::SGD opt({{"w", w, g}}, o);
    amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::bfloat16));
    for (int s = 0; s < 5; ++s) {
      scaler.step(opt);
      scaler.update();
    }
    const unsigned during = _mm_getcsr();
    _mm_setcsr(saved);
    EXPECT_EQ(during & 0x8040u, csr & 0x8040u) << "the caller's flush bits are restored after each call";
    std::vector<std::uint32_t> bits = state_bits(opt);
    for (std::uint16_t u : weight_bits(w)) bits.push_back(u);
    return bits;
  }
}

TEST(Reliability, SubnormalsDoNotDependOnTheCallersFpuMode) {
  const unsigned base = _mm_getcsr() & ~0x8040u;
  const std::vector<std::uint32_t> ieee = subnormal_run(base);
  // DAZ | FTZ, as -ffast-math sets them at start-up.
  const std::vector<std::uint32_t> flushed_caller = subnormal_run(base | 0x8040u);
  EXPECT_EQ(ieee, flushed_caller);
  // Not vacuous: the run does hold subnormal masters (nonzero, below FLT_MIN).
  std::size_t subnormal = 0;
  for (std::size_t k = 0; k < 256; ++k) {
    float x;
    std::memcpy(&x, &ieee[k], 4);
    subnormal += x != 0.0f && std::fabs(x) < std::numeric_limits<float>::min();
  }
  EXPECT_GT(subnormal, 100u);
}
#endif

// --- 12. buffers that move -----------------------------------------------------

TEST(Reliability, RebindPointsTheStepAtTheNewBuffers) {
  Tensor<half> w({16}), g({16});
  fill_normal(w, 0, 1, 7);
  optim::SGD opt({{"w", w, g}}, optim::SGDOptions{});
  Tensor<half> w2({16}), g2({16});
  fill(w2, 123.0f);  // poison: the rebound weight is written, not read
  fill(g2, 1.0f);
  fill(g, 1000.0f);  // the old gradient must not be read
  const std::vector<std::uint16_t> old_w = weight_bits(w);
  opt.rebind(0, w2, g2);
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  EXPECT_TRUE(scaler.step(opt));
  scaler.update();
  EXPECT_EQ(weight_bits(w), old_w);
  for (std::int64_t e = 0; e < 16; ++e) {
    const float m = to_float(w.at(e)) + static_cast<float>(-1e-3) * 1.0f;  // from the old weight's master
    EXPECT_EQ(opt.master(0).at(e), m) << e;
    EXPECT_EQ(w2.at(e), from_float<half>(opt.master(0).at(e))) << e;
  }
  Tensor<half> small({8});
  expect_error([&] { opt.rebind(0, small, small); }, {"rebind", "\"w\"", "shape"});
  expect_error([&] { opt.rebind(0, w2, w2); }, {"rebind", "shares memory"});
  expect_error([&] { opt.rebind(3, w2, g2); }, {"parameter index 3"});
}

// --- review: data-parallel divisor in the monitor; the caller's FP flags ------

TEST(Reliability, TheMonitorsNormsAreOfTheMeanGradient) {
  // Data parallel: the stored gradients are a sum over 4 ranks; the
  // monitor reports the norms of their mean, as the scaler's grad_norm.
  const std::int64_t n = 100;
  std::vector<float> w(n, 0.5f), g(n);
  for (std::int64_t i = 0; i < n; ++i) g[i] = 0.01f * static_cast<float>(i % 7 + 1);
  optim::SGD sgd({{"w", TensorView<float>(w.data(), {n}), TensorView<float>(g.data(), {n})}});
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  scaler.set_grad_divisor(4);
  monitor::MonitorOptions mo;
  mo.every = 1;
  mo.warnings = false;
  monitor::Monitor mon(sgd, scaler, mo);
  ASSERT_TRUE(mon.step(1.0f));
  double gg = 0;
  for (float x : g) gg += double(x) * x;
  const monitor::LogRecord* r = mon.last_record();
  ASSERT_NE(r, nullptr);
  EXPECT_NEAR(r->last().grad_norm, std::sqrt(gg) / 4, 1e-6 * std::sqrt(gg));
  EXPECT_NEAR(r->params[0].grad_norm, std::sqrt(gg) / 4, 1e-6 * std::sqrt(gg));
}

#if defined(__SSE__)
TEST(Reliability, TheCallersFloatingPointFlagsSurviveAStep) {
  // IeeeFpMode restores the flush bits it changed, and keeps the exception
  // flags the step raised (as a call without it would).
  Tensor<float> w({8}), g({8});
  fill(w, 1.0f);
  fill(g, 3.0f);  // 1 - 1e-3 * 3 is inexact
  optim::SGD opt({{"w", w, g}});
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  const unsigned saved = _mm_getcsr();
  _mm_setcsr((saved | 0x8040u) & ~0x3fu);  // DAZ | FTZ on, exception flags clear
  scaler.step(opt);
  const unsigned after = _mm_getcsr();
  _mm_setcsr(saved);
  scaler.update();
  EXPECT_EQ(after & 0x8040u, 0x8040u);      // the caller's flush bits back
  EXPECT_NE(after & 0x20u, 0u);             // the precision flag the step raised, kept
}
#endif

// --- anchor scenarios ---------------------------------------------------------

TEST(Reliability, MasterWeightsKeepUpdatesBelowHalfAnUlp) {
  // fp16 weight 1.0, 10,000 updates of +1e-4 each: through the fp32 master
  // it reaches 2.0; applied to the fp16 weight directly, each update is
  // below half an ulp of 1.0 (2^-11) and rounds away: it stays 1.0.
  Tensor<half> w({1}), g({1});
  fill(w, 1.0f);
  fill(g, -1.0f);
  optim::SGDOptions o;
  o.lr = 1e-4;
  optim::SGD opt({{"w", w, g}}, o);
  amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
  half direct = from_float<half>(1.0f);
  for (int s = 0; s < 10000; ++s) {
    ASSERT_TRUE(scaler.step(opt));
    scaler.update();
    direct = from_float<half>(to_float(direct) + 1e-4f);
  }
  EXPECT_EQ(to_float(w.at(0)), 2.0f);
  EXPECT_NEAR(opt.master(0).at(0), 2.0f, 1e-3f);  // fp32 rounding of 10,000 additions
  EXPECT_EQ(to_float(direct), 1.0f);
}

TEST(Reliability, GradientsChangedBetweenUnscaleAndStep) {
  // The contract (docs/grad-scaler.md): unscale() reads the gradients for
  // the non-finite check and the norm; step() reads them again for the
  // update, still scaled, and multiplies by the inverse scale it recorded.
  // So a change made in between (in the stored, scaled units) reaches the
  // update, and the skip decision and the clip coefficient are those of
  // unscale() time, as with torch's unscale_() followed by step().
  Tensor<half> w({4}), g({4});
  fill(w, 0.0f);
  optim::SGDOptions o;
  o.lr = 1.0;
  optim::SGD opt({{"w", w, g}}, o);
  amp::GradScalerOptions so;
  so.init_scale = 1024.0;
  amp::GradScaler scaler(so);
  fill(g, 1024.0f);  // unscaled 1
  scaler.unscale(opt);
  EXPECT_FALSE(scaler.found_inf(opt));
  fill(g, 2048.0f);  // changed after unscale: unscaled 2
  EXPECT_TRUE(scaler.step(opt));
  scaler.update();
  EXPECT_EQ(opt.master(0).at(0), -2.0f);
  // A non-finite value written after unscale() is not seen by the check:
  // the update writes it into the master. Don't do that; unscale() again
  // next iteration finds nothing wrong with the gradients, the master is lost.
  fill(g, 1024.0f);
  scaler.unscale(opt);
  g.at(1) = from_float<half>(INFINITY);
  EXPECT_TRUE(scaler.step(opt));
  scaler.update();
  EXPECT_TRUE(std::isinf(opt.master(0).at(1)));
  EXPECT_EQ(opt.master(0).at(0), -3.0f);
}

}  // namespace
}  // namespace mixprec
