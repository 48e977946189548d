// SPDX-License-Identifier: Apache-2.0
// The spike guard (amp/spike_guard.hpp) on the host: the rule against
// hand-computed z-scores, planted loss and gradient-norm spikes skipped and
// counted apart from overflow skips with the scale and every bit of the
// training state untouched, a healthy 10,000-step run that skips none, the
// option and snapshot checks, and a checkpointed run that resumes deciding
// as the uninterrupted one.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "mixprec/monitor/monitor.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using test::expect_error;

amp::SpikeGuardOptions small_guard() {
  amp::SpikeGuardOptions o;
  o.enabled = true;
  o.window = 8;
  o.warmup = 4;
  o.admit_after = 3;
  return o;
}

// --- the rule ----------------------------------------------------------------

struct Rule {
  amp::SpikeGuardOptions options = small_guard();
  amp::SpikeGuard guard{options};
};

TEST(SpikeGuardRule, ZScoreAgainstTheWindowWithoutTheNewValue) {
  Rule r;
  for (double v : {1.0, 2.0, 3.0, 4.0}) ASSERT_FALSE(r.guard.step(v, 10.0 * v, false));  // warm-up
  ASSERT_EQ(r.guard.state().count, 4);
  // Window {1, 2, 3, 4}: mean 2.5, sample sd sqrt(5 / 3) = 1.2909944...
  // (norms {10, 20, 30, 40}: mean 25, sd 12.909944...). 6 sd above the mean
  // is 10.2459667; below it the step passes, above it it is skipped.
  const double sd = std::sqrt(5.0 / 3.0);
  EXPECT_FALSE(r.guard.step(10.2, 25.0, false));
  EXPECT_NEAR(r.guard.state().loss_z, (10.2 - 2.5) / sd, 1e-12);
  EXPECT_NEAR(r.guard.state().grad_norm_z, 0.0, 1e-12);
  EXPECT_EQ(r.guard.state().count, 5);  // applied: it entered the window
  // Window now {1, 2, 3, 4, 10.2}: mean 4.04, sd 3.5486617...
  const double mean5 = (1 + 2 + 3 + 4 + 10.2) / 5;
  double ss = 0;
  for (double v : {1.0, 2.0, 3.0, 4.0, 10.2}) ss += (v - mean5) * (v - mean5);
  const double sd5 = std::sqrt(ss / 4);
  const double spike = mean5 + 6.5 * sd5;
  EXPECT_TRUE(r.guard.step(spike, 25.0, false));
  EXPECT_NEAR(r.guard.state().loss_z, 6.5, 1e-9);
  EXPECT_EQ(r.guard.state().reasons, amp::guard_loss);
  EXPECT_EQ(r.guard.state().count, 5) << "a skipped value stays out of the window";
  EXPECT_EQ(r.guard.skipped_steps(), 1);
  // A gradient-norm spike alone.
  const double norm_mean = (10 + 20 + 30 + 40 + 25) / 5.0;
  double nss = 0;
  for (double v : {10.0, 20.0, 30.0, 40.0, 25.0}) nss += (v - norm_mean) * (v - norm_mean);
  EXPECT_TRUE(r.guard.step(3.0, norm_mean + 7 * std::sqrt(nss / 4), false));
  EXPECT_EQ(r.guard.state().reasons, amp::guard_grad_norm);
  EXPECT_NEAR(r.guard.state().grad_norm_z, 7.0, 1e-9);
  EXPECT_EQ(r.guard.skipped_steps(), 2);
}

TEST(SpikeGuardRule, OneSidedWithASpreadOfAtLeastAThousandthOfTheMean) {
  Rule r;
  for (double v : {5.0, 6.0, 5.0, 6.0}) r.guard.step(v, v, false);
  EXPECT_FALSE(r.guard.step(-1000.0, -1000.0, false)) << "far below the window: harmless";
  EXPECT_LT(r.guard.state().loss_z, -100.0);
  // A constant window {2, 2, 2, 2} (norms {3, 3, 3, 3}): sd 0, taken as
  // 1e-3 x 2 = 0.002, so 6 sd above the mean is 2.012.
  Rule c;
  for (int i = 0; i < 4; ++i) c.guard.step(2.0, 3.0, false);
  EXPECT_FALSE(c.guard.step(2.011, 3.0, false));
  EXPECT_NEAR(c.guard.state().loss_z, 5.5, 1e-9);
  Rule d;
  for (int i = 0; i < 4; ++i) d.guard.step(2.0, 3.0, false);
  EXPECT_TRUE(d.guard.step(2.013, 3.0, false));
  EXPECT_NEAR(d.guard.state().loss_z, 6.5, 1e-9);
  // A window of zeros has no spread at all: nothing is judged.
  Rule z;
  for (int i = 0; i < 4; ++i) z.guard.step(0.0, 0.0, false);
  EXPECT_FALSE(z.guard.step(1e30, 1e30, false));
  EXPECT_EQ(z.guard.state().loss_z, 0.0);
}

TEST(SpikeGuardRule, WarmupActsOnlyOnNonFiniteValues) {
  Rule r;
  for (double v : {1.0, 2.0, 3.0}) ASSERT_FALSE(r.guard.step(v, v, false));
  EXPECT_FALSE(r.guard.step(1e9, 1e9, false)) << "3 values < warmup = 4: not judged";
  EXPECT_TRUE(std::isnan(r.guard.state().loss_z));
  EXPECT_EQ(r.guard.state().count, 4);
  Rule n;
  EXPECT_TRUE(n.guard.step(std::numeric_limits<double>::quiet_NaN(), 1.0, false));
  EXPECT_EQ(n.guard.state().reasons, amp::guard_loss);
  EXPECT_TRUE(n.guard.step(1.0, INFINITY, false));
  EXPECT_EQ(n.guard.state().reasons, amp::guard_grad_norm);
  EXPECT_EQ(n.guard.state().count, 0) << "non-finite values never enter the window";
}

TEST(SpikeGuardRule, ScalerSkipsAreNeitherJudgedNorRemembered) {
  Rule r;
  for (double v : {1.0, 2.0, 3.0, 4.0, 3.0}) r.guard.step(v, v, false);
  ASSERT_TRUE(r.guard.step(100.0, 1.0, false));  // streak 1
  const amp::SpikeGuardSnapshot before = r.guard.snapshot();
  EXPECT_FALSE(r.guard.step(1e9, INFINITY, true));
  const amp::SpikeGuardSnapshot after = r.guard.snapshot();
  EXPECT_EQ(after.state.count, before.state.count);
  EXPECT_EQ(after.state.next, before.state.next);
  EXPECT_EQ(after.state.streak, 1);
  EXPECT_EQ(after.state.skipped, 1);
  EXPECT_EQ(after.loss, before.loss);
  EXPECT_EQ(after.state.skip, 0);
}

TEST(SpikeGuardRule, ALastingLevelShiftIsLearnedAfterAdmitAfterSkips) {
  Rule r;
  for (int i = 0; i < 8; ++i) r.guard.step(1.0 + 0.01 * (i % 2), 1.0, false);  // full window, sd ~ 0.005
  ASSERT_EQ(r.guard.state().count, 8);
  // The loss jumps to 2 for good. Skips 1 and 2 stay out of the window; the
  // third and later enter it (admit_after = 3) until the window's spread
  // accepts the new level, after which every step is applied.
  std::vector<int> skipped;
  for (int i = 0; i < 20; ++i) skipped.push_back(r.guard.step(2.0, 1.0, false) ? 1 : 0);
  EXPECT_EQ(skipped[0], 1);
  EXPECT_EQ(skipped[1], 1);
  EXPECT_EQ(skipped[2], 1);
  EXPECT_EQ(skipped.back(), 0) << "still skipping after 20 steps of the new level";
  std::int64_t total = 0;
  for (int s : skipped) total += s;
  EXPECT_LE(total, 8);
  // The window took no value of skips 1 and 2: the applied step's value and
  // the admitted skips' are the only 2.0s it holds.
  const amp::SpikeGuardSnapshot snap = r.guard.snapshot();
  int twos = 0;
  for (double v : snap.loss) twos += v == 2.0;
  EXPECT_EQ(twos, std::min<std::int64_t>(8, 20 - 2));
}

TEST(SpikeGuardRule, LossNotJudgedNeedsNoLoss) {
  amp::SpikeGuardOptions o = small_guard();
  o.loss_threshold = INFINITY;
  amp::SpikeGuard g(o);
  for (double v : {1.0, 2.0, 3.0, 4.0}) g.step(std::numeric_limits<double>::quiet_NaN(), v, false);
  EXPECT_EQ(g.state().count, 4) << "a NaN loss is not looked at";
  EXPECT_FALSE(g.step(std::numeric_limits<double>::quiet_NaN(), 2.0, false));
  EXPECT_TRUE(std::isnan(g.state().loss_z));
}

// --- options and snapshots ---------------------------------------------------

TEST(SpikeGuardOptions, RejectedWithTheOptionAndItsValue) {
  auto make = [](auto tweak) {
    amp::GradScalerOptions o;
    o.spike_guard.enabled = true;
    tweak(o.spike_guard);
    amp::GradScaler s(o);
  };
  expect_error([&] { make([](auto& g) { g.window = 1; }); }, {"spike_guard.window = 1", "[2, 4096]"});
  expect_error([&] { make([](auto& g) { g.window = 5000; }); }, {"spike_guard.window = 5000"});
  expect_error([&] { make([](auto& g) { g.window = -3; }); }, {"spike_guard.window = -3"});
  expect_error([&] { make([](auto& g) { g.warmup = 1; }); }, {"spike_guard.warmup = 1", "window = 128"});
  expect_error([&] { make([](auto& g) { g.warmup = 129; }); }, {"spike_guard.warmup = 129"});
  expect_error([&] { make([](auto& g) { g.admit_after = 0; }); }, {"spike_guard.admit_after = 0"});
  expect_error([&] { make([](auto& g) { g.loss_threshold = 0; }); }, {"spike_guard.loss_threshold = 0"});
  expect_error([&] { make([](auto& g) { g.grad_norm_threshold = -1; }); }, {"spike_guard.grad_norm_threshold = -1"});
  expect_error([&] { make([](auto& g) { g.loss_threshold = NAN; }); }, {"spike_guard.loss_threshold = nan"});
  expect_error([&] {
    make([](auto& g) {
      g.loss_threshold = INFINITY;
      g.grad_norm_threshold = INFINITY;
    });
  }, {"both +inf"});
  // Bad options are refused even with the guard off; the defaults are fine.
  amp::GradScalerOptions off;
  off.spike_guard.window = 0;
  expect_error([&] { amp::GradScaler s(off); }, {"spike_guard.window = 0"});
  amp::GradScalerOptions on;
  on.spike_guard.enabled = true;
  amp::GradScaler fine(on);
  EXPECT_EQ(fine.options().spike_guard.window, 128);
  EXPECT_EQ(fine.guard_skipped_steps(), 0);
}

TEST(SpikeGuardOptions, SnapshotsCheckedBeforeAnythingChanges) {
  amp::GradScalerOptions o;
  o.spike_guard = small_guard();
  amp::GradScaler s(o);
  const amp::SpikeGuardSnapshot fresh = s.spike_guard_snapshot();
  ASSERT_EQ(fresh.loss.size(), 8u);
  auto bad = [&](auto tweak, std::initializer_list<const char*> words) {
    amp::SpikeGuardSnapshot b = fresh;
    b.state.count = 3;
    b.state.next = 3;
    for (int i = 0; i < 3; ++i) b.loss[i] = b.grad_norm[i] = 1.0 + i;
    tweak(b);
    expect_error([&] { s.load_spike_guard(b); }, words);
    EXPECT_EQ(s.spike_guard_state().count, 0);
  };
  bad([](auto& b) { b.loss.resize(7); }, {"7 losses", "spike_guard.window = 8"});
  bad([](auto& b) { b.state.count = 9; }, {"count = 9"});
  bad([](auto& b) { b.state.next = 1; }, {"next = 1", "count = 3"});
  bad([](auto& b) { b.state.streak = 2; }, {"streak = 2", "skipped = 0"});
  bad([](auto& b) { b.grad_norm[2] = NAN; }, {"slot 2", "grad_norm = nan"});
  amp::SpikeGuardSnapshot good = fresh;
  good.state.count = 8;
  good.state.next = 5;
  good.state.streak = 1;
  good.state.skipped = 4;
  for (int i = 0; i < 8; ++i) good.loss[i] = good.grad_norm[i] = i;
  s.load_spike_guard(good);
  EXPECT_EQ(s.spike_guard_snapshot().state.next, 5);
  EXPECT_EQ(s.guard_skipped_steps(), 4);
}

// --- training ----------------------------------------------------------------

// Linear regression with noise, y = x . truth + 0.1 n, fp16 weight and
// gradient, Adam, a dynamic GradScaler: a model whose loss and gradient norm
// settle to a noise floor, with the scaler's overflow probes along the way.
struct Regression {
  static constexpr int D = 16, B = 128;
  Tensor<half> w{Shape{D}}, g{Shape{D}};
  std::vector<double> truth;
  std::mt19937_64 rng;
  std::unique_ptr<optim::Adam> opt;
  amp::GradScaler scaler;

  static amp::GradScalerOptions scaler_options(bool guard, double threshold) {
    amp::GradScalerOptions o;
    o.spike_guard.enabled = guard;
    o.spike_guard.loss_threshold = o.spike_guard.grad_norm_threshold = threshold;
    return o;
  }
  explicit Regression(bool guard = true, std::uint64_t seed = 7, double threshold = 6.0)
      : truth(D), rng(seed), scaler(scaler_options(guard, threshold)) {
    std::normal_distribution<double> n(0.0, 1.0);
    for (double& t : truth) t = n(rng);
    for (int j = 0; j < D; ++j) w.at(j) = from_float<half>(static_cast<float>(0.1 * n(rng)));
    optim::AdamOptions o;
    o.lr = 1e-2;
    opt = std::make_unique<optim::Adam>(std::vector<optim::Param>{{"w", w, g}}, o);
  }

  // One batch: the loss, and into g the gradient times the scale (times
  // grad_factor: a planted gradient spike that leaves the loss as it is).
  float batch(double residual_factor = 1.0, double grad_factor = 1.0) {
    std::normal_distribution<double> n(0.0, 1.0);
    std::vector<double> grad(D, 0.0);
    double loss = 0;
    double x[D];
    for (int b = 0; b < B; ++b) {
      double y = 0, p = 0;
      for (int j = 0; j < D; ++j) {
        x[j] = n(rng);
        y += x[j] * truth[j];
        p += x[j] * static_cast<double>(to_float(w.at(j)));
      }
      const double r = (p - y - 0.1 * n(rng)) * residual_factor;
      loss += 0.5 * r * r / B;
      for (int j = 0; j < D; ++j) grad[j] += r * x[j] / B;
    }
    for (int j = 0; j < D; ++j) {
      g.at(j) = from_float<half>(static_cast<float>(grad[j] * grad_factor * scaler.scale()));
    }
    return static_cast<float>(loss);
  }

  // One iteration; returns whether the optimizer stepped.
  bool step(float loss) {
    scaler.set_loss(loss);
    const bool applied = scaler.step(*opt);
    scaler.update();
    return applied;
  }
  bool step() { return step(batch()); }
};

std::vector<std::uint16_t> weight_bits(const Tensor<half>& w) {
  std::vector<std::uint16_t> out;
  for (std::int64_t e = 0; e < w.numel(); ++e) out.push_back(to_bits(w.at(e)));
  return out;
}

TEST(SpikeGuardTraining, HealthyTenThousandStepsSkipNone) {
  Regression m;
  std::int64_t overflows_seen = 0;
  double max_loss_z = -INFINITY, max_norm_z = -INFINITY;
  for (int step = 0; step < 10000; ++step) {
    const std::int64_t guard_before = m.scaler.guard_skipped_steps();
    m.step();
    const amp::SpikeGuardState s = m.scaler.spike_guard_state();
    ASSERT_EQ(m.scaler.guard_skipped_steps(), guard_before)
        << "step " << step << ": loss z " << s.loss_z << ", norm z " << s.grad_norm_z;
    if (s.loss_z > max_loss_z) max_loss_z = s.loss_z;
    if (s.grad_norm_z > max_norm_z) max_norm_z = s.grad_norm_z;
    overflows_seen = m.scaler.skipped_steps();
  }
  std::printf("healthy run: largest z-scores: loss %.2f, gradient norm %.2f (threshold 6)\n", max_loss_z,
              max_norm_z);
  const amp::SpikeGuardState s = m.scaler.spike_guard_state();
  // Not vacuous: the window is full and the guard judged the last step.
  EXPECT_EQ(s.count, 128);
  EXPECT_TRUE(std::isfinite(s.loss_z));
  EXPECT_TRUE(std::isfinite(s.grad_norm_z));
  // The run trained: the loss is at its noise floor (0.1^2 / 2 = 0.005).
  EXPECT_LT(m.batch(), 0.01f);
  EXPECT_EQ(m.scaler.applied_steps() + m.scaler.skipped_steps(), 10000);
  EXPECT_EQ(m.opt->applied_steps(), m.scaler.applied_steps()) << "no guard skip: every clean step applied";
  std::printf("healthy run: %lld overflow skips (the scaler's probes), 0 guard skips, scale %g\n",
              static_cast<long long>(overflows_seen), static_cast<double>(m.scaler.scale()));
  // Control: the same run judged at 3 sigma does skip steps, so the run's
  // fluctuations reach the guard and the 0 above is the threshold's doing.
  Regression tight(true, 7, 3.0);
  for (int step = 0; step < 10000; ++step) tight.step();
  EXPECT_GT(tight.scaler.guard_skipped_steps(), 0);
  std::printf("the same run at threshold 3: %lld guard skips\n",
              static_cast<long long>(tight.scaler.guard_skipped_steps()));
}

TEST(SpikeGuardTraining, PlantedSpikesAreSkippedAsGuardSkipsWithTheScaleAndStateUntouched) {
  Regression m;
  for (int step = 0; step < 1500; ++step) m.step();
  ASSERT_EQ(m.scaler.guard_skipped_steps(), 0);
  struct Plant {
    const char* what;
    double residual_factor, grad_factor, loss_factor;
    std::int32_t reasons;
  };
  const Plant plants[] = {
      {"loss and gradient (the batch's residuals x 30)", 30.0, 1.0, 1.0, amp::guard_loss | amp::guard_grad_norm},
      {"gradient norm only (x 30, the loss as it was)", 1.0, 30.0, 1.0, amp::guard_grad_norm},
      {"loss only (x 100, the gradient as it was)", 1.0, 1.0, 100.0, amp::guard_loss},
  };
  std::int64_t guard_skips = 0;
  for (const Plant& p : plants) {
    SCOPED_TRACE(p.what);
    for (int step = 0; step < 300; ++step) m.step();  // back to the floor
    const std::vector<std::uint32_t> state_before = test::state_bits(*m.opt);
    const std::vector<std::uint16_t> w_before = weight_bits(m.w);
    const amp::ScalerState scaler_before = m.scaler.state();
    const std::int64_t overflow_before = m.scaler.skipped_steps(), applied_before = m.scaler.applied_steps();
    const float loss = m.batch(p.residual_factor, p.grad_factor);
    EXPECT_FALSE(m.step(static_cast<float>(loss * p.loss_factor)));
    ++guard_skips;
    const amp::SpikeGuardState s = m.scaler.spike_guard_state();
    EXPECT_EQ(s.skip, 1);
    EXPECT_EQ(s.reasons, p.reasons);
    EXPECT_EQ(m.scaler.guard_skipped_steps(), guard_skips);
    // Not an overflow: counted apart, and the scale does not back off; the
    // growth tracker counts the finite step as a run without the guard would.
    EXPECT_EQ(m.scaler.skipped_steps(), overflow_before);
    EXPECT_EQ(m.scaler.applied_steps(), applied_before + 1);
    EXPECT_EQ(m.scaler.scale(), scaler_before.scale);
    EXPECT_EQ(m.scaler.state().hysteresis_tracker, 0);
    EXPECT_EQ(m.scaler.state().growth_tracker, scaler_before.growth_tracker + 1);
    // Bit for bit: masters, moments, step counts, applied steps, weights.
    EXPECT_EQ(test::state_bits(*m.opt), state_before);
    EXPECT_EQ(weight_bits(m.w), w_before);
    // And training goes on: the next ordinary step is applied.
    EXPECT_TRUE(m.step());
  }
  EXPECT_EQ(m.opt->applied_steps() + guard_skips, m.scaler.applied_steps());
}

TEST(SpikeGuardTraining, WithoutTheGuardTheSpikeIsApplied) {
  // The control for the test above: the same planted spike steps.
  Regression m(false);
  for (int step = 0; step < 1500; ++step) m.step();
  const std::vector<std::uint32_t> before = test::state_bits(*m.opt);
  EXPECT_TRUE(m.step(m.batch(30.0)));
  EXPECT_NE(test::state_bits(*m.opt), before);
  EXPECT_EQ(m.scaler.guard_skipped_steps(), 0);
}

TEST(SpikeGuardTraining, TheLossMustBeGivenBeforeTheFirstStep) {
  Regression m;
  m.batch();
  const std::vector<std::uint32_t> before = test::state_bits(*m.opt);
  expect_error([&] { m.scaler.step(*m.opt); }, {"set_loss", "spike_guard.loss_threshold = 6"});
  EXPECT_FALSE(m.scaler.in_iteration()) << "refused before the unscale";
  EXPECT_EQ(test::state_bits(*m.opt), before);
  m.scaler.set_loss(1.0f);
  m.scaler.step(*m.opt);
  expect_error([&] { m.scaler.set_loss(2.0f); }, {"set_loss", "judged this iteration"});
  m.scaler.update();
  // Forgotten at update(): the next iteration needs its own.
  m.batch();
  expect_error([&] { m.scaler.step(*m.opt); }, {"set_loss"});
}

TEST(SpikeGuardTraining, TheMonitorHandsTheGuardItsLoss) {
  Regression m;
  monitor::MonitorOptions mo;
  mo.warnings = false;
  monitor::Monitor mon(*m.opt, m.scaler, mo);
  for (int step = 0; step < 200; ++step) mon.step(m.batch());  // no set_loss needed
  ASSERT_EQ(m.scaler.guard_skipped_steps(), 0);
  ASSERT_EQ(m.scaler.spike_guard_state().count, 128) << "the guard saw the monitor's losses";
  const std::vector<std::uint32_t> before = test::state_bits(*m.opt);
  const float loss = m.batch();
  EXPECT_FALSE(mon.step(loss * 100.0f)) << "a loss-only spike, judged from the monitor's loss";
  EXPECT_EQ(m.scaler.spike_guard_state().reasons, amp::guard_loss);
  EXPECT_EQ(m.scaler.guard_skipped_steps(), 1);
  EXPECT_EQ(test::state_bits(*m.opt), before);
  // The monitor's record says so (step 201 of the record of steps 201-210),
  // and the JSONL log carries the flag in that record only.
  for (int step = 0; step < 9; ++step) mon.step(m.batch());
  ASSERT_NE(mon.last_record(), nullptr);
  const monitor::LogRecord& r = *mon.last_record();
  ASSERT_EQ(r.steps.size(), 10u);
  EXPECT_EQ(r.steps[0].step, 201);
  EXPECT_TRUE(r.steps[0].guard_skipped);
  EXPECT_FALSE(r.steps[0].skipped) << "not an overflow";
  for (std::size_t k = 1; k < r.steps.size(); ++k) EXPECT_FALSE(r.steps[k].guard_skipped) << "step " << r.steps[k].step;
  const std::string line = monitor::record_json(mon.info(), r, mon.forecast(), {});
  EXPECT_NE(line.find("\"guard_skipped\": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]"), std::string::npos) << line.substr(0, 400);
}

// A run of `steps` iterations with planted spikes at fixed iterations; the
// guard's decision at each.
std::vector<int> run(Regression& m, int from, int to) {
  std::vector<int> decisions;
  for (int step = from; step < to; ++step) {
    const bool spike = step % 97 == 0 && step >= 300;
    const float loss = m.batch(spike ? 20.0 : 1.0);
    decisions.push_back(m.step(loss) ? 0 : m.scaler.spike_guard_state().skip ? 2 : 1);
  }
  return decisions;
}

TEST(SpikeGuardTraining, ACheckpointedRunDecidesAsTheUninterruptedOne) {
  const int total = 900, cut = 388;  // a spike at 388 + 0: 388 = 4 x 97
  Regression straight;
  const std::vector<int> want = run(straight, 0, total);
  int planted_skips = 0;
  for (int step = 300; step < total; step += 1) planted_skips += want[step] == 2 && step % 97 == 0;
  ASSERT_GE(planted_skips, 5) << "the spikes were skipped in the straight run";

  const std::string path = test::temp_path("spike_guard_resume.safetensors");
  Regression first;
  std::vector<int> got = run(first, 0, cut);
  std::mt19937_64 rng = first.rng;
  io::CheckpointExtras extras;
  extras.rng = &rng;
  io::save_checkpoint(path, *first.opt, first.scaler, extras);

  Regression resumed(true, 12345);  // another seed: everything must come from the file
  resumed.truth = first.truth;
  io::CheckpointExtras back;
  back.rng = &resumed.rng;
  io::load_checkpoint(path, *resumed.opt, resumed.scaler, &back);
  EXPECT_EQ(resumed.scaler.guard_skipped_steps(), first.scaler.guard_skipped_steps());
  const std::vector<int> rest = run(resumed, cut, total);
  got.insert(got.end(), rest.begin(), rest.end());
  EXPECT_EQ(got, want);
  EXPECT_EQ(test::state_bits(*resumed.opt), test::state_bits(*straight.opt));
  const amp::SpikeGuardSnapshot a = resumed.scaler.spike_guard_snapshot(), b = straight.scaler.spike_guard_snapshot();
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.grad_norm, b.grad_norm);
  EXPECT_EQ(a.state.next, b.state.next);
  EXPECT_EQ(a.state.skipped, b.state.skipped);

  // Control: the same resume with the guard's window lost (a fresh guard
  // warms up again) lets the spike at the cut through.
  Regression forgetful(true, 12345);
  forgetful.truth = first.truth;
  back.rng = &forgetful.rng;
  io::load_checkpoint(path, *forgetful.opt, forgetful.scaler, &back);
  forgetful.scaler.load_spike_guard(amp::SpikeGuard(forgetful.scaler.options().spike_guard).snapshot());
  const std::vector<int> lost = run(forgetful, cut, total);
  EXPECT_EQ(want[cut], 2);
  EXPECT_EQ(lost[0], 0) << "a guard in warm-up does not judge the spike";
  std::remove(path.c_str());
}

TEST(SpikeGuardTraining, CheckpointsOfAnotherWindowAreRefused) {
  const std::string path = test::temp_path("spike_guard_window.safetensors");
  Regression a;
  for (int step = 0; step < 10; ++step) a.step();
  io::save_checkpoint(path, *a.opt, a.scaler);
  amp::GradScalerOptions o;
  o.spike_guard.enabled = true;
  o.spike_guard.window = 64;
  Regression b;
  amp::GradScaler other(o);
  const std::vector<std::uint32_t> before = test::state_bits(*b.opt);
  expect_error([&] { io::load_checkpoint(path, *b.opt, other); }, {"guard_window", "[2, 64]"});
  EXPECT_EQ(test::state_bits(*b.opt), before);
  // With the guard off, the window in the file is ignored.
  Regression c(false);
  io::load_checkpoint(path, *c.opt, c.scaler);
  EXPECT_EQ(c.scaler.applied_steps(), a.scaler.applied_steps());
  std::remove(path.c_str());
}

}  // namespace
}  // namespace mixprec
