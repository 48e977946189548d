// SPDX-License-Identifier: Apache-2.0
// The monitor on the GPU against the monitor on the host: the same model
// (fp16 weights, AdamW), the same gradients and injected overflows, a
// DeviceGradScaler on one side and a GradScaler on the other. Every step's
// record (loss, scale, skipped, which parameter overflowed) is equal, the
// exponent histograms from the device's check pass equal the host's count,
// the norms, update ratios and eps shares agree; and the same run replayed
// from two CUDA graphs (a plain and a logged step) gives the eager records.
// The monitor adds no launch to a step (its record and publish share the
// scaler's end-of-iteration launch), and that fused end of iteration leaves
// the scaler as the scaler's own kernel does.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/mixprec.hpp"
#include "mixprec/monitor/monitor.hpp"

namespace mixprec {
namespace {

constexpr int kSteps = 60;

struct MonitorRun {
  std::vector<monitor::LogRecord> records;
  std::vector<monitor::Event> events;
};

// Gradients of step s, parameter i (fp16 values spanning zeros, fp16
// subnormals and normals), an inf in parameter 1 at steps 7 and 23.
// The steps whose gradient() has an inf of its own (tensor 1, element 3).
bool gradient_has_inf(int s) { return s == 7 || s == 23; }

std::vector<half> gradient(int s, std::size_t i, std::int64_t n, float scale) {
  std::mt19937 rng(static_cast<std::uint32_t>(1000 * s + i));
  std::uniform_real_distribution<float> exponent(-30.0f, -2.0f);
  std::vector<half> g(static_cast<std::size_t>(n));
  for (std::int64_t k = 0; k < n; ++k) {
    const float x = (k % 13 == 0) ? 0.0f : std::exp2(exponent(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
    g[static_cast<std::size_t>(k)] = half(x * scale);
  }
  if (i == 1 && gradient_has_inf(s)) g[3] = half(std::numeric_limits<float>::infinity());
  return g;
}

// resumed: eager, and at step kResumeAt (a logged step) the monitor's state
// is saved, the monitor replaced by a new one that loads it, and the run
// goes on (the optimizer and scaler are the same objects throughout).
enum class Mode { host, eager, graph, resumed };
constexpr int kResumeAt = 30;

MonitorRun run(Mode mode) {
  const std::vector<std::int64_t> sizes = {4099, 70000, 1, 256};
  const bool device = mode != Mode::host;
  const Device where = device ? Device::cuda(0) : Device::cpu();
  std::vector<Tensor<half>> w, g;
  std::vector<optim::Param> params;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    Tensor<half> hw(Shape{sizes[i]});
    fill_normal(hw, 0, 1, 10 + i);
    w.push_back(device ? hw.to(where) : std::move(hw));
    g.emplace_back(Shape{sizes[i]}, where);
    params.push_back({"p" + std::to_string(i), TensorRef(w.back()), TensorRef(g.back())});
  }
  optim::AdamWOptions o;
  o.eps = 1e-6;
  optim::AdamW opt(params, o);
  monitor::MonitorOptions mo;
  mo.every = 10;
  mo.warnings = false;
  MonitorRun r;
  auto upload = [&](int s, float scale) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const std::vector<half> h = gradient(s, i, sizes[i], scale);
      detail::copy_raw(g[i].data(), where, h.data(), Device::cpu(), h.size() * sizeof(half));
    }
  };
  if (!device) {
    amp::GradScaler scaler;
    monitor::Monitor mon(opt, scaler, mo);
    for (int s = 1; s <= kSteps; ++s) {
      upload(s, scaler.scale());
      mon.step(static_cast<float>(s) * 0.5f);
      if (s % mo.every == 0) r.records.push_back(*mon.last_record());
    }
    r.events = mon.events();
    return r;
  }
  Stream stream;
  amp::DeviceGradScaler scaler({}, where, stream.get());
  opt.set_stream(stream.get());
  std::optional<monitor::Monitor> held;
  held.emplace(opt, scaler, mo);
  Buffer loss(sizeof(float), where);
  Graph graphs[2];
  std::int64_t seen = 0;
  for (int s = 1; s <= kSteps; ++s) {
    if (mode == Mode::resumed && s == kResumeAt + 1) {
      held->flush();
      if (held->records() > seen) r.records.push_back(*held->last_record());
      const std::string state = held->save_state();
      held.reset();
      held.emplace(opt, scaler, mo);
      held->load_state(state);
      EXPECT_EQ(held->steps(), kResumeAt);
      seen = held->records();
    }
    monitor::Monitor& mon = *held;
    // The gradients depend on the scale, as a backward pass's would: read it
    // (synchronising; this test is about the figures, not the speed).
    const float scale = scaler.scale();
    upload(s, scale);
    const float l = static_cast<float>(s) * 0.5f;
    detail::copy_raw(loss.data(), where, &l, Device::cpu(), sizeof l);
    auto body = [&] { mon.step(static_cast<const float*>(loss.data())); };
    if (mode == Mode::eager || s == 1) {
      body();
    } else {
      Graph& graph = graphs[mon.logs_next() ? 1 : 0];
      if (graph.empty()) graph.capture(stream.get(), body);
      graph.replay(stream.get());
      mon.replayed();
    }
    if (mon.records() > seen) {
      seen = mon.records();
      r.records.push_back(*mon.last_record());
    }
  }
  monitor::Monitor& mon = *held;
  mon.flush();
  if (mon.records() > seen) r.records.push_back(*mon.last_record());
  EXPECT_EQ(mon.records(), kSteps / mo.every);
  r.events = mon.events();
  return r;
}

void expect_same(const MonitorRun& a, const MonitorRun& b, const char* what) {
  ASSERT_EQ(a.records.size(), b.records.size()) << what;
  for (std::size_t r = 0; r < a.records.size(); ++r) {
    const monitor::LogRecord &x = a.records[r], &y = b.records[r];
    ASSERT_EQ(x.steps.size(), y.steps.size());
    for (std::size_t s = 0; s < x.steps.size(); ++s) {
      const monitor::StepSample &p = x.steps[s], &q = y.steps[s];
      EXPECT_EQ(p.step, q.step) << what;
      EXPECT_EQ(p.loss, q.loss) << what << " step " << p.step;
      EXPECT_EQ(p.scale, q.scale) << what << " step " << p.step;
      EXPECT_EQ(p.skipped, q.skipped) << what << " step " << p.step;
      EXPECT_EQ(p.nonfinite_params, q.nonfinite_params) << what << " step " << p.step;
      if (std::isfinite(p.grad_norm) || std::isfinite(q.grad_norm)) {
        EXPECT_NEAR(p.grad_norm, q.grad_norm, 1e-5 * p.grad_norm) << what << " step " << p.step;
      }
    }
    ASSERT_EQ(x.params.size(), y.params.size());
    for (std::size_t i = 0; i < x.params.size(); ++i) {
      const monitor::ParamSample &p = x.params[i], &q = y.params[i];
      EXPECT_EQ(p.hist, q.hist) << what << " record " << r << " param " << i;
      EXPECT_NEAR(p.grad_norm, q.grad_norm, 1e-5 * p.grad_norm) << what;
      EXPECT_NEAR(p.update_ratio, q.update_ratio, 1e-6 * p.update_ratio + 1e-12) << what << " param " << i;
      EXPECT_EQ(p.eps_share, q.eps_share) << what << " param " << i;
      // The precursors: the same float terms on both sides, summed in
      // another order (the device adds a quad's four in float first).
      EXPECT_EQ(std::isnan(p.v_ratio_rms), std::isnan(q.v_ratio_rms)) << what << " param " << i;
      if (!std::isnan(p.v_ratio_rms)) {
        EXPECT_NEAR(p.v_ratio_rms, q.v_ratio_rms, 1e-6 * p.v_ratio_rms) << what;
      }
      EXPECT_EQ(std::isnan(p.lost_update_share), std::isnan(q.lost_update_share)) << what << " param " << i;
      if (!std::isnan(p.lost_update_share)) {
        EXPECT_EQ(p.lost_update_share, q.lost_update_share) << what;
      }
      EXPECT_EQ(p.nonfinite, q.nonfinite) << what;
    }
  }
}

TEST(MonitorGpu, DeviceRecordsEqualTheHostMonitor) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const MonitorRun host = run(Mode::host), eager = run(Mode::eager);
  ASSERT_EQ(host.records.size(), static_cast<std::size_t>(kSteps / 10));
  // The run has what the comparison needs: skipped steps, zeros and fp16
  // subnormals in the histograms, a nonzero eps share, real updates.
  EXPECT_TRUE(host.records[0].steps[6].skipped);
  const monitor::Fp16Shares shares = monitor::fp16_shares(host.records[1].overall());
  EXPECT_GT(shares.underflow, 0.0);
  EXPECT_GT(shares.subnormal, 0.0);
  EXPECT_GT(host.records[1].params[0].update_ratio, 0.0);
  EXPECT_GT(host.records[1].params[0].eps_share, 0.0);
  EXPECT_LT(host.records[1].params[0].eps_share, 1.0);
  EXPECT_GT(host.records[1].params[0].v_ratio_rms, 0.0);
  expect_same(host, eager, "device eager vs host");
}

TEST(MonitorGpu, GraphReplaysGiveTheEagerRecords) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const MonitorRun eager = run(Mode::eager), graph = run(Mode::graph);
  expect_same(eager, graph, "graph vs eager");
}

// A device monitor resumed from its saved state at a logged step goes on
// as if it had not stopped: the step numbers, records and events after the
// cut are the uninterrupted run's (the device's counts start from the
// loaded step), and a state that is not at a logged step is refused.
TEST(MonitorGpu, AResumedDeviceMonitorGoesOnWhereItStopped) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const MonitorRun eager = run(Mode::eager), resumed = run(Mode::resumed);
  expect_same(eager, resumed, "resumed vs straight");
  ASSERT_EQ(eager.events.size(), resumed.events.size());
  for (std::size_t e = 0; e < eager.events.size(); ++e) {
    EXPECT_EQ(eager.events[e].kind, resumed.events[e].kind) << "event " << e;
    EXPECT_EQ(eager.events[e].step, resumed.events[e].step) << "event " << e;
    EXPECT_EQ(eager.events[e].param, resumed.events[e].param) << "event " << e;
  }
}

TEST(MonitorGpu, ADeviceMonitorRefusesAStateBetweenLoggedSteps) {
  MIXPREC_SKIP_WITHOUT_GPU();
  const Device where = Device::cuda(0);
  Tensor<half> w = Tensor<half>(Shape{64}).to(where), g(Shape{64}, where);
  std::vector<optim::Param> params = {{"w", TensorRef(w), TensorRef(g)}};
  optim::AdamW opt(params, optim::AdamWOptions{});
  Stream stream;
  amp::DeviceGradScaler scaler({}, where, stream.get());
  opt.set_stream(stream.get());
  monitor::MonitorOptions mo;
  mo.every = 10;
  mo.warnings = false;
  monitor::Monitor mon(opt, scaler, mo);
  // Its own state (step 0, a logged step's), moved to step 25.
  nlohmann::json state = nlohmann::json::parse(mon.save_state());
  state["steps"] = 25;
  try {
    mon.load_state(state.dump());
    ADD_FAILURE() << "a state at step 25 was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("steps = 25 is not a logged step (every 10)"), std::string::npos) << e.what();
  }
  EXPECT_EQ(mon.steps(), 0);  // nothing changed
}

// --- the monitor's launches --------------------------------------------------

// A small fp16 model on the device, its AdamW, a DeviceGradScaler and a
// loss, for the tests below.
struct Rig {
  static constexpr std::int64_t kSizes[] = {4099, 70000, 1, 256};
  Stream stream;
  std::vector<Tensor<half>> w, g;
  std::unique_ptr<optim::AdamW> opt;
  std::unique_ptr<amp::DeviceGradScaler> scaler;
  Buffer loss{sizeof(float), Device::cuda(0)};

  explicit Rig(const amp::GradScalerOptions& so) {
    std::vector<optim::Param> params;
    w.reserve(std::size(kSizes));
    g.reserve(std::size(kSizes));
    for (std::size_t i = 0; i < std::size(kSizes); ++i) {
      Tensor<half> hw(Shape{kSizes[i]});
      fill_normal(hw, 0, 1, 10 + i);
      w.push_back(hw.to(Device::cuda(0)));
      g.emplace_back(Shape{kSizes[i]}, Device::cuda(0));
      params.push_back({"p" + std::to_string(i), TensorRef(w.back()), TensorRef(g.back())});
    }
    opt = std::make_unique<optim::AdamW>(params, optim::AdamWOptions{});
    opt->set_stream(stream.get());
    scaler = std::make_unique<amp::DeviceGradScaler>(so, Device::cuda(0), stream.get());
  }
  // Step s's gradients (not scaled: the same whatever the scale) and loss;
  // with `overflow`, an inf in parameter 0.
  void upload(int s, bool overflow) {
    for (std::size_t i = 0; i < std::size(kSizes); ++i) {
      std::vector<half> h = gradient(s, i, kSizes[i], 1.0f);
      if (overflow && i == 0) h[5] = half(std::numeric_limits<float>::infinity());
      detail::copy_raw(g[i].data(), Device::cuda(0), h.data(), Device::cpu(), h.size() * sizeof(half));
    }
    const float l = static_cast<float>(s) * 0.25f;
    detail::copy_raw(loss.data(), Device::cuda(0), &l, Device::cpu(), sizeof l);
  }
  const float* loss_data() const { return static_cast<const float*>(loss.data()); }
  // The step without a monitor.
  void plain_step() {
    if (scaler->options().spike_guard.enabled) scaler->set_loss(loss_data());
    scaler->step(*opt);
    scaler->update();
  }
};

// The nodes of the CUDA graph that body() queues on `stream`, and how many
// of them are kernel launches.
struct NodeCount {
  std::size_t all = 0, kernels = 0;
};
template <class F>
NodeCount captured_nodes(cudaStream_t stream, F&& body) {
  NodeCount c;
  EXPECT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  cudaGraph_t graph = nullptr;
  try {
    body();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "the captured step threw: " << e.what();
  }
  EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  if (graph == nullptr) return c;
  std::size_t n = 0;
  EXPECT_EQ(cudaGraphGetNodes(graph, nullptr, &n), cudaSuccess);
  std::vector<cudaGraphNode_t> nodes(n);
  EXPECT_EQ(cudaGraphGetNodes(graph, nodes.data(), &n), cudaSuccess);
  c.all = n;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type = cudaGraphNodeTypeEmpty;
    EXPECT_EQ(cudaGraphNodeGetType(node, &type), cudaSuccess);
    if (type == cudaGraphNodeTypeKernel) c.kernels += 1;
  }
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  return c;
}

// A captured monitored step, logged or not, has the nodes of the same step
// unmonitored, kernel for kernel: the record (and at a logged step the
// publish) is the scaler's end-of-iteration launch, and a logged step's
// histograms and precursors need no clear (the previous publish zeroed
// them). Before, an unlogged step had one more kernel (the record), a
// logged step four more nodes (two clears, the record, the publish).
TEST(MonitorGpu, MonitoredStepsQueueTheNodesOfUnmonitoredOnes) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (const bool guard : {false, true}) {
    SCOPED_TRACE(guard ? "spike guard on" : "spike guard off");
    amp::GradScalerOptions so;
    so.spike_guard.enabled = guard;
    NodeCount plain;
    {
      Rig r(so);
      r.upload(1, false);
      r.plain_step();  // eager: the plans and state are made outside the capture
      plain = captured_nodes(r.stream.get(), [&] { r.plain_step(); });
    }
    // check, step, end of iteration at least (and the guard's two)
    EXPECT_GE(plain.kernels, guard ? 5u : 3u);
    Rig r(so);
    monitor::MonitorOptions mo;
    mo.every = 4;
    mo.warnings = false;
    monitor::Monitor mon(*r.opt, *r.scaler, mo);
    auto step = [&] { mon.step(r.loss_data()); };
    r.upload(1, false);
    step();
    ASSERT_FALSE(mon.logs_next());
    const NodeCount unlogged = captured_nodes(r.stream.get(), step);
    EXPECT_EQ(unlogged.kernels, plain.kernels);
    EXPECT_EQ(unlogged.all, plain.all);
    for (int s = 2; !mon.logs_next(); ++s) {
      r.upload(s, false);
      step();
    }
    const NodeCount logged = captured_nodes(r.stream.get(), step);
    EXPECT_EQ(logged.kernels, plain.kernels);
    EXPECT_EQ(logged.all, plain.all);
    // The captures ran nothing: the steps that did run still make a record.
    r.upload(mo.every, false);
    step();
    mon.flush();
    EXPECT_EQ(mon.records(), 1);
  }
}

// What a scaler shows after a step: its whole device state and the error
// update() (or, once the state's copy has arrived, check_errors()) raised.
struct ScalerSeen {
  amp::DeviceScalerState s;
  std::string error;
};

constexpr int kScalerSteps = 30;
bool overflows(int s) {
  static const std::set<int> at = {3, 4, 5, 6, 10, 14, 15, 16, 17, 20, 27};
  return at.count(s) != 0;
}

// The same 30 steps with injected overflows, stepped by monitor.step (the
// fused end of iteration; its records into `records`) or by scaler.step +
// scaler.update (the scaler's own kernel).
std::vector<ScalerSeen> scaler_run(const amp::GradScalerOptions& so, std::vector<monitor::LogRecord>* records) {
  Rig r(so);
  std::unique_ptr<monitor::Monitor> mon;
  if (records != nullptr) {
    monitor::MonitorOptions mo;
    mo.every = 10;
    mo.warnings = false;
    mo.on_record = [records](const monitor::LogRecord& rec, const std::vector<monitor::Event>&,
                             const monitor::Forecast&) { records->push_back(rec); };
    mon = std::make_unique<monitor::Monitor>(*r.opt, *r.scaler, mo);
  }
  std::vector<ScalerSeen> seen;
  for (int s = 1; s <= kScalerSteps; ++s) {
    r.upload(s, overflows(s));
    ScalerSeen x;
    try {
      if (mon) {
        mon->step(r.loss_data());
      } else {
        r.plain_step();
      }
    } catch (const Error& e) {
      x.error = e.what();
    }
    detail::copy_raw(&x.s, Device::cpu(), r.scaler->state_data(), Device::cuda(0), sizeof x.s, r.stream.get());
    // update() reads the copy of its state lazily; after the synchronising
    // read above it has arrived, so an error is raised at this step either way.
    try {
      r.scaler->check_errors();
    } catch (const Error& e) {
      x.error += e.what();
    }
    seen.push_back(x);
  }
  if (mon) mon->flush();
  return seen;
}

// The end of iteration fused into the monitor's launch leaves the scaler's
// state as the scaler's own update kernel does, counter for counter (growth,
// hysteresis backoff, a clamp at min_scale, streaks of skips, a static
// scale), with the same errors at the same steps; and each record holds the
// scale the step's gradients carried (the scale before that step's update)
// and whether it was skipped.
TEST(MonitorGpu, FusedEndOfIterationLeavesTheScalerAsItsOwnKernel) {
  MIXPREC_SKIP_WITHOUT_GPU();
  amp::GradScalerOptions dynamic;
  dynamic.init_scale = 8;
  dynamic.min_scale = 3;  // step 6 backs off to 2: clamped
  dynamic.growth_interval = 3;
  dynamic.hysteresis = 2;
  dynamic.error_at_min_scale = true;
  dynamic.max_consecutive_skips = 3;
  amp::GradScalerOptions fixed;
  fixed.mode = amp::ScalingMode::static_scale;
  fixed.init_scale = 4;
  fixed.max_consecutive_skips = 2;
  for (const amp::GradScalerOptions& so : {dynamic, fixed}) {
    SCOPED_TRACE(so.mode == amp::ScalingMode::dynamic ? "dynamic" : "static");
    std::vector<monitor::LogRecord> records;
    const std::vector<ScalerSeen> plain = scaler_run(so, nullptr), fused = scaler_run(so, &records);
    ASSERT_EQ(plain.size(), fused.size());
    int errors = 0, scale_changes = 0;
    for (std::size_t k = 0; k < plain.size(); ++k) {
      const amp::DeviceScalerState &p = plain[k].s, &f = fused[k].s;
      const int step = static_cast<int>(k) + 1;
      EXPECT_EQ(p.state.scale, f.state.scale) << "step " << step;
      EXPECT_EQ(p.state.growth_tracker, f.state.growth_tracker) << "step " << step;
      EXPECT_EQ(p.state.hysteresis_tracker, f.state.hysteresis_tracker) << "step " << step;
      EXPECT_EQ(p.state.min_scale_hits, f.state.min_scale_hits) << "step " << step;
      EXPECT_EQ(p.state.skip_streak, f.state.skip_streak) << "step " << step;
      EXPECT_EQ(p.any_inf, f.any_inf) << "step " << step;
      EXPECT_EQ(p.applied, f.applied) << "step " << step;
      EXPECT_EQ(p.skipped, f.skipped) << "step " << step;
      EXPECT_EQ(p.streak_limit_hits, f.streak_limit_hits) << "step " << step;
      EXPECT_EQ(plain[k].error, fused[k].error) << "step " << step;
      errors += plain[k].error.empty() ? 0 : 1;
      if (k > 0 && p.state.scale != plain[k - 1].s.state.scale) scale_changes += 1;
    }
    // The run exercises what it claims: errors raised, streaks counted,
    // and (dynamic) the scale moving both ways.
    EXPECT_GE(errors, 2);
    EXPECT_GE(plain.back().s.streak_limit_hits, 2);
    if (so.mode == amp::ScalingMode::dynamic) {
      EXPECT_GE(scale_changes, 3);
      EXPECT_GE(plain.back().s.state.min_scale_hits, 1);
    }
    // The records: the scale before the step's update, the skip, the loss.
    ASSERT_EQ(records.size(), static_cast<std::size_t>(kScalerSteps / 10));
    for (const monitor::LogRecord& rec : records) {
      for (const monitor::StepSample& x : rec.steps) {
        const auto k = static_cast<std::size_t>(x.step - 1);
        const float before = k == 0 ? static_cast<float>(so.init_scale) : plain[k - 1].s.state.scale;
        const std::int64_t skipped_before = k == 0 ? 0 : plain[k - 1].s.skipped;
        EXPECT_EQ(x.scale, before) << "step " << x.step;
        EXPECT_EQ(x.skipped, plain[k].s.skipped > skipped_before) << "step " << x.step;
        const int step = static_cast<int>(x.step);
        EXPECT_EQ(x.skipped, overflows(step) || gradient_has_inf(step)) << "step " << x.step;
        EXPECT_EQ(x.loss, static_cast<float>(x.step) * 0.25f) << "step " << x.step;
      }
    }
  }
}

}  // namespace
}  // namespace mixprec
