// SPDX-License-Identifier: Apache-2.0
// The instability monitor's host logic: each detector fires on a synthetic
// sequence and stays silent on a near miss; the forecasts against answers
// worked out by hand; the rate limit; option, run and record checks; the
// JSONL lines, read back by Python's json module.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/monitor/detectors.hpp"
#include "mixprec/monitor/jsonl.hpp"
#include "mixprec/monitor/record.hpp"
#include "test_util.hpp"

namespace mixprec::monitor {
namespace {

using test::expect_error;

constexpr double nan = std::numeric_limits<double>::quiet_NaN();
constexpr double inf = std::numeric_limits<double>::infinity();

// Three parameters: two weights and a bias too small for the per-parameter
// underflow check (100 < underflow_min_numel = 1024).
RunInfo make_info(const std::string& dtype = "float16") {
  RunInfo info;
  info.optimizer = "AdamW";
  info.device = "cpu";
  info.scaling = "dynamic";
  info.init_scale = 65536;
  info.min_scale = 1;
  info.max_scale = inf;
  info.every = 10;
  info.params = {{"fc1.weight", 5000, dtype}, {"fc1.bias", 100, dtype}, {"fc2.weight", 2000, dtype}};
  return info;
}

// n elements, round(n * under) of them exact zeros (lost in fp16), the rest
// at 2^-5 (a normal fp16 value).
Histogram hist(std::int64_t n, double under) {
  Histogram h{};
  const auto zeros = static_cast<std::uint64_t>(std::llround(static_cast<double>(n) * under));
  h[Bins::zero] = zeros;
  h[static_cast<std::size_t>(Bins::of(0.03125f))] = static_cast<std::uint64_t>(n) - zeros;
  return h;
}

// An underflowing gradient: round(n * lost) exact zeros (values that fell
// under 2^-24), the rest at 2^-20, in the subnormal band they shrank
// through.
Histogram draining(std::int64_t n, double lost) {
  Histogram h = hist(n, lost);
  const std::uint64_t kept = h[static_cast<std::size_t>(Bins::of(0.03125f))];
  h[static_cast<std::size_t>(Bins::of(0.03125f))] = 0;
  h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -20)))] = kept;
  return h;
}

StepSample sample(std::int64_t step, double loss, double scale = 65536, double grad_norm = 1.0) {
  StepSample s;
  s.step = step;
  s.loss = loss;
  s.scale = scale;
  s.grad_norm = grad_norm;
  return s;
}

// Feeds a Detectors one record per `every` steps. `params` is what the next
// record carries (healthy unless a test changes it).
struct Feed {
  explicit Feed(RunInfo i = make_info(), DetectorOptions o = {}) : info(std::move(i)), det(info, o) {
    for (const ParamInfo& p : info.params) {
      ParamSample s;
      s.grad_norm = 0.5;
      s.update_ratio = 1e-3;
      s.eps_share = 0.01;
      s.hist = hist(p.numel, 0.0);
      params.push_back(s);
    }
  }
  void add(const StepSample& s) {
    pending.push_back(s);
    if (static_cast<int>(pending.size()) == info.every) flush();
  }
  // Steps first..last (inclusive) made by f(step).
  void steps(std::int64_t first, std::int64_t last, const std::function<StepSample(std::int64_t)>& f) {
    for (std::int64_t s = first; s <= last; ++s) add(f(s));
  }
  void flush() {
    if (pending.empty()) return;
    LogRecord r;
    r.steps = pending;
    r.params = params;
    pending.clear();
    const std::vector<Event> found = det.observe(r);
    events.insert(events.end(), found.begin(), found.end());
  }
  std::vector<Event> of(EventKind kind) const {
    std::vector<Event> out;
    for (const Event& e : events) {
      if (e.kind == kind) out.push_back(e);
    }
    return out;
  }

  RunInfo info;
  Detectors det;
  std::vector<ParamSample> params;
  std::vector<StepSample> pending;
  std::vector<Event> events;
};

std::string describe(const std::vector<Event>& events) {
  std::ostringstream out;
  for (const Event& e : events) {
    out << "\n  " << to_string(e.kind) << " step " << e.step << " param '" << e.param << "' value " << e.value
        << " threshold " << e.threshold << ": " << e.message;
  }
  return out.str();
}

void expect_complete(const Event& e) {
  EXPECT_FALSE(e.message.empty()) << to_string(e.kind);
  EXPECT_FALSE(e.suggestion.empty()) << to_string(e.kind);
}

// A healthy run: the loss falls with noise, the norm wobbles, the scale
// grows once. Nothing may fire.
TEST(Detectors, HealthyRunRaisesNothing) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> noise(-0.05, 0.05);
  Feed run;
  run.steps(1, 1000, [&](std::int64_t s) {
    const double loss = 2.0 * std::exp(-static_cast<double>(s) / 400.0) + 0.3 + noise(rng);
    return sample(s, loss, s <= 500 ? 32768.0 : 65536.0, 1.0 + noise(rng));
  });
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
  EXPECT_TRUE(run.det.events().empty());
  EXPECT_EQ(run.det.status_line(), "monitor ok");
  EXPECT_FALSE(run.det.forecast().diverging);
  EXPECT_LT(run.det.forecast().loss_slope, 0.0);
}

// --- nonfinite_loss ----------------------------------------------------------

TEST(Detectors, NonfiniteLossFires) {
  for (double bad : {nan, inf, -inf}) {
    Feed run;
    run.steps(1, 50, [&](std::int64_t s) { return sample(s, s == 37 ? bad : 2.0); });
    ASSERT_EQ(run.events.size(), 1u) << bad << describe(run.events);
    const Event& e = run.events[0];
    EXPECT_EQ(e.kind, EventKind::nonfinite_loss);
    EXPECT_EQ(e.step, 37);
    EXPECT_EQ(e.param, "");
    EXPECT_EQ(std::isnan(e.value), std::isnan(bad));
    expect_complete(e);
  }
}

// --- loss_spike --------------------------------------------------------------

// 100 noisy losses around 2, then one at mean + z * sd of those 100 (the
// sample standard deviation, computed here).
std::vector<Event> spike_events(double z, double* limit_out = nullptr) {
  std::mt19937 rng(2);
  std::uniform_real_distribution<double> noise(-0.01, 0.01);
  std::vector<double> losses;
  for (int s = 0; s < 100; ++s) losses.push_back(2.0 + noise(rng));
  double mean = 0;
  for (double l : losses) mean += l;
  mean /= 100;
  double ss = 0;
  for (double l : losses) ss += (l - mean) * (l - mean);
  const double sd = std::sqrt(ss / 99);
  if (limit_out) *limit_out = mean + 6.0 * sd;
  Feed run;
  run.steps(1, 100, [&](std::int64_t s) { return sample(s, losses[static_cast<std::size_t>(s - 1)]); });
  run.steps(101, 110, [&](std::int64_t s) { return sample(s, s == 101 ? mean + z * sd : mean); });
  return run.events;
}

TEST(Detectors, LossSpikeAtZ7Fires) {
  double limit = 0;
  const std::vector<Event> events = spike_events(7.0, &limit);
  ASSERT_EQ(events.size(), 1u) << describe(events);
  EXPECT_EQ(events[0].kind, EventKind::loss_spike);
  EXPECT_EQ(events[0].step, 101);
  EXPECT_EQ(events[0].param, "");
  EXPECT_NEAR(events[0].threshold, limit, 1e-12);  // the loss that z = 6 means
  EXPECT_GT(events[0].value, events[0].threshold);
  expect_complete(events[0]);
}

TEST(Detectors, LossWithinZ3DoesNotFire) {
  const std::vector<Event> events = spike_events(3.0);
  EXPECT_TRUE(events.empty()) << describe(events);
}

// A perfectly flat loss has a standard deviation of 0: the floor
// (1e-3 |mean|) keeps rounding-size wiggles quiet, a 2% jump still fires.
TEST(Detectors, FlatLossNeedsARelativeMargin) {
  Feed run;
  run.steps(1, 100, [](std::int64_t s) { return sample(s, 2.0); });
  run.steps(101, 110, [](std::int64_t s) { return sample(s, s == 101 ? 2.0 + 1e-6 : 2.0); });
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
  run.steps(111, 120, [](std::int64_t s) { return sample(s, s == 111 ? 2.04 : 2.0); });
  ASSERT_EQ(run.events.size(), 1u) << describe(run.events);
  EXPECT_EQ(run.events[0].kind, EventKind::loss_spike);
  EXPECT_EQ(run.events[0].step, 111);
}

// min_samples = 20 previous losses: a spike at step 20 has 19 behind it.
TEST(Detectors, LossSpikeNeedsTwentyPreviousLosses) {
  for (std::int64_t at : {20, 21}) {
    Feed run;
    run.steps(1, 30, [&](std::int64_t s) { return sample(s, s == at ? 100.0 : 2.0 + 0.001 * (s % 2)); });
    EXPECT_EQ(run.of(EventKind::loss_spike).size(), at == 21 ? 1u : 0u) << "spike at " << at;
  }
}

// --- grad_norm_explosion -----------------------------------------------------

// 100 noisy norms around 1, four at their median, then one at `factor`
// times it. *limit_out: 10x the median of the window the detector sees at
// step 105 (steps 5..104), computed here.
std::vector<Event> norm_events(double factor, double* limit_out = nullptr) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> noise(-0.1, 0.1);
  std::vector<double> norms;
  for (int s = 0; s < 100; ++s) norms.push_back(1.0 + noise(rng));
  const auto median_of = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  const double median = median_of(norms);
  std::vector<double> window(norms.begin() + 4, norms.end());
  window.insert(window.end(), 4, median);
  if (limit_out) *limit_out = 10.0 * median_of(window);
  Feed run;
  run.steps(1, 100, [&](std::int64_t s) { return sample(s, 2.0, 65536, norms[static_cast<std::size_t>(s - 1)]); });
  run.steps(101, 110, [&](std::int64_t s) { return sample(s, 2.0, 65536, s == 105 ? factor * median : median); });
  return run.events;
}

TEST(Detectors, GradNormTimes20Fires) {
  double limit = 0;
  const std::vector<Event> events = norm_events(20.0, &limit);
  ASSERT_EQ(events.size(), 1u) << describe(events);
  EXPECT_EQ(events[0].kind, EventKind::grad_norm_explosion);
  EXPECT_EQ(events[0].step, 105);
  EXPECT_EQ(events[0].param, "");
  EXPECT_DOUBLE_EQ(events[0].threshold, limit);
  EXPECT_NEAR(events[0].value / events[0].threshold, 2.0, 0.05);
  expect_complete(events[0]);
}

TEST(Detectors, GradNormTimes5DoesNotFire) {
  const std::vector<Event> events = norm_events(5.0);
  EXPECT_TRUE(events.empty()) << describe(events);
}

// --- scale_collapse ----------------------------------------------------------

// The scale halves at each of `at` (from that step on).
std::vector<Event> backoff_events(const std::vector<std::int64_t>& at, std::int64_t last) {
  Feed run;
  run.steps(1, last, [&](std::int64_t s) {
    double scale = 65536;
    for (std::int64_t b : at) {
      if (s >= b) scale /= 2;
    }
    return sample(s, 2.0, scale);
  });
  return run.events;
}

TEST(Detectors, FiveBackoffsIn200StepsFire) {
  const std::vector<Event> events = backoff_events({50, 80, 110, 140, 170}, 300);
  ASSERT_EQ(events.size(), 1u) << describe(events);
  EXPECT_EQ(events[0].kind, EventKind::scale_collapse);
  EXPECT_EQ(events[0].step, 170);
  EXPECT_EQ(events[0].param, "");
  EXPECT_EQ(events[0].value, 5.0);
  EXPECT_EQ(events[0].threshold, 5.0);
  expect_complete(events[0]);
}

TEST(Detectors, FourBackoffsOrFiveSpreadOutDoNotFire) {
  std::vector<Event> events = backoff_events({50, 80, 110, 140}, 300);
  EXPECT_TRUE(events.empty()) << describe(events);
  // 80 steps apart: any 200 steps hold at most three.
  events = backoff_events({50, 130, 210, 290, 370}, 500);
  EXPECT_TRUE(events.empty()) << describe(events);
}

// The dynamic scaler's probing, as a healthy run logged it (the MLP example
// on CPU, fp16, AdamW lr 1e-2, seed 0; benchmarks/instability): from 2^16 it
// overflows on steps 2, 4 and 6 (one clean step between) and 2^13 holds
// from step 7; after 2000 clean steps it grows to 2^14, overflows a step
// later and is back at 2^13; later it holds 2^14 and a backoff once takes it
// to 2^13 again. Before the fix the start alone raised repeated_overflow
// (advice: "train in bf16").
StepSample probing(std::int64_t s) {
  double scale = 8192;
  bool overflow = false;
  if (s <= 6) {
    scale = std::exp2(16.0 - static_cast<double>((s - 1) / 2));  // 2^16 on steps 1-2, 2^15 on 3-4, 2^14 on 5-6
    overflow = s % 2 == 0;
  } else if (s >= 2007 && s <= 2008) {
    scale = 16384;  // the growth after 2000 clean steps (7..2006), tried for two steps
    overflow = s == 2008;
  } else if (s >= 4009 && s <= 4500) {
    scale = 16384;  // holds this time, then one overflow at step 4500
    overflow = s == 4500;
  }
  StepSample x = sample(s, 2.0 * std::exp(-static_cast<double>(s) / 2000.0) + 0.3, scale);
  if (overflow) {
    x.skipped = true;
    x.grad_norm = inf;
    x.nonfinite_params = {0, 1, 2};
  }
  return x;
}

TEST(Detectors, TheScalersProbingRaisesNothing) {
  Feed run;
  run.steps(1, 5000, probing);
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
}

// The same start, then the scale collapses: from step 3000 every step
// overflows (an lr jump: the loss blows up first). Counting from the settled
// 2^13, the fifth backoff under it comes at step 3005, the third overflow at
// a scale at or under it at step 3002; both name the divergence, not bf16.
TEST(Detectors, ACollapseAfterTheProbingFiresWithTheDivergenceAsCause) {
  Feed run;
  run.steps(1, 3020, [](std::int64_t s) {
    if (s < 3000) return probing(s);
    StepSample x = sample(s, s == 3000 ? 50.0 : inf, std::exp2(13.0 - static_cast<double>(s - 3000)));
    x.skipped = true;
    x.grad_norm = inf;
    x.nonfinite_params = {0, 1, 2};
    return x;
  });
  const std::vector<Event> collapse = run.of(EventKind::scale_collapse);
  ASSERT_EQ(collapse.size(), 1u) << describe(run.events);
  EXPECT_EQ(collapse[0].step, 3005);
  EXPECT_EQ(collapse[0].value, 5.0);
  EXPECT_NE(collapse[0].message.find("8.19e+03"), std::string::npos) << collapse[0].message;
  const std::vector<Event> overflow = run.of(EventKind::repeated_overflow);
  ASSERT_EQ(overflow.size(), 3u) << describe(run.events);
  for (const Event& e : collapse) {
    EXPECT_NE(e.suggestion.find("diverging"), std::string::npos) << e.suggestion;
    EXPECT_EQ(e.suggestion.find("bf16 would only postpone"), e.suggestion.find("bf16")) << e.suggestion;
  }
  for (const Event& e : overflow) {
    EXPECT_EQ(e.step, 3002);
    EXPECT_NE(e.suggestion.find("diverging"), std::string::npos) << e.suggestion;
  }
}

// A layer that overflows fp16 at a healthy loss: the advice is the layer's
// range (fp32 for it, or bf16), not the lr.
TEST(Detectors, AnOverflowingLayerAtAHealthyLossGetsTheRangeAdvice) {
  Feed run;
  run.steps(1, 300, [](std::int64_t s) {
    StepSample x = sample(s, 2.0);
    if (s == 100 || s == 150 || s == 200) {
      x.skipped = true;
      x.grad_norm = inf;
      x.nonfinite_params = {2};
    }
    return x;
  });
  const std::vector<Event> overflow = run.of(EventKind::repeated_overflow);
  ASSERT_EQ(overflow.size(), 1u) << describe(run.events);
  EXPECT_EQ(overflow[0].step, 200);
  EXPECT_NE(overflow[0].suggestion.find("fc2.weight overflows fp16"), std::string::npos) << overflow[0].suggestion;
  EXPECT_EQ(overflow[0].suggestion.find("diverging"), std::string::npos) << overflow[0].suggestion;
}

// A model that overflows from its first step never settles a scale: its
// first 4 backoffs (to 2^12 = init_scale / 2^probe_backoffs) are probing,
// from there on its overflows and backoffs count.
TEST(Detectors, AnOverflowFromTheStartCountsOnceTheScaleIsFarUnderInitScale) {
  Feed run;
  run.steps(1, 40, [](std::int64_t s) {
    StepSample x = sample(s, 2.0, std::exp2(17.0 - static_cast<double>(s)));
    x.skipped = true;
    x.grad_norm = inf;
    x.nonfinite_params = {0};
    return x;
  });
  const std::vector<Event> collapse = run.of(EventKind::scale_collapse);
  ASSERT_EQ(collapse.size(), 1u) << describe(run.events);
  EXPECT_EQ(collapse[0].step, 10);  // backoffs to 2^11 (step 6) .. 2^7 (step 10)
  EXPECT_EQ(collapse[0].value, 5.0);
  EXPECT_NE(collapse[0].message.find("no scale has held yet"), std::string::npos) << collapse[0].message;
  const std::vector<Event> overflow = run.of(EventKind::repeated_overflow);
  ASSERT_EQ(overflow.size(), 1u) << describe(run.events);
  EXPECT_EQ(overflow[0].step, 8);  // steps 6, 7, 8 (scales 2^11 .. 2^9)
  EXPECT_EQ(overflow[0].param, "fc1.weight");
}

TEST(Detectors, ScaleUnderOneFires) {
  Feed run;
  run.steps(1, 60, [](std::int64_t s) { return sample(s, 2.0, s < 31 ? 4.0 : 0.5); });
  ASSERT_EQ(run.events.size(), 1u) << describe(run.events);
  EXPECT_EQ(run.events[0].kind, EventKind::scale_collapse);
  EXPECT_EQ(run.events[0].step, 31);
  EXPECT_EQ(run.events[0].value, 0.5);
  EXPECT_EQ(run.events[0].threshold, 1.0);
  expect_complete(run.events[0]);
}

// A static scale under 1 is the user's choice (a loss whose gradients are
// large), not a collapse.
TEST(Detectors, AStaticScaleUnderOneDoesNotFire) {
  RunInfo info = make_info();
  info.scaling = "static";
  Feed run(info);
  run.steps(1, 100, [](std::int64_t s) { return sample(s, 2.0, 1e-3); });
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
}

TEST(Detectors, ScaleOfOneDoesNotFire) {
  RunInfo info = make_info();
  info.scaling = "disabled";
  Feed run(info);
  run.steps(1, 100, [](std::int64_t s) { return sample(s, 2.0, 1.0); });
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
}

// --- underflow ---------------------------------------------------------------

TEST(Detectors, UnderflowShare04FiresNamingTheParameter) {
  Feed run;
  run.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0); });
  run.params[0].hist = draining(5000, 0.4);
  run.steps(11, 20, [](std::int64_t s) { return sample(s, 2.0); });
  ASSERT_EQ(run.events.size(), 1u) << describe(run.events);
  const Event& e = run.events[0];
  EXPECT_EQ(e.kind, EventKind::underflow);
  EXPECT_EQ(e.step, 20);
  EXPECT_EQ(e.param, "fc1.weight");
  EXPECT_DOUBLE_EQ(e.value, 0.4);
  EXPECT_EQ(e.threshold, 0.25);
  EXPECT_NE(e.message.find("fc1.weight"), std::string::npos) << e.message;
  EXPECT_NE(e.suggestion.find("bf16"), std::string::npos) << e.suggestion;
}

TEST(Detectors, UnderflowShare01DoesNotFire) {
  Feed run;
  run.params[0].hist = draining(5000, 0.1);
  run.params[2].hist = draining(2000, 0.1);
  run.steps(1, 50, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
}

// A small bias full of zeros is not reported on its own (under
// underflow_min_numel); a large weight over the threshold is, even when the
// model's share is under it.
TEST(Detectors, UnderflowPerParameterNeedsASizeableParameter) {
  Feed run;
  run.params[1].hist = draining(100, 0.9);
  run.steps(1, 20, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
  run.params[2].hist = draining(2000, 0.5);  // model: (90 + 1000) / 7100 = 0.15
  run.steps(21, 30, [](std::int64_t s) { return sample(s, 2.0); });
  ASSERT_EQ(run.events.size(), 1u) << describe(run.events);
  EXPECT_EQ(run.events[0].param, "fc2.weight");
  EXPECT_DOUBLE_EQ(run.events[0].value, 0.5);
}

// No large parameter reaches 0.25, but the model does:
// (1200 + 100 + 480) / 7100 = 0.2507, up from 0.05 at the first record.
TEST(Detectors, UnderflowOfTheWholeModelHasNoParameter) {
  Feed run;
  run.params[0].hist = draining(5000, 0.05);
  run.params[1].hist = draining(100, 0.05);
  run.params[2].hist = draining(2000, 0.05);
  run.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0); });
  run.params[0].hist = draining(5000, 0.24);
  run.params[1].hist = draining(100, 1.0);
  run.params[2].hist = draining(2000, 0.24);
  run.steps(11, 20, [](std::int64_t s) { return sample(s, 2.0); });
  ASSERT_EQ(run.events.size(), 1u) << describe(run.events);
  EXPECT_EQ(run.events[0].param, "");
  EXPECT_EQ(run.events[0].step, 20);
  EXPECT_DOUBLE_EQ(run.events[0].value, 1780.0 / 7100.0);
}

// A share that is high from the first record on and stays there is true
// zeros (a ReLU that never fires, an input that is always 0), not
// underflow; the same share reached by a climb of 0.15 or more is.
TEST(Detectors, UnderflowNeedsTheShareToRise) {
  Feed flat;
  flat.params[0].hist = draining(5000, 0.4);
  flat.steps(1, 200, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_TRUE(flat.events.empty()) << describe(flat.events);
  Feed small_rise;
  small_rise.params[0].hist = draining(5000, 0.2);
  small_rise.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0); });
  small_rise.params[0].hist = draining(5000, 0.34);
  small_rise.steps(11, 100, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_TRUE(small_rise.events.empty()) << describe(small_rise.events);
  Feed climb;
  climb.params[0].hist = draining(5000, 0.2);
  climb.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0); });
  climb.params[0].hist = draining(5000, 0.36);
  climb.steps(11, 20, [](std::int64_t s) { return sample(s, 2.0); });
  ASSERT_EQ(climb.events.size(), 1u) << describe(climb.events);
  EXPECT_EQ(climb.events[0].param, "fc1.weight");
}

// Magnitudes spread evenly (in log2) over the binades [2^lo, 2^hi), as an
// fp16 gradient stores them: what lies under 2^-24 is 0. `zeros` more
// elements are exact zeros from the start. Returns the histogram of n
// elements.
Histogram spread_fp16(std::int64_t n, std::int64_t zeros, int lo, int hi) {
  Histogram h{};
  h[Bins::zero] = static_cast<std::uint64_t>(zeros);
  const std::int64_t rest = n - zeros;
  const int binades = hi - lo;
  for (int e = lo; e < hi; ++e) {
    // the last binade takes the remainder, so the counts sum to n
    const std::int64_t c = e + 1 < hi ? rest / binades : rest - (rest / binades) * (binades - 1);
    if (e < -24) {
      h[Bins::zero] += static_cast<std::uint64_t>(c);
    } else {
      h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, e)))] += static_cast<std::uint64_t>(c);
    }
  }
  return h;
}

// ReLU units dying: the weight gradients' exact zeros climb from 20% to
// 85% (the rows and columns of dead units), while what is left stays where
// it was, far above 2^-24, with 1% subnormal (a record of the MLP at AdamW
// lr 1e-2 had 84% zeros, 0.7% subnormal). The lost share rises well past
// 0.25 and by more than 0.15, but nothing is shrinking through the
// subnormals: no underflow, per parameter or over the model.
TEST(Detectors, UnderflowIgnoresDeadUnitsZeros) {
  Feed run;
  const std::int64_t n0 = run.info.params[0].numel, n2 = run.info.params[2].numel;
  for (int k = 0; k <= 13; ++k) {
    const double zeros = 0.20 + 0.05 * k;  // 0.20 .. 0.85
    for (std::size_t i : {std::size_t{0}, std::size_t{2}}) {
      const std::int64_t n = i == 0 ? n0 : n2;
      Histogram h = spread_fp16(n, std::llround(zeros * static_cast<double>(n)), -12, 2);
      // move 1% of all elements from the lowest normal binade to 2^-16
      const auto sub = static_cast<std::uint64_t>(n / 100);
      h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -12)))] -= sub;
      h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -16)))] += sub;
      run.params[i].hist = h;
    }
    run.steps(10 * k + 1, 10 * k + 10, [](std::int64_t s) { return sample(s, 2.0); });
  }
  const Fp16Shares last = fp16_shares(run.params[0].hist);
  ASSERT_GT(last.underflow, 0.8);
  ASSERT_NEAR(last.subnormal, 0.01, 1e-3);
  EXPECT_TRUE(run.of(EventKind::underflow).empty()) << describe(run.events);
}

// Gradients shrinking as the loss falls (a static scale): every record the
// magnitudes, spread over 12 binades, move 2 binades down, so the values
// that fall under 2^-24 go to 0 after passing through the subnormals; 5%
// are exact zeros throughout. The event comes at the first record whose
// lost share is at least 0.25 and 0.15 above its lowest (step 80: 4 of 12
// binades lost, 0.37), before half is lost (step 90, the failure
// benchmarks/instability scores).
TEST(Detectors, UnderflowFiresOnGradientsShrinkingThroughTheSubnormals) {
  Feed run;
  const std::int64_t n = run.info.params[0].numel;
  const std::int64_t zeros = n / 20;
  std::int64_t fires_at = -1, fails_at = -1;
  double lowest = 1;
  for (int k = 0; k < 12; ++k) {
    const int lo = -14 - 2 * k;
    run.params[0].hist = spread_fp16(n, zeros, lo, lo + 12);
    run.params[2].hist = spread_fp16(run.info.params[2].numel, 0, lo, lo + 12);
    const std::int64_t step = 10 * k + 10;
    const double lost = fp16_shares(run.params[0].hist).underflow;
    lowest = std::min(lowest, lost);
    if (fires_at < 0 && lost >= 0.25 && lost - lowest >= 0.15) fires_at = step;
    if (fails_at < 0 && lost >= 0.5) fails_at = step;
    run.steps(step - 9, step, [](std::int64_t s) { return sample(s, 2.0); });
  }
  ASSERT_GT(fires_at, 0);
  ASSERT_GT(fails_at, 0);
  const std::vector<Event> under = run.of(EventKind::underflow);
  ASSERT_FALSE(under.empty()) << describe(run.events);
  EXPECT_EQ(under[0].step, fires_at) << describe(run.events);
  EXPECT_EQ(under[0].param, "fc1.weight");
  EXPECT_GE(fails_at - under[0].step, 5);
  EXPECT_NE(under[0].message.find("subnormal"), std::string::npos) << under[0].message;
}

// The boundary: 40% zeros (risen from 0), and of the 60% kept, just under
// or just over half subnormal.
TEST(Detectors, UnderflowNeedsHalfOfTheKeptValuesSubnormal) {
  for (const double sub : {0.29, 0.31}) {  // of all elements: 0.29 / 0.6 = 0.483, 0.31 / 0.6 = 0.517
    Feed run;
    run.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0); });
    Histogram h{};
    h[Bins::zero] = 2000;
    h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -18)))] = static_cast<std::uint64_t>(std::llround(sub * 5000));
    h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -8)))] =
        3000 - static_cast<std::uint64_t>(std::llround(sub * 5000));
    run.params[0].hist = h;
    run.steps(11, 20, [](std::int64_t s) { return sample(s, 2.0); });
    EXPECT_EQ(run.of(EventKind::underflow).size(), sub > 0.3 ? 1u : 0u) << sub << describe(run.events);
  }
  // A lower underflow_subnormal lets the first one fire too.
  DetectorOptions o;
  o.underflow_subnormal = 0.4;
  Feed run(make_info(), o);
  run.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0); });
  Histogram h{};
  h[Bins::zero] = 2000;
  h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -18)))] = 1450;
  h[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -8)))] = 1550;
  run.params[0].hist = h;
  run.steps(11, 20, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_EQ(run.of(EventKind::underflow).size(), 1u) << describe(run.events);
}

// bfloat16 gradients have fp32's range: fp16 underflow says nothing there.
TEST(Detectors, UnderflowIgnoresBfloat16Gradients) {
  Feed run(make_info("bfloat16"));
  run.params[0].hist = draining(5000, 0.9);
  run.steps(1, 50, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_TRUE(run.events.empty()) << describe(run.events);
  EXPECT_TRUE(std::isnan(run.det.forecast().steps_to_underflow));
}

// --- stalled_updates ---------------------------------------------------------

// Healthy until `logged` - 10 * records; the last `records` records (5:
// stall_records) carry `ratio` for fc1.weight (and `skipped` on the last
// logged step).
std::vector<Event> stall_events(double ratio, std::int64_t logged = 200, bool skipped = false, int records = 5) {
  Feed run;
  run.steps(1, logged - 10 * records, [](std::int64_t s) { return sample(s, 2.0); });
  run.params[0].update_ratio = ratio;
  run.steps(logged - 10 * records + 1, logged, [&](std::int64_t s) {
    StepSample x = sample(s, 2.0);
    x.skipped = skipped && s == logged;
    return x;
  });
  return run.events;
}

TEST(Detectors, StalledRatio1e9Fires) {
  const std::vector<Event> events = stall_events(1e-9);
  ASSERT_EQ(events.size(), 1u) << describe(events);
  EXPECT_EQ(events[0].kind, EventKind::stalled_updates);
  EXPECT_EQ(events[0].step, 200);
  EXPECT_EQ(events[0].param, "fc1.weight");
  EXPECT_EQ(events[0].value, 1e-9);
  EXPECT_EQ(events[0].threshold, 1e-7);
  EXPECT_NE(events[0].suggestion.find("2^-11"), std::string::npos) << events[0].suggestion;
}

TEST(Detectors, StalledNearMissesDoNotFire) {
  EXPECT_TRUE(stall_events(1e-5).empty());
  EXPECT_TRUE(stall_events(1e-9, 100).empty()) << "within the first 10 * every steps";
  EXPECT_TRUE(stall_events(nan).empty()) << "NaN: the weight's norm is 0";
  EXPECT_TRUE(stall_events(0.0, 200, true).empty()) << "a skipped step changes nothing";
  EXPECT_EQ(stall_events(1e-9, 150).size(), 1u) << "five logged steps after the warmup";
  EXPECT_TRUE(stall_events(1e-9, 140).empty()) << "four logged steps after the warmup";
  EXPECT_TRUE(stall_events(1e-9, 200, false, 2).empty()) << "two records (an lr schedule's last steps)";
}

// --- moment_lag ----------------------------------------------------------------

// Healthy (RMS of g^2 / v at 1) until step 100; the record at step 110
// carries `rms` for fc1.weight (skipped when `skipped`).
std::vector<Event> lag_events(double rms, bool skipped = false, std::int64_t at = 110) {
  Feed run;
  run.params[0].v_ratio_rms = 1.0;
  run.steps(1, at - 10, [](std::int64_t s) { return sample(s, 2.0); });
  run.params[0].v_ratio_rms = rms;
  run.steps(at - 9, at, [&](std::int64_t s) {
    StepSample x = sample(s, 2.0);
    x.skipped = skipped && s == at;
    return x;
  });
  return run.events;
}

TEST(Detectors, MomentLagAboveFourFiresNamingTheParameter) {
  const std::vector<Event> events = lag_events(6.5);
  ASSERT_EQ(events.size(), 1u) << describe(events);
  EXPECT_EQ(events[0].kind, EventKind::moment_lag);
  EXPECT_EQ(events[0].step, 110);
  EXPECT_EQ(events[0].param, "fc1.weight");
  EXPECT_EQ(events[0].value, 6.5);
  EXPECT_EQ(events[0].threshold, 4.0);
  EXPECT_NE(events[0].suggestion.find("update_clipping"), std::string::npos) << events[0].suggestion;
  EXPECT_STREQ(to_string(EventKind::moment_lag), "moment_lag");
}

TEST(Detectors, MomentLagNearMissesDoNotFire) {
  EXPECT_TRUE(lag_events(3.9).empty()) << "under the threshold";
  EXPECT_TRUE(lag_events(nan).empty()) << "not computed (device, SGD)";
  EXPECT_TRUE(lag_events(9.0, true).empty()) << "a skipped step";
  EXPECT_TRUE(lag_events(9.0, false, 20).empty()) << "within the first 2 * every steps";
  DetectorOptions o;
  o.moment_lag_rms = 0;
  expect_error([&] { o.validate(); }, {"moment_lag_rms = 0"});
}

// --- update_jump ---------------------------------------------------------------

// fc2.weight's update ratio at logged step `step` of a healthy-looking run:
// 1e-3 times a factor in [0.7, 1.4] that cycles over 7 records (the
// healthy MLP runs' ratio to the median of their last 10 stayed at or
// under 2.01), times `trend` per record (an lr schedule).
double healthy_ratio(std::int64_t step, double trend = 1.0) {
  static const double wiggle[7] = {1.0, 0.7, 1.4, 0.85, 1.2, 0.75, 1.3};
  const std::int64_t record = step / 10;
  return 1e-3 * wiggle[record % 7] * std::pow(trend, static_cast<double>(record));
}

// Records every 10 steps to `last`; fc2.weight's ratio is healthy_ratio
// but at the record of step `at`, where it is `jump` times 1e-3 (skipped
// when `skipped`). A loss spike at step `spike` (0: none).
std::vector<Event> jump_events(double jump, std::int64_t at = 300, std::int64_t last = 400, bool skipped = false,
                               double trend = 1.0, std::int64_t spike = 0) {
  Feed run;
  for (std::int64_t first = 1; first <= last; first += 10) {
    const std::int64_t logged = first + 9;
    run.params[2].update_ratio = logged == at ? jump : healthy_ratio(logged, trend);
    run.steps(first, logged, [&](std::int64_t s) {
      StepSample x = sample(s, s == spike ? 9.0 : 2.0 + 0.01 * static_cast<double>(s % 3));
      x.skipped = skipped && s == at;
      return x;
    });
  }
  return run.events;
}

TEST(Detectors, UpdateJumpEightfoldFiresAheadOfTheSpikeItPrecedes) {
  // The precursor of docs/monitor.md's scenario (d): the update ratio 8x
  // its recent median, the loss spike 30 steps later.
  const std::vector<Event> events = jump_events(8e-3, 300, 400, false, 1.0, 330);
  ASSERT_EQ(events.size(), 2u) << describe(events);
  EXPECT_EQ(events[0].kind, EventKind::update_jump);
  EXPECT_EQ(events[0].step, 300);
  EXPECT_EQ(events[0].param, "fc2.weight");
  EXPECT_EQ(events[0].value, 8e-3);
  // The median of the 10 records before step 300 (steps 200-290):
  // wiggle[6, 0, 1, 2, 3, 4, 5, 6, 0, 1], whose middle pair is 1.0 and 1.0.
  EXPECT_DOUBLE_EQ(events[0].threshold, 4e-3);
  EXPECT_NE(events[0].suggestion.find("update_clipping"), std::string::npos) << events[0].suggestion;
  EXPECT_EQ(events[1].kind, EventKind::loss_spike);
  EXPECT_EQ(events[1].step, 330);
  EXPECT_STREQ(to_string(EventKind::update_jump), "update_jump");
}

TEST(Detectors, UpdateJumpHealthyLookingSequencesDoNotFire) {
  EXPECT_TRUE(jump_events(healthy_ratio(300), 300, 2000).empty()) << "noise within 0.7-1.4x, 200 records";
  EXPECT_TRUE(jump_events(healthy_ratio(300), 300, 2000, false, 0.98).empty()) << "a decaying lr";
  EXPECT_TRUE(jump_events(healthy_ratio(300), 300, 1000, false, 1.05).empty()) << "a warmup: x1.05 a record";
  EXPECT_TRUE(jump_events(3.9e-3).empty()) << "3.9x the median 1e-3: under the factor 4";
  EXPECT_TRUE(jump_events(nan).empty()) << "NaN (a weight of norm 0)";
  EXPECT_TRUE(jump_events(9e-3, 300, 400, true).empty()) << "a skipped step moved nothing";
  EXPECT_TRUE(jump_events(9e-3, 200).empty()) << "within the first 20 * every steps";
  EXPECT_EQ(jump_events(9e-3, 210).size(), 1u) << "the first record after the warmup";
  DetectorOptions o;
  o.update_jump_factor = 1;
  expect_error([&] { o.validate(); }, {"update_jump_factor = 1"});
  o = DetectorOptions{};
  o.update_jump_records = 2;
  expect_error([&] { o.validate(); }, {"update_jump_records = 2"});
}

TEST(Detectors, UpdateJumpHistoryIsKeptInTheState) {
  // Detectors restored from a state taken at step 290 fire at step 300 as
  // the ones that ran on; ones that start fresh there have no history.
  RunInfo info = make_info();
  auto feed = [&](Detectors& d, std::int64_t first, std::int64_t last) {
    std::vector<Event> found;
    for (std::int64_t f = first; f <= last; f += 10) {
      LogRecord r;
      for (std::int64_t s = f; s < f + 10; ++s) r.steps.push_back(sample(s, 2.0));
      for (const ParamInfo& p : info.params) {
        ParamSample x;
        x.update_ratio = 1e-3;
        x.hist = hist(p.numel, 0.0);
        r.params.push_back(x);
      }
      r.params[2].update_ratio = f + 9 == 300 ? 8e-3 : healthy_ratio(f + 9);
      const std::vector<Event> e = d.observe(r);
      found.insert(found.end(), e.begin(), e.end());
    }
    return found;
  };
  Detectors a(info, DetectorOptions{});
  feed(a, 1, 290);
  Detectors b(info, DetectorOptions{});
  b.restore(a.state());
  Detectors fresh(info, DetectorOptions{});
  nlohmann::json old = a.state();
  old.erase("update_history");  // a state saved before update_jump existed
  fresh.restore(old);
  const std::vector<Event> ea = feed(a, 291, 300), eb = feed(b, 291, 300), ef = feed(fresh, 291, 300);
  ASSERT_EQ(ea.size(), 1u) << describe(ea);
  ASSERT_EQ(eb.size(), 1u) << describe(eb);
  EXPECT_EQ(eb[0].step, ea[0].step);
  EXPECT_EQ(eb[0].threshold, ea[0].threshold);
  EXPECT_TRUE(ef.empty()) << describe(ef);
}

// --- repeated_overflow -------------------------------------------------------

std::vector<Event> overflow_events(const std::vector<std::int64_t>& at) {
  Feed run;
  run.steps(1, 400, [&](std::int64_t s) {
    StepSample x = sample(s, 2.0);
    if (std::find(at.begin(), at.end(), s) != at.end()) {
      x.skipped = true;
      x.grad_norm = inf;
      x.nonfinite_params = {2};
    }
    return x;
  });
  return run.events;
}

TEST(Detectors, ParameterNonfiniteThreeTimesFiresNamingIt) {
  const std::vector<Event> events = overflow_events({30, 90, 150});
  ASSERT_EQ(events.size(), 1u) << describe(events);
  EXPECT_EQ(events[0].kind, EventKind::repeated_overflow);
  EXPECT_EQ(events[0].step, 150);
  EXPECT_EQ(events[0].param, "fc2.weight");
  EXPECT_EQ(events[0].value, 3.0);
  EXPECT_EQ(events[0].threshold, 3.0);
  EXPECT_NE(events[0].message.find("fc2.weight"), std::string::npos);
  expect_complete(events[0]);
}

TEST(Detectors, ParameterNonfiniteTwiceOrSpreadOutDoesNotFire) {
  std::vector<Event> events = overflow_events({30, 90});
  EXPECT_TRUE(events.empty()) << describe(events);
  events = overflow_events({30, 150, 260});  // never three within 200 steps
  EXPECT_TRUE(events.empty()) << describe(events);
}

// --- the rate limit ----------------------------------------------------------

TEST(Detectors, AnEventRepeatsOncePerRepeatInterval) {
  Feed run;
  run.steps(1, 2500, [](std::int64_t s) { return sample(s, nan); });
  std::vector<std::int64_t> steps;
  for (const Event& e : run.events) steps.push_back(e.step);
  EXPECT_EQ(steps, (std::vector<std::int64_t>{1, 1001, 2001})) << describe(run.events);
  EXPECT_EQ(run.det.events().size(), 3u);

  DetectorOptions o;
  o.repeat_interval = 100;
  Feed often(make_info(), o);
  often.steps(1, 2500, [](std::int64_t s) { return sample(s, nan); });
  EXPECT_EQ(often.events.size(), 25u);
}

// The limit is per (kind, parameter): two stalled parameters both fire.
TEST(Detectors, TheRateLimitIsPerKindAndParameter) {
  Feed run;
  run.steps(1, 190, [](std::int64_t s) { return sample(s, 2.0); });
  run.params[0].update_ratio = 1e-9;
  run.params[2].update_ratio = 1e-9;
  run.steps(191, 400, [](std::int64_t s) { return sample(s, 2.0); });
  ASSERT_EQ(run.events.size(), 2u) << describe(run.events);
  EXPECT_EQ(run.events[0].param, "fc1.weight");
  EXPECT_EQ(run.events[1].param, "fc2.weight");
}

// --- status line -------------------------------------------------------------

TEST(Detectors, StatusLine) {
  RunInfo info = make_info();
  // The cut at 59 characters falls inside the first "é": it goes before it.
  info.params[2].name = std::string(25, 'x') + "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9" + std::string(40, 'y');
  Feed run(info);
  EXPECT_EQ(run.det.status_line(), "monitor ok");
  run.steps(1, 10, [](std::int64_t s) { return sample(s, s == 5 ? nan : 2.0); });
  EXPECT_EQ(run.det.status_line(), "monitor: 1 event (nonfinite_loss)");
  run.params[0].hist = draining(5000, 0.5);
  run.steps(11, 20, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_EQ(run.det.status_line(), "monitor: 2 events (underflow fc1.weight)");
  run.params[0].hist = hist(5000, 0.0);
  run.params[2].hist = draining(2000, 0.5);
  run.steps(21, 30, [](std::int64_t s) { return sample(s, 2.0); });
  const std::string line = run.det.status_line();
  EXPECT_LT(line.size(), 60u) << line;
  EXPECT_EQ(line.rfind("monitor: 3 events (underflow xxx", 0), 0u) << line;
  EXPECT_EQ(line, "monitor: 3 events (underflow " + std::string(25, 'x') + "...)");
}

// --- checks ------------------------------------------------------------------

TEST(Detectors, OptionsAreValidated) {
  DetectorOptions{}.validate();
  struct Case {
    std::function<void(DetectorOptions&)> set;
    const char* fragment;
  };
  const std::vector<Case> cases = {
      {[](DetectorOptions& o) { o.min_samples = 2; }, "min_samples = 2"},
      {[](DetectorOptions& o) { o.loss_window = 10; }, "loss_window = 10"},
      {[](DetectorOptions& o) { o.loss_z = -1; }, "loss_z = -1"},
      {[](DetectorOptions& o) { o.loss_z = nan; }, "loss_z = nan"},
      {[](DetectorOptions& o) { o.grad_norm_factor = 1; }, "grad_norm_factor = 1"},
      {[](DetectorOptions& o) { o.grad_norm_window = 5; }, "grad_norm_window = 5"},
      {[](DetectorOptions& o) { o.collapse_scale = -1; }, "collapse_scale = -1"},
      {[](DetectorOptions& o) { o.backoff_count = 0; }, "backoff_count = 0"},
      {[](DetectorOptions& o) { o.backoff_window = 0; }, "backoff_window = 0"},
      {[](DetectorOptions& o) { o.underflow_share = 0; }, "underflow_share = 0"},
      {[](DetectorOptions& o) { o.underflow_share = 1.5; }, "underflow_share = 1.5"},
      {[](DetectorOptions& o) { o.underflow_subnormal = -0.1; }, "underflow_subnormal = -0.1"},
      {[](DetectorOptions& o) { o.underflow_subnormal = 1.5; }, "underflow_subnormal = 1.5"},
      {[](DetectorOptions& o) { o.underflow_min_numel = -1; }, "underflow_min_numel = -1"},
      {[](DetectorOptions& o) { o.stall_ratio = -1e-7; }, "stall_ratio = -1e-07"},
      {[](DetectorOptions& o) { o.stall_warmup_records = -1; }, "stall_warmup_records = -1"},
      {[](DetectorOptions& o) { o.overflow_repeats = 0; }, "overflow_repeats = 0"},
      {[](DetectorOptions& o) { o.overflow_window = 0; }, "overflow_window = 0"},
      {[](DetectorOptions& o) { o.trend_window = 10; }, "trend_window = 10"},
      {[](DetectorOptions& o) { o.underflow_trend_records = 1; }, "underflow_trend_records = 1"},
      {[](DetectorOptions& o) { o.diverge_sigmas = -1; }, "diverge_sigmas = -1"},
      {[](DetectorOptions& o) { o.diverge_rise = inf; }, "diverge_rise = inf"},
      {[](DetectorOptions& o) { o.repeat_interval = 0; }, "repeat_interval = 0"},
  };
  for (const Case& c : cases) {
    DetectorOptions o;
    c.set(o);
    expect_error([&] { Detectors d(make_info(), o); }, {"DetectorOptions: ", c.fragment});
  }
}

TEST(Detectors, RunInfoIsValidated) {
  RunInfo info = make_info();
  info.every = 0;
  expect_error([&] { Detectors d(info); }, {"info.every = 0"});
  info = make_info();
  info.min_scale = -1;
  expect_error([&] { Detectors d(info); }, {"info.min_scale = -1"});
  info = make_info();
  info.scaling = "auto";
  expect_error([&] { Detectors d(info); }, {"info.scaling = \"auto\""});
  info = make_info();
  info.params[1].dtype = "fp16";
  expect_error([&] { Detectors d(info); }, {"info.params[1].dtype = \"fp16\"", "fc1.bias"});
  info = make_info();
  info.params[2].name = "";
  expect_error([&] { Detectors d(info); }, {"info.params[2].name is empty"});
  info = make_info();
  info.params[0].numel = -5;
  expect_error([&] { Detectors d(info); }, {"info.params[0].numel = -5"});
}

TEST(Detectors, BadRecordsAreRefusedBeforeAnythingChanges) {
  Feed run;
  run.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0); });
  LogRecord r;
  r.params = run.params;
  expect_error([&] { run.det.observe(r); }, {"Detectors::observe: the record has no steps"});
  r.steps = {sample(11, nan), sample(12, 2.0)};
  r.params.pop_back();
  expect_error([&] { run.det.observe(r); }, {"2 parameter samples, the run has 3"});
  r.params = run.params;
  r.steps = {sample(11, nan), sample(11, 2.0)};
  expect_error([&] { run.det.observe(r); }, {"steps[1].step = 11, must be > 11"});
  r.steps = {sample(10, nan)};
  expect_error([&] { run.det.observe(r); }, {"steps[0].step = 10, must be > 10"});
  r.steps = {sample(11, nan), sample(12, 2.0)};
  r.steps[1].nonfinite_params = {3};
  expect_error([&] { run.det.observe(r); }, {"steps[1].nonfinite_params holds 3, must be in [0, 3)"});
  // None of those left a trace: the NaN at step 11 still fires.
  EXPECT_EQ(run.det.last_step(), 10);
  EXPECT_TRUE(run.det.events().empty());
  r.steps[1].nonfinite_params.clear();
  const std::vector<Event> events = run.det.observe(r);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].step, 11);
}

// --- forecasts ---------------------------------------------------------------

TEST(Forecast, AbsentBeforeTheFirstRecord) {
  const Detectors det(make_info());
  const Forecast f = det.forecast();
  EXPECT_EQ(f.step, 0);
  EXPECT_TRUE(std::isnan(f.steps_to_min_scale));
  EXPECT_TRUE(std::isnan(f.steps_to_underflow));
  EXPECT_TRUE(std::isnan(f.loss_slope));
  EXPECT_FALSE(f.diverging);
}

// log2(scale) = 16 - (s - 1) / 100: a halving every 100 steps, exactly
// linear. At step 200 log2(scale) = 16 - 1.99 = 14.01; at 1/100 per step the
// scale reaches min_scale = 1 (log2 = 0) in 14.01 * 100 = 1401 steps.
TEST(Forecast, StepsToMinScaleOnASteadyDecline) {
  Feed run;
  run.steps(1, 200, [](std::int64_t s) {
    return sample(s, 2.0, std::exp2(16.0 - static_cast<double>(s - 1) / 100.0));
  });
  const Forecast f = run.det.forecast();
  EXPECT_EQ(f.step, 200);
  EXPECT_NEAR(f.steps_to_min_scale, 1401.0, 1e-6);
}

// The scaler's staircase: 2^16 on steps 1..100, 2^15 on 101..200. Over
// x = 1..200 with y = 0, then -1: Sxx = n (n^2 - 1) / 12 = 666650 and
// Sxy = -sum_{x=101..200} (x - 100.5) = -5000, so the slope is -5000/666650
// (shallower than the mean rate 1/100: one stair in view) and the 15 halvings
// left take 15 * 666650 / 5000 = 1999.95 steps.
TEST(Forecast, StepsToMinScaleOnTheScalersStaircase) {
  Feed run;
  run.steps(1, 200, [](std::int64_t s) { return sample(s, 2.0, s <= 100 ? 65536.0 : 32768.0); });
  EXPECT_NEAR(run.det.forecast().steps_to_min_scale, 1999.95, 1e-6);
}

TEST(Forecast, NoStepsToMinScaleWhenTheScaleHoldsOrGrowsOrIsStatic) {
  Feed steady;
  steady.steps(1, 200, [](std::int64_t s) { return sample(s, 2.0); });
  EXPECT_TRUE(std::isnan(steady.det.forecast().steps_to_min_scale));
  Feed growing;
  growing.steps(1, 200, [](std::int64_t s) { return sample(s, 2.0, s <= 100 ? 32768.0 : 65536.0); });
  EXPECT_TRUE(std::isnan(growing.det.forecast().steps_to_min_scale));
  RunInfo info = make_info();
  info.scaling = "static";
  Feed fixed(info);
  fixed.steps(1, 200, [](std::int64_t s) { return sample(s, 2.0, s <= 100 ? 65536.0 : 32768.0); });
  EXPECT_TRUE(std::isnan(fixed.det.forecast().steps_to_min_scale));
  Feed at_min;
  at_min.steps(1, 20, [](std::int64_t s) { return sample(s, 2.0, 1.0); });
  EXPECT_EQ(at_min.det.forecast().steps_to_min_scale, 0.0);
}

// Every parameter's share (so the model's) is 0.05 at step 10, 0.10 at 20,
// 0.15 at 30: 0.005 per step. From 0.15 the threshold 0.25 is 0.10 away:
// 20 steps, i.e. at step 50, where it is reached (forecast 0, an event).
// Gradients shrinking by a factor 2 every 10 steps: each record spreads
// every parameter evenly over the 4 binades [2^E, 2^(E+4)) with E = -16 - k
// at step 10 k. The 0.25-quantile of the magnitudes is then 2^(E+1), which
// drops under 2^-24 (the share reaching 0.25) at k = 9, step 90; from any
// record k the forecast is 10 (9 - k) steps.
TEST(Forecast, StepsToUnderflowFollowTheShrinkingGradients) {
  auto spread = [](std::int64_t numel, int e) {
    Histogram h{};
    for (int b = 0; b < 4; ++b) h[static_cast<std::size_t>(e + b + 46)] = static_cast<std::uint64_t>(numel / 4);
    return h;
  };
  Feed run;
  for (int k = 1; k <= 9; ++k) {
    for (std::size_t i = 0; i < run.params.size(); ++i) run.params[i].hist = spread(run.info.params[i].numel, -16 - k);
    run.steps(10 * k - 9, 10 * k, [](std::int64_t s) { return sample(s, 2.0); });
    const Forecast f = run.det.forecast();
    if (k == 1) {
      EXPECT_TRUE(std::isnan(f.steps_to_underflow)) << "one record: no trend";
    } else {
      EXPECT_NEAR(f.steps_to_underflow, 10.0 * (9 - k), 1e-9) << "step " << 10 * k;
    }
  }
  ASSERT_EQ(run.of(EventKind::underflow).size(), 1u) << describe(run.events);
  EXPECT_EQ(run.of(EventKind::underflow)[0].step, 90);

  // Growing gradients: no crossing ahead.
  Feed growing;
  for (int k = 1; k <= 3; ++k) {
    for (std::size_t i = 0; i < growing.params.size(); ++i) {
      growing.params[i].hist = spread(growing.info.params[i].numel, -20 + k);
    }
    growing.steps(10 * k - 9, 10 * k, [](std::int64_t s) { return sample(s, 2.0); });
  }
  EXPECT_TRUE(std::isnan(growing.det.forecast().steps_to_underflow));
}

// Dead units: every parameter's zeros jump from 20% to 84% after the first
// record, over the share the detector fires at (the lowest, 0.20, plus
// 0.15), but the kept values are normal. When they stay where they are, no
// forecast (the detector would say 0 before it asked for subnormals). When
// they shrink by one binade per record, spread over 4 binades [2^E,
// 2^(E+4)) with E = -8 - k at record k, their median (the
// underflow_subnormal = 0.5 quantile) is 2^(E+2) and reaches 2^-14, half of
// them subnormal, at k = 8 (step 90): the forecast from record k is
// 10 (8 - k) steps, and the event comes at step 90.
TEST(Forecast, StepsToUnderflowWaitForTheKeptValuesWhenZerosAreOverTheShare) {
  auto record = [](Feed& run, int k, double zeros, int e) {
    for (std::size_t i = 0; i < run.params.size(); ++i) {
      const std::int64_t n = run.info.params[i].numel;
      run.params[i].hist = spread_fp16(n, std::llround(zeros * static_cast<double>(n)), e, e + 4);
    }
    run.steps(10 * k + 1, 10 * k + 10, [](std::int64_t s) { return sample(s, 2.0); });
  };
  Feed still;
  record(still, 0, 0.2, -8);
  for (int k = 1; k <= 10; ++k) {
    record(still, k, 0.84, -8);
    EXPECT_TRUE(std::isnan(still.det.forecast().steps_to_underflow)) << "step " << 10 * k + 10;
  }
  EXPECT_TRUE(still.of(EventKind::underflow).empty()) << describe(still.events);

  Feed shrinking;
  record(shrinking, 0, 0.2, -8);
  for (int k = 1; k <= 8; ++k) {
    record(shrinking, k, 0.84, -8 - k);
    EXPECT_NEAR(shrinking.det.forecast().steps_to_underflow, 10.0 * (8 - k), 1e-9) << "step " << 10 * k + 10;
  }
  const std::vector<Event> under = shrinking.of(EventKind::underflow);
  ASSERT_EQ(under.size(), 1u) << describe(shrinking.events);
  EXPECT_EQ(under[0].step, 90);
  EXPECT_EQ(under[0].param, "fc1.weight");
}

TEST(Forecast, ALossRisingOutOfItsNoiseIsDiverging) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<double> noise(-0.02, 0.02);
  Feed run;
  run.steps(1, 200, [&](std::int64_t s) { return sample(s, 3.0 + 0.01 * static_cast<double>(s) + noise(rng)); });
  const Forecast f = run.det.forecast();
  EXPECT_TRUE(f.diverging);
  EXPECT_NEAR(f.loss_slope, 0.01, 1e-3);
}

TEST(Forecast, AFallingLossIsNotDiverging) {
  Feed run;
  run.steps(1, 200, [](std::int64_t s) { return sample(s, 5.0 - 0.002 * static_cast<double>(s)); });
  const Forecast f = run.det.forecast();
  EXPECT_FALSE(f.diverging);
  EXPECT_NEAR(f.loss_slope, -0.002, 1e-12);
}

TEST(Forecast, SmallOrNoisyRisesAreNotDiverging) {
  // A clean creep of 0.2 on a loss of 100: significant, but 0.2% of it.
  Feed creep;
  creep.steps(1, 200, [](std::int64_t s) { return sample(s, 100.0 + 0.001 * static_cast<double>(s)); });
  EXPECT_FALSE(creep.det.forecast().diverging);
  EXPECT_NEAR(creep.det.forecast().loss_slope, 0.001, 1e-9);
  // A rise of 0.4 (over 10% of the mean 2.2) under noise of +-1 (residual
  // sd ~0.58): it does not stand out of the scatter.
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> noise(-1.0, 1.0);
  Feed noisy;
  noisy.steps(1, 200, [&](std::int64_t s) { return sample(s, 2.0 + 0.002 * static_cast<double>(s) + noise(rng)); });
  EXPECT_FALSE(noisy.det.forecast().diverging);
  // Too few losses to judge a trend.
  Feed early;
  early.steps(1, 10, [](std::int64_t s) { return sample(s, 2.0 + 0.1 * static_cast<double>(s)); });
  EXPECT_FALSE(early.det.forecast().diverging);
  EXPECT_NEAR(early.det.forecast().loss_slope, 0.1, 1e-12);
}

TEST(Forecast, ANonfiniteLastLossIsDiverging) {
  Feed run;
  run.steps(1, 50, [](std::int64_t s) { return sample(s, s == 50 ? nan : 2.0); });
  EXPECT_TRUE(run.det.forecast().diverging);
  EXPECT_EQ(run.det.forecast().loss_slope, 0.0);  // over the finite losses
}

// --- JSONL -------------------------------------------------------------------

TEST(Jsonl, NumbersAreShortAndReadBackExactly) {
  const std::vector<double> values = {0.1,  1.0 / 3.0, 65536, 1e-300, 5e-324, std::numeric_limits<double>::max(),
                                      -0.0, -2.5,      1e21,  1e-5,   1234567.890123456789,
                                      static_cast<double>(std::numeric_limits<float>::min())};
  for (double x : values) {
    for (const std::string& s : {detail::json_double(x), detail::json_double_printf(x)}) {
      EXPECT_EQ(std::strtod(s.c_str(), nullptr), x) << s;
      EXPECT_EQ(std::signbit(std::strtod(s.c_str(), nullptr)), std::signbit(x)) << s;
      EXPECT_EQ(s.find_first_not_of("0123456789.-+e"), std::string::npos) << s;
    }
  }
  EXPECT_EQ(detail::json_double(0.1), "0.1");
  EXPECT_EQ(detail::json_double(65536), "65536");
  EXPECT_EQ(detail::json_double_printf(0.1), "0.1");
  EXPECT_EQ(detail::json_double_printf(65536), "65536");
  std::string out;
  detail::json_append_number(out, nan);
  out += ' ';
  detail::json_append_number(out, inf);
  out += ' ';
  detail::json_append_number(out, -inf);
  out += ' ';
  detail::json_append_optional(out, nan);
  out += ' ';
  detail::json_append_optional(out, inf);
  EXPECT_EQ(out, "\"nan\" \"inf\" \"-inf\" null \"inf\"");
}

TEST(Jsonl, StringsAreEscaped) {
  std::string out;
  detail::json_append_string(out, std::string("a\"b\\c\nd\te\x01\x1f\x7f\xc3\xa9|\xff|\xe2\x82|\xed\xa0\x80"));
  // Well-formed UTF-8 (é) stays; a stray byte, a truncated sequence and an
  // encoded surrogate become U+FFFD, one per byte.
  EXPECT_EQ(out, "\"a\\\"b\\\\c\\nd\\te\\u0001\\u001f\x7f\xc3\xa9|\\ufffd|\\ufffd\\ufffd|\\ufffd\\ufffd\\ufffd\"");
}

using test::temp_path;

// Runs /usr/bin/python3 on `script` with `arg`; returns its output and
// exit status. No Python means a failure, never a skip.
int run_python(const std::string& script, const std::string& arg, std::string& output) {
  const std::string path = temp_path("check.py");
  {
    std::ofstream out(path);
    out << script;
  }
  const std::string command = "/usr/bin/python3 '" + path + "' '" + arg + "' 2>&1";
  std::FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return -1;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) output.append(buf, n);
  const int status = ::pclose(pipe);
  std::remove(path.c_str());
  return status;
}

// What the Python check below expects, item by item.
RunInfo json_info() {
  RunInfo info = make_info();
  info.device = "cuda:0";
  info.min_scale = static_cast<double>(std::numeric_limits<float>::min());
  info.params[1].name = "odd\"name\\with\nnewline\x01";
  return info;
}

LogRecord json_record() {
  LogRecord r;
  r.steps = {sample(11, 2.5, 65536, 0.123456789), sample(12, nan, 32768, inf)};
  r.steps[1].skipped = true;
  r.steps[1].nonfinite_params = {1, 2};
  ParamSample a;
  a.grad_norm = 0.51;
  a.update_ratio = 3.1e-4;
  a.eps_share = 0.02;
  a.v_ratio_rms = 1.25;
  a.lost_update_share = 0.5;
  a.hist[Bins::zero] = 10;
  a.hist[static_cast<std::size_t>(Bins::of(std::ldexp(1.0f, -20)))] = 30;  // fp16 subnormal
  a.hist[static_cast<std::size_t>(Bins::of(0.5f))] = 50;
  a.hist[Bins::nonfinite] = 10;
  ParamSample b;
  b.update_ratio = nan;  // a weight of norm 0
  b.nonfinite = true;
  ParamSample c;  // eps_share NaN (SGD): null
  c.hist[static_cast<std::size_t>(Bins::of(1.0f))] = 7;
  r.params = {a, b, c};
  return r;
}

const char* const json_check = R"PY(
import json, sys

def bare(c):
    raise ValueError("bare non-finite constant " + c)

text = open(sys.argv[1], encoding="utf-8").read()
assert text.endswith("\n"), "the last line has no newline"
lines = text[:-1].split("\n")
assert len(lines) == 3, len(lines)
h, r, d = [json.loads(line, parse_constant=bare) for line in lines]

assert set(h) == {"type", "schema", "optimizer", "device", "scaling", "init_scale", "min_scale", "max_scale",
                  "every", "bins", "params"}, sorted(h)
assert h["type"] == "header" and h["schema"] == "mixprec.monitor/1"
assert (h["optimizer"], h["device"], h["scaling"]) == ("AdamW", "cuda:0", "dynamic")
assert h["init_scale"] == 65536 and h["max_scale"] == "inf" and h["every"] == 10
assert h["min_scale"] == 2.0 ** -126, h["min_scale"]
assert h["bins"] == {"count": 64, "zero": 0, "nonfinite": 63, "min_exponent": -45, "max_exponent": 16,
                     "offset": 46}, h["bins"]
assert h["params"] == [{"name": "fc1.weight", "numel": 5000, "dtype": "float16"},
                       {"name": "odd\"name\\with\nnewline\x01", "numel": 100, "dtype": "float16"},
                       {"name": "fc2.weight", "numel": 2000, "dtype": "float16"}], h["params"]

assert set(r) == {"type", "step", "steps", "params", "overall", "forecast", "events"}, sorted(r)
assert r["type"] == "log" and r["step"] == 12
assert r["steps"] == {"first": 11, "loss": [2.5, "nan"], "scale": [65536, 32768], "skipped": [0, 1],
                      "grad_norm": [0.123456789, "inf"], "nonfinite_params": [[], [1, 2]]}, r["steps"]
a, b, c = r["params"]
for p in (a, b, c):
    assert set(p) == {"grad_norm", "update_ratio", "eps_share", "v_ratio_rms", "lost_update_share", "nonfinite",
                      "underflow", "subnormal", "overflow", "hist"}, sorted(p)
    assert len(p["hist"]) == 64 and all(type(n) is int for n in p["hist"])
assert (a["grad_norm"], a["update_ratio"], a["eps_share"], a["nonfinite"]) == (0.51, 3.1e-4, 0.02, False)
assert (a["underflow"], a["subnormal"], a["overflow"]) == (0.1, 0.3, 0.1), a
assert a["hist"][0] == 10 and a["hist"][63] == 10 and a["hist"][-20 + 46] == 30 and sum(a["hist"]) == 100
assert (a["v_ratio_rms"], a["lost_update_share"]) == (1.25, 0.5), a
assert b["v_ratio_rms"] is None and b["lost_update_share"] is None
assert b["update_ratio"] == "nan" and b["nonfinite"] is True and b["eps_share"] is None
assert c["eps_share"] is None and c["hist"][46] == 7 and c["underflow"] == 0
assert b["underflow"] == 0 and sum(b["hist"]) == 0
o = r["overall"]
assert set(o) == {"underflow", "subnormal", "overflow", "hist"}
assert o["hist"] == [x + y + z for x, y, z in zip(a["hist"], b["hist"], c["hist"])]
assert o["underflow"] == 10 / 107 and o["subnormal"] == 30 / 107 and o["overflow"] == 10 / 107, o
assert r["forecast"] == {"steps_to_min_scale": None, "steps_to_underflow": 20, "loss_slope": -0.002,
                         "diverging": True}, r["forecast"]
e0, e1 = r["events"]
assert e0 == {"kind": "nonfinite_loss", "step": 12, "param": None, "value": "nan", "threshold": "nan",
              "message": "the loss is nan", "suggestion": "fp32"}, e0
assert e1["kind"] == "repeated_overflow" and e1["param"] == "odd\"name\\with\nnewline\x01"
assert e1["message"] == "tab\there \"quoted\" back\\slash \u00e9", e1["message"]
assert (e1["value"], e1["threshold"]) == (3, 3)

assert d["type"] == "log" and d["step"] == 20 and d["steps"]["first"] == 11
assert len(d["steps"]["loss"]) == 10 and d["steps"]["loss"][3] == "nan"
assert [e["kind"] for e in d["events"]] == ["nonfinite_loss"] and d["events"][0]["param"] is None
assert d["params"][1]["eps_share"] == 0.01
print("OK")
)PY";

TEST(Jsonl, LinesParseBackInPython) {
  const RunInfo info = json_info();
  const LogRecord r = json_record();
  Forecast f;
  f.step = 12;
  f.steps_to_underflow = 20;
  f.loss_slope = -0.002;
  f.diverging = true;
  Event e0;
  e0.kind = EventKind::nonfinite_loss;
  e0.step = 12;
  e0.value = nan;
  e0.threshold = nan;
  e0.message = "the loss is nan";
  e0.suggestion = "fp32";
  Event e1;
  e1.kind = EventKind::repeated_overflow;
  e1.step = 12;
  e1.param = info.params[1].name;
  e1.value = 3;
  e1.threshold = 3;
  e1.message = "tab\there \"quoted\" back\\slash \xc3\xa9";
  e1.suggestion = "-";

  // A record from the detectors themselves, as a trainer would write it.
  Detectors det(info);
  LogRecord from_run;
  for (std::int64_t s = 11; s <= 20; ++s) from_run.steps.push_back(sample(s, s == 14 ? nan : 2.0));
  for (std::size_t i = 0; i < info.params.size(); ++i) {
    ParamSample p;
    p.eps_share = 0.01;
    p.hist = hist(info.params[i].numel, 0.0);
    from_run.params.push_back(p);
  }
  const std::vector<Event> found = det.observe(from_run);

  const std::string path = temp_path("monitor.jsonl");
  {
    JsonlWriter w(path);
    w.write(header_json(info));
    w.write(record_json(info, r, f, {e0, e1}));
    w.write(record_json(info, from_run, det.forecast(), found));
  }
  std::string output;
  const int status = run_python(json_check, path, output);
  EXPECT_EQ(status, 0) << "/usr/bin/python3 failed (python3 is required):\n" << output;
  EXPECT_EQ(output, "OK\n");
  std::remove(path.c_str());
}

TEST(Jsonl, OneLineEachWithoutNewlines) {
  const RunInfo info = json_info();
  const std::string header = header_json(info);
  const std::string record = record_json(info, json_record(), Forecast{}, {});
  EXPECT_EQ(header.find('\n'), std::string::npos);
  EXPECT_EQ(record.find('\n'), std::string::npos);
  EXPECT_EQ(header.rfind("{\"type\": \"header\", \"schema\": \"mixprec.monitor/1\", ", 0), 0u) << header;
  EXPECT_NE(record.find("\"forecast\": {\"steps_to_min_scale\": null, \"steps_to_underflow\": null, "
                        "\"loss_slope\": null, \"diverging\": false}, \"events\": []}"),
            std::string::npos)
      << record;
}

TEST(Jsonl, RecordJsonChecksTheRecord) {
  const RunInfo info = json_info();
  LogRecord r = json_record();
  r.params.pop_back();
  expect_error([&] { record_json(info, r, Forecast{}, {}); }, {"record_json: the record has 2 parameter samples",
                                                             "the run has 3"});
  r.steps.clear();
  expect_error([&] { record_json(info, r, Forecast{}, {}); }, {"record_json: the record has no steps"});
}

TEST(Jsonl, WriterTruncatesAppendsAndFlushes) {
  const std::string path = temp_path("writer.jsonl");
  {
    JsonlWriter w(path);
    w.write("{\"old\": 1}");
  }
  JsonlWriter w(path);
  EXPECT_EQ(w.path(), path);
  w.write("{\"a\": 1}");
  w.write("{\"b\": 2}");
  std::ifstream in(path);  // readable before the writer closes: flushed
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_EQ(text.str(), "{\"a\": 1}\n{\"b\": 2}\n");
  expect_error([&] { w.write("{\"a\":\n1}"); }, {"JsonlWriter::write", "holds a newline at offset 5"});
  std::remove(path.c_str());
}

TEST(Jsonl, WriterNamesThePathAndTheReason) {
  expect_error([] { JsonlWriter w("/nonexistent-mixprec-dir/log.jsonl"); },
               {"JsonlWriter: cannot open \"/nonexistent-mixprec-dir/log.jsonl\" for writing: ",
                "No such file or directory"});
}

}  // namespace
}  // namespace mixprec::monitor
