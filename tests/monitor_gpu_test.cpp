// SPDX-License-Identifier: Apache-2.0
// The monitor on the GPU against the monitor on the host: the same model
// (fp16 weights, AdamW), the same gradients and injected overflows, a
// DeviceGradScaler on one side and a GradScaler on the other. Every step's
// record (loss, scale, skipped, which parameter overflowed) is equal, the
// exponent histograms from the device's check pass equal the host's count,
// the norms, update ratios and eps shares agree; and the same run replayed
// from two CUDA graphs (a plain and a logged step) gives the eager records.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
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
std::vector<half> gradient(int s, std::size_t i, std::int64_t n, float scale) {
  std::mt19937 rng(static_cast<std::uint32_t>(1000 * s + i));
  std::uniform_real_distribution<float> exponent(-30.0f, -2.0f);
  std::vector<half> g(static_cast<std::size_t>(n));
  for (std::int64_t k = 0; k < n; ++k) {
    const float x = (k % 13 == 0) ? 0.0f : std::exp2(exponent(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
    g[static_cast<std::size_t>(k)] = half(x * scale);
  }
  if (i == 1 && (s == 7 || s == 23)) g[3] = half(std::numeric_limits<float>::infinity());
  return g;
}

enum class Mode { host, eager, graph };

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
  monitor::Monitor mon(opt, scaler, mo);
  Buffer loss(sizeof(float), where);
  Graph graphs[2];
  std::int64_t seen = 0;
  for (int s = 1; s <= kSteps; ++s) {
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
      // The precursors: the same terms on both sides, summed in another order.
      EXPECT_EQ(std::isnan(p.v_ratio_rms), std::isnan(q.v_ratio_rms)) << what << " param " << i;
      if (!std::isnan(p.v_ratio_rms)) {
        EXPECT_NEAR(p.v_ratio_rms, q.v_ratio_rms, 1e-9 * p.v_ratio_rms) << what;
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

}  // namespace
}  // namespace mixprec
