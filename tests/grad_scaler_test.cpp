// SPDX-License-Identifier: Apache-2.0
// GradScaler: the scale/skip sequences of the real torch.amp.GradScaler
// (fixture from PyTorch 2.11), skipped steps that leave everything
// untouched, the call-order errors, option checks, the modes, and property
// tests of the policy extensions (hysteresis, min/max, never 0/NaN/inf).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "test_util.hpp"

#ifndef MIXPREC_FIXTURE_DIR
#error "MIXPREC_FIXTURE_DIR must name tests/oracle/fixtures"
#endif

namespace mixprec {
namespace {

using test::expect_error;

/// Asserts that two saved optimizer states hold the same bits: applied
/// steps, base lrs, and per parameter the step count, the master and every
/// state tensor (and which of them exist).
void assert_same_state(const optim::OptimizerState& want, const optim::OptimizerState& have) {
  ASSERT_EQ(have.applied_steps, want.applied_steps);
  ASSERT_EQ(have.lrs, want.lrs);
  ASSERT_EQ(have.params.size(), want.params.size());
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  };
  for (std::size_t i = 0; i < want.params.size(); ++i) {
    const optim::ParamState& w = want.params[i];
    const optim::ParamState& h = have.params[i];
    ASSERT_EQ(h.step, w.step) << "parameter " << i;
    ASSERT_TRUE(same(h.master, w.master)) << "master of parameter " << i;
    ASSERT_EQ(h.state.size(), w.state.size()) << "parameter " << i;
    for (std::size_t k = 0; k < w.state.size(); ++k) {
      ASSERT_EQ(h.state[k].has_value(), w.state[k].has_value()) << "parameter " << i << ", state tensor " << k;
      if (w.state[k]) {
        ASSERT_TRUE(same(*h.state[k], *w.state[k])) << "parameter " << i << ", state tensor " << k;
      }
    }
  }
}

// One parameter whose gradient is finite or holds an inf at index 1, like the
// fixture's driver.
struct OneParam {
  Tensor<float> w{Shape{4}}, g{Shape{4}};
  optim::SGD opt{{{"w", w, g}}, optim::SGDOptions{}};
  void set_grad(bool inf, float scale) {
    fill(g, scale);
    if (inf) g.at(1) = INFINITY;
  }
};

TEST(GradScalerFixture, MatchesTorchGradScalerStepByStep) {
  std::ifstream in(std::string(MIXPREC_FIXTURE_DIR) + "/grad_scaler_sequences.txt");
  ASSERT_TRUE(in.good()) << "missing fixture " << MIXPREC_FIXTURE_DIR;
  std::unique_ptr<amp::GradScaler> scaler;
  std::unique_ptr<OneParam> model;
  std::string config;
  int rows = 0, configs = 0;
  bool left_normal_range = false;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream words(line);
    if (line.rfind("config", 0) == 0) {
      left_normal_range = false;
      std::string tag;
      amp::GradScalerOptions o;
      words >> tag >> config >> o.init_scale >> o.growth_factor >> o.backoff_factor >> o.growth_interval;
      scaler = std::make_unique<amp::GradScaler>(o);
      model = std::make_unique<OneParam>();
      ++configs;
      continue;
    }
    int step = 0, inf = 0, applied = 0, tracker = 0;
    std::string before_hex, after_hex;
    words >> step >> inf >> before_hex >> applied >> after_hex >> tracker;
    const float before = std::strtof(before_hex.c_str(), nullptr);
    const float after = std::strtof(after_hex.c_str(), nullptr);
    if (left_normal_range) continue;
    ASSERT_EQ(scaler->scale(), before) << config << " step " << step;
    model->set_grad(inf != 0, 1.0f);
    ASSERT_EQ(scaler->step(model->opt), applied != 0) << config << " step " << step;
    scaler->update();
    if (after < std::numeric_limits<float>::min()) {
      // torch backs off into subnormal scales (and would reach 0, where
      // 1/scale is inf); mixprec stops at min_scale, FLT_MIN by default. The
      // rest of this sequence differs by design.
      ASSERT_EQ(scaler->scale(), std::numeric_limits<float>::min()) << config << " step " << step;
      left_normal_range = true;
      continue;
    }
    ASSERT_EQ(scaler->scale(), after) << config << " step " << step;
    ASSERT_EQ(scaler->state().growth_tracker, tracker) << config << " step " << step;
    ++rows;
  }
  EXPECT_GE(configs, 5);
  EXPECT_GE(rows, 900);
}

TEST(GradScaler, SkippedStepLeavesEverythingUntouched) {
  Tensor<half> w({64}), g({64});
  Tensor<bfloat16> b({3}), gb({3});
  fill_normal(w, 0, 1, 1);
  fill_normal(b, 0, 1, 2);
  optim::AdamOptions o;
  o.amsgrad = true;
  optim::Adam opt({{"w", w, g}, {"b", b, gb}}, o);
  amp::GradScaler scaler;
  for (int step = 0; step < 3; ++step) {  // build up state first
    fill_normal(g, 0, 100, 10 + step);
    fill_normal(gb, 0, 100, 20 + step);
    ASSERT_TRUE(scaler.step(opt));
    scaler.update();
  }
  // Everything a step could change: the optimizer's whole state (masters,
  // exp_avg, exp_avg_sq, max_exp_avg_sq, step counts, applied steps, lrs),
  // the bits of both model weights.
  struct Snapshot {
    optim::OptimizerState state;
    std::vector<std::uint16_t> w, b;
  };
  auto snapshot = [&] {
    Snapshot s;
    s.state = opt.save_state();
    for (std::int64_t e = 0; e < w.numel(); ++e) s.w.push_back(to_bits(w.at(e)));
    for (std::int64_t e = 0; e < b.numel(); ++e) s.b.push_back(to_bits(b.at(e)));
    return s;
  };
  const Snapshot before = snapshot();
  ASSERT_EQ(before.state.applied_steps, 3);
  for (const optim::ParamState& p : before.state.params) {
    ASSERT_EQ(p.step, 3);
    ASSERT_EQ(p.state.size(), 3u);
    for (const auto& t : p.state) ASSERT_TRUE(t.has_value());  // amsgrad: all three moments exist
  }
  const amp::ScalerState scaler_before = scaler.state();
  ASSERT_EQ(scaler_before.growth_tracker, 3);  // so that the reset below shows
  const std::int64_t applied_before = scaler.applied_steps(), skipped_before = scaler.skipped_steps();
  int skipped = 0;
  for (const float bad : {INFINITY, -INFINITY, NAN}) {
    SCOPED_TRACE(bad);
    fill_normal(g, 0, 100, 99);
    gb.at(2) = from_float<bfloat16>(bad);
    EXPECT_FALSE(scaler.step(opt));
    EXPECT_TRUE(scaler.found_inf(opt));
    EXPECT_EQ(scaler.nonfinite_params(opt), std::vector<std::string>{"b"});
    scaler.update();
    ++skipped;
    const Snapshot after = snapshot();
    ASSERT_NO_FATAL_FAILURE(assert_same_state(before.state, after.state));
    ASSERT_EQ(after.w, before.w) << "fp16 weight";
    ASSERT_EQ(after.b, before.b) << "bf16 weight";
    EXPECT_EQ(opt.applied_steps(), 3);
    // The scaler counts the skip and backs off; its other counters stay.
    EXPECT_EQ(scaler.applied_steps(), applied_before);
    EXPECT_EQ(scaler.skipped_steps(), skipped_before + skipped);
    EXPECT_EQ(scaler.scale(), std::ldexp(scaler_before.scale, -skipped));
    EXPECT_EQ(scaler.state().growth_tracker, 0);
    EXPECT_EQ(scaler.state().hysteresis_tracker, 0);
    EXPECT_EQ(scaler.state().min_scale_hits, 0);
  }
  EXPECT_EQ(scaler.skipped_steps(), 3);
  EXPECT_EQ(scaler.applied_steps(), 3);
}

TEST(GradScaler, CallOrderErrors) {
  OneParam m;
  m.set_grad(false, 1.0f);
  amp::GradScaler scaler;
  expect_error([&] { scaler.update(); }, {"update", "no unscale() or step()"});
  expect_error([&] { scaler.clip_grad_norm(m.opt, 1.0); }, {"clip_grad_norm", "no unscale()"});
  scaler.unscale(m.opt);
  expect_error([&] { scaler.unscale(m.opt); }, {"unscale", "already called", "SGD"});
  expect_error([&] { scaler.clip_grad_norm(m.opt, -1.0); }, {"max_norm = -1"});
  EXPECT_TRUE(scaler.step(m.opt));
  expect_error([&] { scaler.step(m.opt); }, {"step", "already called"});
  expect_error([&] { scaler.unscale(m.opt); }, {"unscale", "after step()"});
  scaler.update();
  EXPECT_TRUE(scaler.step(m.opt));  // a new iteration starts clean
  scaler.update();
}

TEST(GradScaler, BadCallsChangeNothing) {
  OneParam m;
  m.set_grad(false, 1.0f);
  amp::GradScaler scaler;
  expect_error([&] { scaler.step(m.opt, -1.0); }, {"max_norm = -1"});
  EXPECT_NO_THROW(scaler.unscale(m.opt));  // the failed step did not unscale
  // Parameters added after unscale() were never checked: step refuses them.
  Tensor<float> x({3}), gx({3});
  fill(gx, NAN);
  m.opt.add_param_group({{"x", x, gx}}, {});
  expect_error([&] { scaler.step(m.opt); }, {"step", "2 parameters, 1 when unscale()"});
  scaler.update();
  EXPECT_FALSE(scaler.step(m.opt));  // the next iteration checks both
  scaler.update();
  amp::GradScalerOptions o;
  o.init_scale = 1e39;
  expect_error([&] { amp::GradScaler s(o); }, {"init_scale = 1e+39"});
}

TEST(GradScaler, RecordsFollowTheOptimizerNotItsAddress) {
  amp::GradScaler scaler;
  Tensor<float> w({4}), g({4});
  fill(g, 1.0f);
  auto a = std::make_unique<optim::SGD>(std::vector<optim::Param>{{"w", w, g}});
  scaler.unscale(*a);
  a.reset();
  auto b = std::make_unique<optim::SGD>(std::vector<optim::Param>{{"w", w, g}});  // maybe the same address
  EXPECT_NO_THROW(scaler.unscale(*b));
  EXPECT_TRUE(scaler.step(*b));
  scaler.update();
}

TEST(GradScaler, UnscaleThenClipUsesTorchsFormula) {
  Tensor<half> w({100}), g({100});
  fill(w, 0.0f);
  fill_normal(g, 0, 1000, 4);
  optim::SGDOptions o;
  o.lr = 1.0;
  optim::SGD opt({{"w", w, g}}, o);
  amp::GradScalerOptions so;
  so.init_scale = 1024;
  amp::GradScaler scaler(so);
  scaler.unscale(opt);
  double norm = 0;
  for (std::int64_t e = 0; e < g.numel(); ++e) norm += std::pow(to_float(g.at(e)) / 1024.0, 2);
  norm = std::sqrt(norm);
  EXPECT_NEAR(scaler.grad_norm(opt), norm, 1e-6 * norm);
  EXPECT_NEAR(scaler.clip_grad_norm(opt, 0.25), norm, 1e-6 * norm);
  ASSERT_TRUE(scaler.step(opt));
  // With lr 1 from zero weights, -master is the clipped gradient: its norm is
  // max_norm (up to the 1e-6 in torch's denominator).
  double clipped = 0;
  for (std::int64_t e = 0; e < 100; ++e) clipped += std::pow(opt.master(0).at(e), 2);
  EXPECT_NEAR(std::sqrt(clipped), 0.25, 1e-6);
}

TEST(GradScaler, OptionsRejected) {
  auto make = [](auto tweak) {
    amp::GradScalerOptions o;
    tweak(o);
    amp::GradScaler s(o);
  };
  expect_error([&] { make([](auto& o) { o.growth_factor = 1.0; }); }, {"growth_factor = 1", "> 1"});
  expect_error([&] { make([](auto& o) { o.backoff_factor = 1.0; }); }, {"backoff_factor = 1", "(0, 1)"});
  expect_error([&] { make([](auto& o) { o.backoff_factor = 0.0; }); }, {"backoff_factor = 0"});
  expect_error([&] { make([](auto& o) { o.init_scale = 0.0; }); }, {"init_scale = 0"});
  expect_error([&] { make([](auto& o) { o.init_scale = INFINITY; }); }, {"init_scale = inf"});
  expect_error([&] { make([](auto& o) { o.init_scale = NAN; }); }, {"init_scale = nan"});
  expect_error([&] { make([](auto& o) { o.growth_interval = 0; }); }, {"growth_interval = 0"});
  expect_error([&] { make([](auto& o) { o.hysteresis = 0; }); }, {"hysteresis = 0"});
  expect_error([&] { make([](auto& o) { o.min_scale = 0.0; }); }, {"min_scale = 0"});
  expect_error([&] {
    make([](auto& o) {
      o.min_scale = 8;
      o.max_scale = 4;
    });
  }, {"max_scale = 4", "min_scale = 8"});
  expect_error([&] { make([](auto& o) { o.max_scale = 1024; }); }, {"init_scale = 65536", "[min_scale, max_scale]"});
}

TEST(GradScaler, ModesAndDtypeDefaults) {
  EXPECT_EQ(amp::GradScalerOptions::for_dtype(DType::float16).mode, amp::ScalingMode::dynamic);
  EXPECT_EQ(amp::GradScalerOptions::for_dtype(DType::bfloat16).mode, amp::ScalingMode::disabled);
  EXPECT_EQ(amp::GradScalerOptions::for_dtype(DType::float32).mode, amp::ScalingMode::disabled);
  for (const auto mode : {amp::ScalingMode::static_scale, amp::ScalingMode::disabled}) {
    amp::GradScalerOptions o;
    o.mode = mode;
    o.growth_interval = 1;
    amp::GradScaler scaler(o);
    const float s0 = mode == amp::ScalingMode::disabled ? 1.0f : 65536.0f;
    OneParam m;
    for (int step = 0; step < 6; ++step) {
      EXPECT_EQ(scaler.scale(), s0);
      m.set_grad(step % 3 == 2, 1.0f);
      EXPECT_EQ(scaler.step(m.opt), step % 3 != 2);  // non-finite steps are still skipped
      scaler.update();
    }
    EXPECT_EQ(scaler.skipped_steps(), 2);
    EXPECT_EQ(scaler.applied_steps(), 4);
  }
}

// torch's name for scale(), on both scalers (docs/from-pytorch.md): the
// same value in every mode and after growth and backoff.
TEST(GradScaler, GetScaleIsScale) {
  for (const auto mode : {amp::ScalingMode::dynamic, amp::ScalingMode::static_scale, amp::ScalingMode::disabled}) {
    amp::GradScalerOptions o;
    o.mode = mode;
    o.growth_interval = 1;
    amp::GradScaler scaler(o);
    OneParam m;
    for (int step = 0; step < 4; ++step) {
      EXPECT_EQ(scaler.get_scale(), scaler.scale());
      m.set_grad(step == 2, 1.0f);
      scaler.step(m.opt);
      scaler.update();
    }
    EXPECT_EQ(scaler.get_scale(), mode == amp::ScalingMode::dynamic ? 262144.0f  // x2, x2, x0.5, x2
                                  : mode == amp::ScalingMode::static_scale ? 65536.0f : 1.0f);
  }
  static_assert(std::is_same_v<decltype(std::declval<const amp::DeviceGradScaler&>().get_scale()), float>);
}

// What docs/grad-scaler.md#gradient-accumulation says: the update uses the
// gradient buffers as they are (the sum of the micro-batches the backward
// added into them: nothing zeroes them before the first, or after the step),
// set_grad_divisor(k) makes it the mean, and an fp16 sum that overflows skips
// the step. Values chosen so that every sum and quotient is exact: the
// expected masters are exact too.
TEST(GradScaler, GradientAccumulation) {
  const std::int64_t n = 64;
  const int k = 4;  // micro-batches per step
  Tensor<half> w({n}), g({n});
  fill(w, 0.0f);
  optim::SGD sgd({{"w", w, g}}, optim::SGDOptions{});  // lr 1e-3, no momentum
  amp::GradScalerOptions o;
  o.init_scale = 1024;
  amp::GradScaler scaler(o);
  scaler.set_grad_divisor(k);
  auto micro = [&](std::int64_t i, int j) {  // micro-batch j's gradient, unscaled: multiples of 1/8
    return 0.125f * static_cast<float>((i % 7) - 3 + j);
  };
  auto accumulate = [&](bool zero_first) {
    if (zero_first) fill(g, 0.0f);  // the caller's job, before the first micro-batch
    for (int j = 0; j < k; ++j) {
      for (std::int64_t i = 0; i < n; ++i) {
        g.data()[i] = from_float<half>(to_float(g.data()[i]) + micro(i, j) * scaler.scale());  // the backward adds
      }
    }
  };
  accumulate(true);
  std::vector<std::uint16_t> stored(n);
  for (std::int64_t i = 0; i < n; ++i) stored[i] = to_bits(g.data()[i]);
  ASSERT_TRUE(scaler.step(sgd));
  scaler.update();
  for (std::int64_t i = 0; i < n; ++i) {
    float mean = 0;
    for (int j = 0; j < k; ++j) mean += micro(i, j);
    mean /= k;
    // SGD: master = 0 - lr * (stored * float(1 / (1024 * 4))), i.e. the mean.
    EXPECT_EQ(sgd.master(0).data()[i], -static_cast<float>(1e-3) * mean) << "element " << i;
    EXPECT_EQ(to_bits(g.data()[i]), stored[i]) << "the step wrote gradient " << i;
  }

  // Not zeroed: a second accumulation adds onto the first one's sums.
  const float master0 = sgd.master(0).data()[0];
  accumulate(false);
  EXPECT_EQ(to_float(g.data()[0]), 2.0f * to_float(from_bits<half>(stored[0])));

  // An fp16 sum that overflows is caught like any overflow: the step is skipped.
  fill(g, 40000.0f);
  for (std::int64_t i = 0; i < n; ++i) g.data()[i] = from_float<half>(to_float(g.data()[i]) + 40000.0f);
  ASSERT_TRUE(std::isinf(to_float(g.data()[0])));
  EXPECT_FALSE(scaler.step(sgd));
  scaler.update();
  EXPECT_EQ(sgd.master(0).data()[0], master0);
}

TEST(GradScaler, ErrorAtMinScaleRaisedOnce) {
  amp::GradScalerOptions o;
  o.init_scale = 16;
  o.min_scale = 2;
  o.error_at_min_scale = true;
  amp::GradScaler scaler(o);
  OneParam m;
  int errors = 0;
  for (int step = 0; step < 10; ++step) {
    m.set_grad(true, 1.0f);
    scaler.step(m.opt);
    try {
      scaler.update();
    } catch (const Error& e) {
      ++errors;
      EXPECT_NE(std::string(e.what()).find("min_scale = 2"), std::string::npos) << e.what();
    }
    EXPECT_GE(scaler.scale(), 2.0f);
  }
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(scaler.scale(), 2.0f);
  EXPECT_EQ(scaler.skipped_steps(), 10);
}

// The policy, restated from its documentation, as an independent model.
struct PolicyModel {
  double growth, backoff, min_scale, max_scale;
  int interval, hysteresis;
  float scale;
  int tracker = 0, bad_run = 0;
  void update(bool inf) {
    if (inf) {
      tracker = 0;
      if (++bad_run == hysteresis) {
        bad_run = 0;
        scale = std::max(static_cast<float>(scale * backoff), static_cast<float>(min_scale));
      }
    } else {
      bad_run = 0;
      if (++tracker == interval) {
        tracker = 0;
        const float grown = std::min(static_cast<float>(scale * growth), static_cast<float>(max_scale));
        if (std::isfinite(grown)) scale = grown;
      }
    }
  }
};

TEST(GradScalerProperty, RandomPoliciesStayInRangeAndFollowTheModel) {
  std::mt19937 rng(2026);
  for (int trial = 0; trial < 200; ++trial) {
    amp::GradScalerOptions o;
    o.growth_factor = std::uniform_real_distribution<double>(1.01, 1e6)(rng);
    o.backoff_factor = std::uniform_real_distribution<double>(1e-4, 0.999)(rng);
    o.growth_interval = std::uniform_int_distribution<int>(1, 5)(rng);
    o.hysteresis = std::uniform_int_distribution<int>(1, 4)(rng);
    o.min_scale = trial % 2 ? std::ldexp(1.0, std::uniform_int_distribution<int>(-126, 0)(rng))
                            : std::numeric_limits<float>::min();
    o.max_scale = trial % 3 ? std::ldexp(1.0, std::uniform_int_distribution<int>(16, 127)(rng)) : INFINITY;
    o.init_scale = std::min(std::max(65536.0, o.min_scale), o.max_scale);
    amp::GradScaler scaler(o);
    PolicyModel model{o.growth_factor, o.backoff_factor, o.min_scale, o.max_scale,
                      static_cast<int>(o.growth_interval), static_cast<int>(o.hysteresis),
                      static_cast<float>(o.init_scale)};
    OneParam m;
    const double p_inf = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    int consecutive = 0, backoffs = 0, expected_backoffs = 0;
    for (int step = 0; step < 400; ++step) {
      const bool inf = std::bernoulli_distribution(p_inf)(rng);
      const float before = scaler.scale();
      m.set_grad(inf, 1.0f);
      EXPECT_EQ(scaler.step(m.opt), !inf);
      scaler.update();
      model.update(inf);
      const float s = scaler.scale();
      ASSERT_EQ(s, model.scale) << "trial " << trial << " step " << step;
      ASSERT_TRUE(std::isfinite(s) && s > 0) << s;
      ASSERT_GE(s, static_cast<float>(o.min_scale));
      ASSERT_LE(s, static_cast<float>(o.max_scale));
      // Hysteresis: the scale drops only on every hysteresis-th consecutive inf.
      consecutive = inf ? consecutive + 1 : 0;
      if (inf && consecutive % o.hysteresis == 0) ++expected_backoffs;
      backoffs += s < before;
      ASSERT_LE(backoffs, expected_backoffs);
    }
  }
}

}  // namespace
}  // namespace mixprec
