// SPDX-License-Identifier: Apache-2.0
// The instability monitor on the host: the check pass's exponent histogram
// against frexp, the per-parameter figures against direct computation, the
// step records of skipped steps, and the demonstration the issue asks for:
// an fp16 network whose gradients underflow without loss scaling is
// reported (with a forecast before the fact), the same run with dynamic
// scaling is healthy.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "mixprec/monitor/monitor.hpp"
#include "test_util.hpp"

namespace {

using namespace mixprec;
using monitor::Bins;
using monitor::EventKind;

// floor(log2 |x|) by frexp (x = m 2^e, m in [0.5, 1)), binned as the
// monitor documents; independent of the library's code.
std::size_t reference_bin(float x) {
  if (x == 0.0f) return 0;
  if (!std::isfinite(x)) return 63;
  int e = 0;
  std::frexp(static_cast<double>(x), &e);
  const int floor_log2 = e - 1;
  return static_cast<std::size_t>(std::min(std::max(floor_log2, -45), 16) + 46);
}

template <class T>
std::vector<T> special_values(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> exponent(-50.0f, 20.0f);
  std::vector<T> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    float x = std::exp2(exponent(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
    switch (i % 11) {
      case 0: x = 0.0f; break;
      case 1: x = std::numeric_limits<float>::infinity(); break;
      case 2: x = std::numeric_limits<float>::quiet_NaN(); break;
      case 3: x = std::ldexp(1.0f, -24); break;   // fp16's smallest subnormal
      case 4: x = std::ldexp(1.0f, -14); break;   // fp16's smallest normal
      case 5: x = 65504.0f; break;                // fp16's largest
      default: break;
    }
    out[i] = from_float<T>(x);
  }
  return out;
}

template <class T>
void expect_histogram_matches(std::size_t n) {
  std::vector<T> w(n, from_float<T>(1.0f)), g = special_values<T>(n, 7);
  optim::SGD opt({{"p", TensorView<T>(w.data(), {static_cast<std::int64_t>(n)}),
                   TensorView<T>(g.data(), {static_cast<std::int64_t>(n)})}}, {});
  std::vector<std::uint64_t> bins(64, 0);
  opt.set_grad_histogram(bins.data());
  const optim::GradStats stats = opt.check_grads();
  opt.set_grad_histogram(nullptr);
  std::vector<std::uint64_t> expected(64, 0);
  for (const T& x : g) expected[reference_bin(to_float(x))] += 1;
  EXPECT_EQ(bins, expected) << dtype_name(dtype_of<T>);
  EXPECT_TRUE(stats.nonfinite[0]);
  // Unset, the pass counts nothing.
  const std::vector<std::uint64_t> before = bins;
  (void)opt.check_grads();
  EXPECT_EQ(bins, before);
}

TEST(MonitorHistogram, CheckPassCountsExponentsForEveryDtype) {
  expect_histogram_matches<half>(5000);
  expect_histogram_matches<bfloat16>(4099);
  expect_histogram_matches<float>(3001);
}

TEST(MonitorHistogram, Fp16SharesFollowTheDocumentedBoundaries) {
  monitor::Histogram h{};
  h[0] = 10;                          // zeros: underflow
  h[Bins::of(std::ldexp(1.0f, -25))] = 5;   // below 2^-24: underflow
  h[Bins::of(std::ldexp(1.0f, -24))] = 3;   // fp16 subnormal
  h[Bins::of(std::ldexp(1.5f, -15))] = 2;   // fp16 subnormal
  h[Bins::of(std::ldexp(1.0f, -14))] = 50;  // normal
  h[Bins::of(65504.0f)] = 20;               // normal (exponent 15)
  h[Bins::of(65536.0f)] = 4;                // overflow
  h[63] = 6;                                // inf / NaN: overflow
  const monitor::Fp16Shares s = monitor::fp16_shares(h);
  EXPECT_DOUBLE_EQ(s.underflow, 15.0 / 100);
  EXPECT_DOUBLE_EQ(s.subnormal, 5.0 / 100);
  EXPECT_DOUBLE_EQ(s.overflow, 10.0 / 100);
}

// One parameter, one step, figures compared with what the test computes.
TEST(Monitor, UpdateRatioGradNormAndEpsShareMatchDirectComputation) {
  const std::int64_t n = 1000;
  std::vector<float> w(n), g(n);
  for (std::int64_t i = 0; i < n; ++i) {
    w[i] = 0.5f + 0.001f * static_cast<float>(i);
    g[i] = (i % 4 == 0) ? 1e-5f : 0.25f;  // a quarter below eps = 1e-4
  }
  auto view = [n](std::vector<float>& v) { return TensorView<float>(v.data(), {n}); };
  {
    optim::SGD sgd({{"w", view(w), view(g)}}, [] {
      optim::SGDOptions o;
      o.lr = 0.1;
      return o;
    }());
    amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
    monitor::MonitorOptions mo;
    mo.every = 1;
    mo.warnings = false;
    monitor::Monitor mon(sgd, scaler, mo);
    const std::vector<float> w0 = w;
    ASSERT_TRUE(mon.step(2.5f));
    const monitor::LogRecord* r = mon.last_record();
    ASSERT_NE(r, nullptr);
    double gg = 0, ww = 0, dd = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      gg += double(g[i]) * g[i];
      ww += double(w0[i]) * w0[i];
      const double d = double(sgd.master(0).data()[i]) - w0[i];
      dd += d * d;
    }
    EXPECT_NEAR(r->params[0].grad_norm, std::sqrt(gg), 1e-6 * std::sqrt(gg));
    EXPECT_NEAR(r->params[0].update_ratio, std::sqrt(dd / ww), 1e-6 * std::sqrt(dd / ww));
    EXPECT_NEAR(r->params[0].update_ratio, 0.1 * std::sqrt(gg / ww), 1e-4 * std::sqrt(gg / ww));
    EXPECT_TRUE(std::isnan(r->params[0].eps_share));  // SGD keeps no second moment
    EXPECT_EQ(r->last().step, 1);
    EXPECT_EQ(r->last().loss, 2.5);
    EXPECT_FALSE(r->last().skipped);
  }
  {
    optim::Adam adam({{"w", view(w), view(g)}}, [] {
      optim::AdamOptions o;
      o.eps = 1e-4;
      return o;
    }());
    amp::GradScaler scaler(amp::GradScalerOptions::for_dtype(DType::float32));
    monitor::MonitorOptions mo;
    mo.every = 1;
    mo.warnings = false;
    monitor::Monitor mon(adam, scaler, mo);
    mon.step(1.0f);
    // After step 1 the bias-corrected v is g^2: eps dominates where |g| < eps.
    EXPECT_DOUBLE_EQ(mon.last_record()->params[0].eps_share, 0.25);
    mon.step(1.0f);
    EXPECT_DOUBLE_EQ(mon.last_record()->params[0].eps_share, 0.25);
  }
}

TEST(Monitor, RecordsEveryStepAndNamesTheParameterThatOverflows) {
  std::vector<half> w1(64, half(0.5f)), g1(64, half(0.01f)), w2(32, half(0.5f)), g2(32, half(0.01f));
  optim::AdamW opt({{"first", TensorView<half>(w1.data(), {64}), TensorView<half>(g1.data(), {64})},
                    {"second", TensorView<half>(w2.data(), {32}), TensorView<half>(g2.data(), {32})}},
                   {});
  amp::GradScaler scaler;  // dynamic, 2^16
  monitor::MonitorOptions mo;
  mo.every = 5;
  mo.warnings = false;
  // The overflows come while the scale is still within 2^4 of init_scale
  // and no scale has held 20 steps, which the detectors take for the
  // scaler's probing; this test is about the per-parameter bookkeeping, so
  // a scale that held one step is settled.
  mo.detectors.settle_steps = 1;
  monitor::Monitor mon(opt, scaler, mo);
  std::vector<monitor::StepSample> all;
  for (int s = 1; s <= 40; ++s) {
    const bool bad = s == 3 || s == 11 || s == 17;
    g2[5] = bad ? half(std::numeric_limits<float>::infinity()) : half(0.01f);
    const bool applied = mon.step(static_cast<float>(s));
    EXPECT_EQ(applied, !bad) << "step " << s;
    if (s % 5 == 0) {
      ASSERT_EQ(mon.records(), s / 5);
      const monitor::LogRecord& r = *mon.last_record();
      ASSERT_EQ(r.steps.size(), 5u);
      all.insert(all.end(), r.steps.begin(), r.steps.end());
    }
  }
  ASSERT_EQ(all.size(), 40u);
  double scale = 65536;
  for (int s = 1; s <= 40; ++s) {
    const monitor::StepSample& x = all[static_cast<std::size_t>(s - 1)];
    const bool bad = s == 3 || s == 11 || s == 17;
    EXPECT_EQ(x.step, s);
    EXPECT_EQ(x.loss, s);
    EXPECT_EQ(x.skipped, bad);
    EXPECT_EQ(x.scale, scale) << "step " << s;
    EXPECT_EQ(x.nonfinite_params, bad ? std::vector<int>{1} : std::vector<int>{});
    EXPECT_EQ(std::isfinite(x.grad_norm), !bad);
    if (bad) scale /= 2;
  }
  bool named = false;
  for (const monitor::Event& e : mon.events()) {
    if (e.kind == EventKind::repeated_overflow) {
      EXPECT_EQ(e.param, "second");
      EXPECT_EQ(e.step, 17);
      named = true;
    }
  }
  EXPECT_TRUE(named) << "three overflows of one parameter in 200 steps must be reported";
}

// amp::end_iteration is the end of an iteration that the device monitor's
// kernels run in place of the scaler's own (DeviceGradScaler::update with an
// amp::FusedUpdate). Against the host GradScaler, which keeps the rule in its
// own update(): the same scale, trackers and counts after every step, and a
// streak counted where the host raises max_consecutive_skips. (The GPU side:
// monitor_gpu_test compares the fused kernel with the scaler's own kernel.)
TEST(MonitorScaler, EndIterationIsTheHostScalersUpdate) {
  amp::GradScalerOptions dynamic;
  dynamic.init_scale = 8;
  dynamic.min_scale = 3;
  dynamic.growth_interval = 3;
  dynamic.hysteresis = 2;
  dynamic.max_consecutive_skips = 3;
  amp::GradScalerOptions fixed;
  fixed.mode = amp::ScalingMode::static_scale;
  fixed.init_scale = 4;
  fixed.max_consecutive_skips = 2;
  for (const amp::GradScalerOptions& so : {dynamic, fixed}) {
    SCOPED_TRACE(so.mode == amp::ScalingMode::dynamic ? "dynamic" : "static");
    std::vector<half> w(16, half(0.5f)), g(16, half(0.01f));
    optim::SGD opt({{"p", TensorView<half>(w.data(), {16}), TensorView<half>(g.data(), {16})}}, {});
    amp::GradScaler host(so);
    amp::DeviceScalerState d;
    d.state = amp::GradScaler::initial_state(so);
    const amp::ScalePolicy policy = amp::GradScaler::policy(so);
    std::int64_t raised = 0;
    float lowest = d.state.scale, highest = d.state.scale;
    for (int s = 1; s <= 30; ++s) {
      const bool bad = s == 3 || s == 4 || s == 5 || s == 6 || s == 10 || (s >= 14 && s <= 17) || s == 20;
      g[3] = bad ? half(std::numeric_limits<float>::infinity()) : half(0.01f);
      host.step(opt);
      try {
        host.update();
      } catch (const Error&) {
        raised += 1;
      }
      d.any_inf = bad ? 1 : 0;
      amp::end_iteration(d, policy, so.mode == amp::ScalingMode::dynamic);
      const amp::ScalerState& h = host.state();
      EXPECT_EQ(d.state.scale, h.scale) << "step " << s;
      EXPECT_EQ(d.state.growth_tracker, h.growth_tracker) << "step " << s;
      EXPECT_EQ(d.state.hysteresis_tracker, h.hysteresis_tracker) << "step " << s;
      EXPECT_EQ(d.state.min_scale_hits, h.min_scale_hits) << "step " << s;
      EXPECT_EQ(d.state.skip_streak, h.skip_streak) << "step " << s;
      EXPECT_EQ(d.applied, host.applied_steps()) << "step " << s;
      EXPECT_EQ(d.skipped, host.skipped_steps()) << "step " << s;
      EXPECT_EQ(d.streak_limit_hits, raised) << "step " << s;
      EXPECT_EQ(d.any_inf, 0) << "step " << s;
      lowest = std::min(lowest, d.state.scale);
      highest = std::max(highest, d.state.scale);
    }
    // The run went where the rule has branches: two streaks at the limit,
    // and (dynamic) a backoff clamped at min_scale and growth after it.
    EXPECT_EQ(raised, 2);
    if (so.mode == amp::ScalingMode::dynamic) {
      EXPECT_EQ(d.state.min_scale_hits, 1);
      EXPECT_EQ(lowest, 3.0f);
      EXPECT_GT(highest, 8.0f);
    }
  }
}

TEST(Monitor, RejectsBadOptionsBeforeAnythingChanges) {
  std::vector<float> w(4, 1.0f), g(4, 0.1f);
  optim::SGD opt({{"w", TensorView<float>(w.data(), {4}), TensorView<float>(g.data(), {4})}}, {});
  amp::GradScaler scaler;
  monitor::MonitorOptions mo;
  mo.every = 0;
  try {
    monitor::Monitor m(opt, scaler, mo);
    FAIL() << "every = 0 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("every = 0"), std::string::npos) << e.what();
  }
  mo.every = 10;
  mo.readback_slots = 1;
  EXPECT_THROW(monitor::Monitor(opt, scaler, mo), Error);
  mo.readback_slots = 8;
  mo.log_path = "/nonexistent-dir/log.jsonl";
  try {
    monitor::Monitor m(opt, scaler, mo);
    FAIL() << "an unwritable log path accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/log.jsonl"), std::string::npos) << e.what();
  }
  EXPECT_EQ(opt.grad_histogram(), nullptr);
  EXPECT_EQ(w, std::vector<float>(4, 1.0f));
}

// The demonstration. An fp16 linear layer regresses onto a teacher with
// SGD: the residuals, and so the gradients, shrink geometrically through
// fp16's range (a fit converging, as late in training). Without loss
// scaling they underflow to zero and the monitor says so, and forecasts it
// before; with dynamic scaling (2^16) they stay in range and the monitor is
// quiet.
struct DemoResult {
  std::vector<monitor::Event> events;
  std::vector<monitor::Forecast> forecasts;
  std::vector<double> underflow;  // overall share per record
  double first_loss = 0, last_loss = 0;
};

DemoResult run_demo(amp::ScalingMode mode, int steps) {
  const std::int64_t batch = 64, in = 32, out = 4;
  const double lr = 0.05;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> teacher(static_cast<std::size_t>(in * out));
  for (float& t : teacher) t = 1e-4f * normal(rng);
  nn::Sequential<half> net({batch, in});
  net.emplace<nn::Linear<half>>(in, out, nn::Activation::none, false, Device::cpu(), 5);
  optim::SGD opt(net.parameters(), [lr] {
    optim::SGDOptions o;
    o.lr = lr;
    return o;
  }());
  amp::GradScalerOptions so;
  so.mode = mode;
  amp::GradScaler scaler(so);
  DemoResult result;
  monitor::MonitorOptions mo;
  mo.every = 10;
  monitor::Monitor mon(opt, scaler, mo);
  Tensor<half> x({batch, in}), target({batch, out});
  for (int s = 1; s <= steps; ++s) {
    for (std::int64_t b = 0; b < batch; ++b) {
      float xs[32];
      for (std::int64_t i = 0; i < in; ++i) {
        xs[i] = normal(rng);
        x.data()[b * in + i] = half(xs[i]);
      }
      for (std::int64_t o = 0; o < out; ++o) {
        float t = 0;
        for (std::int64_t i = 0; i < in; ++i) t += teacher[static_cast<std::size_t>(o * in + i)] * xs[i];
        target.data()[b * out + o] = half(t);
      }
    }
    const float loss = nn::mse<half>(net.forward(x), target, scaler.scale(), net.output_grad());
    net.backward();
    mon.step(loss);
    if (s == 1) result.first_loss = loss;
    result.last_loss = loss;
    if (s % mo.every == 0) {
      result.forecasts.push_back(mon.forecast());
      result.underflow.push_back(monitor::fp16_shares(mon.last_record()->overall()).underflow);
    }
  }
  result.events = mon.events();
  return result;
}

const int kDemoSteps = 1000;

TEST(MonitorDemo, Fp16WithoutScalingUnderflowsAndIsReportedWithAForecast) {
  const DemoResult r = run_demo(amp::ScalingMode::disabled, kDemoSteps);
  std::int64_t first_underflow = -1;
  for (const monitor::Event& e : r.events) {
    if (e.kind == EventKind::underflow && first_underflow < 0) first_underflow = e.step;
  }
  std::printf("unscaled: underflow share %.3f -> %.3f, first underflow event at step %lld, loss %.3g -> %.3g\n",
              r.underflow.front(), r.underflow.back(), static_cast<long long>(first_underflow), r.first_loss,
              r.last_loss);
  ASSERT_GT(first_underflow, 0) << "no underflow event";
  EXPECT_GT(r.underflow.back(), 0.25);
  // The forecasts made 100 to 400 steps ahead saw the crossing coming,
  // within 30% of when it came.
  int checked = 0;
  for (const monitor::Forecast& f : r.forecasts) {
    const auto actual = static_cast<double>(first_underflow - f.step);
    if (actual < 100 || actual > 400) continue;
    std::printf("forecast at step %lld: crossing in %.0f steps (it came %.0f steps later)\n",
                static_cast<long long>(f.step), f.steps_to_underflow, actual);
    EXPECT_NEAR(f.steps_to_underflow, actual, 0.3 * actual) << "forecast at step " << f.step;
    ++checked;
  }
  EXPECT_GE(checked, 10);
}

TEST(MonitorDemo, Fp16WithDynamicScalingIsHealthy) {
  const DemoResult r = run_demo(amp::ScalingMode::dynamic, kDemoSteps);
  std::printf("dynamic: underflow share %.3f -> %.3f, loss %.3g -> %.3g, %zu events\n", r.underflow.front(),
              r.underflow.back(), r.first_loss, r.last_loss, r.events.size());
  for (const monitor::Event& e : r.events) ADD_FAILURE() << "step " << e.step << ": " << e.message;
  EXPECT_LT(r.underflow.back(), 0.05);
  EXPECT_LT(r.last_loss, 0.1 * r.first_loss);
}

// A monitor's state through a checkpoint: 40 steps straight against 17,
// save_state, a fresh monitor with load_state and the log appended, 23 more
// (the model, optimizer and scaler restored too): the same events, records
// and forecast, and the two logs hold the same lines. Overflows at steps 3,
// 11, 17 and 29 of one parameter make events that need the history from
// before the cut.
struct ResumeRun {
  std::vector<half> w1 = std::vector<half>(64, half(0.5f)), g1 = std::vector<half>(64, half(0.01f));
  std::vector<half> w2 = std::vector<half>(32, half(0.5f)), g2 = std::vector<half>(32, half(0.01f));
  optim::AdamW opt{{{"first", TensorView<half>(w1.data(), {64}), TensorView<half>(g1.data(), {64})},
                    {"second", TensorView<half>(w2.data(), {32}), TensorView<half>(g2.data(), {32})}},
                   optim::AdamWOptions{}};
  amp::GradScaler scaler;
  void gradients(int s) {
    const bool bad = s == 3 || s == 11 || s == 17 || s == 29;
    g2[5] = bad ? half(std::numeric_limits<float>::infinity()) : half(0.01f * static_cast<float>(s % 7 + 1));
  }
};

monitor::MonitorOptions resume_options(const std::string& log, bool append) {
  monitor::MonitorOptions mo;
  mo.every = 5;
  mo.warnings = false;
  mo.log_path = log;
  mo.append_log = append;
  mo.detectors.repeat_interval = 1;
  mo.detectors.settle_steps = 1;  // as RecordsEveryStepAndNamesTheParameterThatOverflows
  return mo;
}

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

TEST(Monitor, AResumedMonitorGoesOnWhereItStopped) {
  const std::string straight_log = test::temp_path("monitor_straight.jsonl"),
                    resumed_log = test::temp_path("monitor_resumed.jsonl");
  ResumeRun a;
  monitor::Monitor ma(a.opt, a.scaler, resume_options(straight_log, false));
  for (int s = 1; s <= 40; ++s) {
    a.gradients(s);
    ma.step(static_cast<float>(4.0 / s));
  }
  ResumeRun b;
  std::string state;
  optim::OptimizerState opt_state;
  amp::ScalerState scaler_state;
  std::int64_t applied = 0, skipped = 0;
  {
    monitor::Monitor mb(b.opt, b.scaler, resume_options(resumed_log, false));
    for (int s = 1; s <= 17; ++s) {
      b.gradients(s);
      mb.step(static_cast<float>(4.0 / s));
    }
    state = mb.save_state();
    opt_state = b.opt.save_state();
    scaler_state = b.scaler.state();
    applied = b.scaler.applied_steps();
    skipped = b.scaler.skipped_steps();
  }
  ResumeRun c;  // a new process: the model, optimizer, scaler and monitor restored
  c.w1 = b.w1;
  c.w2 = b.w2;
  c.opt.load_state(opt_state);
  c.scaler.load_state(scaler_state, applied, skipped);
  monitor::Monitor mc(c.opt, c.scaler, resume_options(resumed_log, true));
  mc.load_state(state);
  for (int s = 18; s <= 40; ++s) {
    c.gradients(s);
    mc.step(static_cast<float>(4.0 / s));
  }
  // The straight run's events: repeated_overflow at steps 17 and 29, both
  // found after the cut, from overflow history that the state carried
  // (steps 3 and 11; step 17 was pending, not yet in a record, at the save).
  ASSERT_EQ(ma.events().size(), 2u);
  EXPECT_EQ(ma.events()[0].step, 17);
  EXPECT_EQ(ma.events()[1].step, 29);
  ASSERT_EQ(mc.events().size(), ma.events().size());
  for (std::size_t k = 0; k < ma.events().size(); ++k) {
    EXPECT_EQ(mc.events()[k].step, ma.events()[k].step) << k;
    EXPECT_EQ(mc.events()[k].kind, ma.events()[k].kind) << k;
    EXPECT_EQ(mc.events()[k].message, ma.events()[k].message) << k;
  }
  EXPECT_EQ(mc.steps(), 40);
  EXPECT_EQ(mc.records(), ma.records());
  EXPECT_EQ(mc.last_record()->last().step, 40);
  EXPECT_EQ(mc.forecast().step, ma.forecast().step);
  EXPECT_EQ(lines_of(resumed_log), lines_of(straight_log));
  // Misuse: after a step, of another run, not a state; nothing changes.
  test::expect_error([&] { mc.load_state(state); }, {"Monitor::load_state", "steps already monitored"});
  ResumeRun d;
  monitor::MonitorOptions other = resume_options(test::temp_path("monitor_other.jsonl"), false);
  other.every = 4;
  monitor::Monitor md(d.opt, d.scaler, other);
  test::expect_error([&] { md.load_state(state); }, {"Monitor::load_state", "every = 5", "every = 4"});
  test::expect_error([&] { md.load_state("{}"); }, {"Monitor::load_state", "not a monitor state"});
  EXPECT_EQ(md.steps(), 0);
}

}  // namespace
