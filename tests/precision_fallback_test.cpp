// SPDX-License-Identifier: Apache-2.0
// Per-layer precision fallback (issue 19, part 3), on the host: a layer moved
// to fp32 computes as the plain-loop reference says and keeps gradients that
// overflow fp16; a model with one layer built to overflow is rescued by
// policy act (exactly that layer moves, an event says so, training reaches
// the accuracy of an all-fp32 run), policy suggest only says so, off does
// nothing; a checkpoint keeps the moved layer's precision and resumes to the
// bits of the uninterrupted run; bad options are refused, naming them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "mixprec/monitor/monitor.hpp"
#include "mixprec/monitor/precision_fallback.hpp"
#include "fallback_problem.hpp"
#include "test_util.hpp"

namespace {

using namespace mixprec;
using monitor::EventKind;
using monitor::FallbackPolicy;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// --- the moved layer itself ----------------------------------------------

// y = relu(x W^T + b) and its gradients by plain loops in double, from the
// values the layer holds: independent of the layer's Eigen code.
struct LinearReference {
  std::vector<double> y, ymag, gw, gb, gx;  // ymag: sum of |terms| of each output
};

// One fp16 ulp at x (subnormals: 2^-24).
double half_ulp(float x) { return std::ldexp(1.0, std::max(std::ilogb(std::fmax(std::fabs(x), 0x1p-14f)), -14) - 10); }
LinearReference linear_reference(const std::vector<float>& x, const std::vector<float>& w,
                                 const std::vector<float>& b, const std::vector<float>& dy, int batch, int in,
                                 int out) {
  LinearReference r;
  r.y.assign(static_cast<std::size_t>(batch * out), 0.0);
  r.ymag.assign(static_cast<std::size_t>(batch * out), 0.0);
  r.gw.assign(static_cast<std::size_t>(out * in), 0.0);
  r.gb.assign(static_cast<std::size_t>(out), 0.0);
  r.gx.assign(static_cast<std::size_t>(batch * in), 0.0);
  for (int n = 0; n < batch; ++n) {
    for (int o = 0; o < out; ++o) {
      double z = b[o], mag = std::fabs(b[o]);
      for (int i = 0; i < in; ++i) {
        z += static_cast<double>(x[n * in + i]) * w[o * in + i];
        mag += std::fabs(static_cast<double>(x[n * in + i]) * w[o * in + i]);
      }
      r.ymag[n * out + o] = mag;
      r.y[n * out + o] = z > 0 ? z : 0;
      const double g = z > 0 ? static_cast<double>(dy[n * out + o]) : 0.0;
      r.gb[o] += g;
      for (int i = 0; i < in; ++i) {
        r.gw[o * in + i] += g * x[n * in + i];
        r.gx[n * in + i] += g * w[o * in + i];
      }
    }
  }
  return r;
}

template <class T>
std::vector<float> widen(TensorView<const T> v) {
  std::vector<float> out(static_cast<std::size_t>(v.numel()));
  for (std::int64_t i = 0; i < v.numel(); ++i) out[i] = to_float(v.data()[i]);
  return out;
}

TEST(Recast, Fp32LayerInAnFp16NetworkMatchesThePlainLoopsAndKeepsGradientsBeyondFp16) {
  const int batch = 8, in = 24, out = 16;
  nn::Sequential<half> net(Shape{batch, in});
  net.emplace<nn::Linear<half>>(in, out, nn::Activation::relu, true, Device::cpu(), 7);
  const std::vector<float> w16 = widen(TensorView<const half>(dynamic_cast<nn::Linear<half>&>(net.layer(0)).weight().view()));
  net.set_precision(0, DType::float32);
  ASSERT_EQ(net.precision(0), DType::float32);
  EXPECT_EQ(net.layer(0).name(), "Linear(24, 16, relu) in float32");
  auto& moved = dynamic_cast<nn::Recast<half, float>&>(net.layer(0));
  auto& inner = dynamic_cast<nn::Linear<float>&>(moved.inner());
  // The copy took the half weights exactly (widening is exact).
  EXPECT_EQ(widen(TensorView<const float>(inner.weight().view())), w16);
  // Weights no half can hold: the fp32 layer keeps them.
  fill_uniform(inner.weight(), -0.5f, 0.5f, 11);
  inner.weight().at(3) = 1.0f + std::ldexp(1.0f, -20);  // not a half
  fill_uniform(inner.bias(), -0.5f, 0.5f, 12);
  // Inputs near fp16's top and a loss-scaled gradient: the weight gradient
  // sum_n dy x reaches ~1e6, beyond fp16's 65504.
  Tensor<half> x(Shape{batch, in}), dy(Shape{batch, out});
  fill_uniform(x, 100.0f, 400.0f, 13);
  fill_uniform(dy, 200.0f, 600.0f, 14);
  const TensorView<const half> y = net.forward(x.view());
  copy(dy.view(), net.output_grad());
  net.backward();
  const std::vector<float> xf = widen(TensorView<const half>(x.view())), dyf = widen(TensorView<const half>(dy.view()));
  const LinearReference ref = linear_reference(xf, widen(TensorView<const float>(inner.weight().view())),
                                               widen(TensorView<const float>(inner.bias().view())), dyf, batch, in, out);
  // y: one rounding to half of an fp32-accumulated sum; the reference is the
  // double sum rounded to half: one fp16 ulp apart at most (the roundings
  // of two close sums may fall on either side), plus fp32's accumulation
  // error (25 terms: 25 * 2^-24 * sum |term|).
  for (std::size_t k = 0; k < ref.y.size(); ++k) {
    const float want = to_float(from_float<half>(static_cast<float>(ref.y[k])));
    EXPECT_NEAR(to_float(y.data()[k]), want, half_ulp(want) + 25 * 0x1p-24 * ref.ymag[k]) << "y[" << k << "]";
  }
  // The gradients stay fp32: finite above 65504, within fp32 accumulation
  // error (24 terms at most: relative 1e-5) of the double sums.
  double largest = 0;
  for (std::size_t k = 0; k < ref.gw.size(); ++k) {
    const float g = inner.grad_weight().at(static_cast<std::int64_t>(k));
    ASSERT_TRUE(std::isfinite(g));
    EXPECT_NEAR(g, ref.gw[k], 1e-5 * std::fabs(ref.gw[k]) + 1e-3) << "grad_weight[" << k << "]";
    largest = std::fmax(largest, std::fabs(g));
  }
  EXPECT_GT(largest, 65504.0) << "the test's gradient must lie beyond fp16's range";
  for (std::size_t k = 0; k < ref.gb.size(); ++k) {
    EXPECT_NEAR(inner.grad_bias().at(static_cast<std::int64_t>(k)), ref.gb[k], 1e-5 * std::fabs(ref.gb[k]) + 1e-3);
  }
  // The same layer in half overflows: its weight gradient holds infinities.
  nn::Sequential<half> plain(Shape{batch, in});
  auto& h = plain.emplace<nn::Linear<half>>(in, out, nn::Activation::relu, true, Device::cpu(), 7);
  convert(inner.weight(), h.weight());
  convert(inner.bias(), h.bias());
  plain.forward(x.view());
  copy(dy.view(), plain.output_grad());
  plain.backward();
  bool any_inf = false;
  for (std::int64_t k = 0; k < h.grad_weight().numel(); ++k) any_inf |= std::isinf(to_float(h.grad_weight().at(k)));
  EXPECT_TRUE(any_inf);
}

TEST(Recast, Conv2dMovesToFp32AndComputesAsThePlainLoopsSay) {
  // x [2, 3, 6, 6], kernel 3, stride 1, padding 1 -> y [2, 4, 6, 6].
  const int n = 2, c = 3, h = 6, k = 4, r = 3;
  nn::Sequential<half> net(Shape{n, c, h, h});
  net.emplace<nn::Conv2d<half>>(c, k, r, 1, 1, true, Device::cpu(), 5);
  const std::vector<float> w16 = widen(TensorView<const half>(dynamic_cast<nn::Conv2d<half>&>(net.layer(0)).weight().view()));
  net.set_precision(0, DType::float32);
  EXPECT_EQ(net.layer(0).name(), "Conv2d(3, 4, kernel=3, stride=1, padding=1) in float32");
  auto& conv = dynamic_cast<nn::Conv2d<float>&>(dynamic_cast<nn::Recast<half, float>&>(net.layer(0)).inner());
  EXPECT_EQ(widen(TensorView<const float>(conv.weight().view())), w16);
  fill_uniform(conv.weight(), -0.3f, 0.3f, 6);  // fp32 values, most not halves
  Tensor<half> x(Shape{n, c, h, h});
  fill_uniform(x, -2.0f, 2.0f, 7);
  const TensorView<const half> y = net.forward(x.view());
  const std::vector<float> xf = widen(TensorView<const half>(x.view()));
  const std::vector<float> wf = widen(TensorView<const float>(conv.weight().view()));
  for (int b = 0; b < n; ++b) {
    for (int o = 0; o < k; ++o) {
      for (int p = 0; p < h; ++p) {
        for (int q = 0; q < h; ++q) {
          double z = conv.bias().at(o), magnitude = std::fabs(conv.bias().at(o));
          for (int ci = 0; ci < c; ++ci) {
            for (int dr = 0; dr < r; ++dr) {
              for (int ds = 0; ds < r; ++ds) {
                const int hh = p + dr - 1, ww = q + ds - 1;
                if (hh < 0 || hh >= h || ww < 0 || ww >= h) continue;
                const double t =
                    static_cast<double>(xf[((b * c + ci) * h + hh) * h + ww]) * wf[((o * c + ci) * r + dr) * r + ds];
                z += t;
                magnitude += std::fabs(t);
              }
            }
          }
          // One fp16 rounding of an fp32 sum of 28 terms against the double
          // sum's: one fp16 ulp, plus fp32's accumulation error,
          // 28 * 2^-24 * sum |term|.
          const float want = to_float(from_float<half>(static_cast<float>(z)));
          const double tol = half_ulp(want) + 28 * 0x1p-24 * magnitude;
          const std::size_t at = static_cast<std::size_t>(((b * k + o) * h + p) * h + q);
          ASSERT_NEAR(to_float(y.data()[at]), want, tol) << "y[" << at << "]";
        }
      }
    }
  }
  EXPECT_EQ(net.parameters()[0].grad.dtype(), DType::float32);
}

TEST(Recast, MovesBackAndRefusesWhatCannotMove) {
  nn::Sequential<half> net(Shape{4, 6});
  net.emplace<nn::Linear<half>>(6, 5, nn::Activation::none, true, Device::cpu(), 1);
  net.emplace<nn::ActivationLayer<half>>(nn::Activation::relu);
  net.set_precision(0, DType::bfloat16);
  EXPECT_EQ(net.precision(0), DType::bfloat16);
  EXPECT_EQ(net.parameters()[0].weight.dtype(), DType::bfloat16);
  net.set_precision(0, DType::float16);  // back: a plain Linear<half> again
  EXPECT_EQ(net.precision(0), DType::float16);
  EXPECT_NE(dynamic_cast<nn::Linear<half>*>(&net.layer(0)), nullptr);
  const std::string relu = error_of([&] { net.set_precision(1, DType::float32); });
  EXPECT_NE(relu.find("ReLU cannot compute in float32"), std::string::npos) << relu;
  const std::string index = error_of([&] { net.set_precision(7, DType::float32); });
  EXPECT_NE(index.find("Sequential::set_precision: layer 7, the Sequential has 2 layers"), std::string::npos) << index;
  const std::string bad = error_of([&] { net.set_precision(0, static_cast<DType>(9)); });
  EXPECT_NE(bad.find("Sequential::set_precision: dtype = 9 for layer 0"), std::string::npos) << bad;
  EXPECT_EQ(net.precision(0), DType::float16);
  EXPECT_EQ(net.precision(1), DType::float16);
}

// --- the model with one layer built to overflow ---------------------------

// The model, data and initial weights: tests/fallback_problem.hpp.
using namespace fallback_problem;

template <class T>
void set(Tensor<T>& t, const std::vector<half>& v) {
  for (std::int64_t k = 0; k < t.numel(); ++k) t.at(k) = from_float<T>(to_float(v[static_cast<std::size_t>(k)]));
}

// One run's objects, built the same way for every run.
template <class T>
struct Trainer {
  nn::Sequential<T> model{Shape{kBatch, kIn}};
  std::unique_ptr<optim::AdamW> opt;
  std::unique_ptr<amp::GradScaler> scaler;
  std::unique_ptr<monitor::Monitor> mon;
  std::unique_ptr<monitor::PrecisionFallback<T>> fallback;
  Tensor<T> x{Shape{kBatch, kIn}};
  std::int64_t step = 0;

  Trainer(amp::GradScalerOptions so, monitor::PrecisionFallbackOptions fo, bool monitored = true) {
    auto& l0 = model.template emplace<nn::Linear<T>>(kIn, kHidden, nn::Activation::relu, true, Device::cpu(), 0);
    auto& l1 = model.template emplace<nn::Linear<T>>(kHidden, kClasses, nn::Activation::none, true, Device::cpu(), 0);
    set(l0.weight(), init().w0);
    set(l0.bias(), init().b0);
    set(l1.weight(), init().w1);
    set(l1.bias(), init().b1);
    opt = make_optimizer(model.parameters());
    scaler = std::make_unique<amp::GradScaler>(so);
    if (monitored) {
      monitor::MonitorOptions mo;
      mo.every = 5;
      mo.warnings = false;
      mon = std::make_unique<monitor::Monitor>(*opt, *scaler, mo);
      fallback = std::make_unique<monitor::PrecisionFallback<T>>(model, *opt, *mon, fo);
    }
  }

  // One training step on batch `step` of the training set.
  void train_step() {
    const Data& d = train_data();
    const std::int64_t first = (step * kBatch) % kTrain;
    for (int k = 0; k < kBatch * kIn; ++k) x.data()[k] = from_float<T>(d.x[static_cast<std::size_t>(first * kIn + k)]);
    const TensorView<const T> logits = model.forward(x.view());
    const float loss = nn::softmax_cross_entropy(logits, d.y.data() + first, static_cast<float>(scaler->scale()),
                                                 model.output_grad());
    model.backward();
    if (mon) {
      mon->step(loss);
    } else {
      scaler->step(*opt);
      scaler->update();
    }
    step += 1;
  }

  double accuracy() {
    const Data& d = test_data();
    std::int64_t correct = 0;
    for (int first = 0; first < kTest; first += kBatch) {
      for (int k = 0; k < kBatch * kIn; ++k) x.data()[k] = from_float<T>(d.x[static_cast<std::size_t>(first * kIn + k)]);
      const TensorView<const T> logits = model.forward(x.view());
      for (int b = 0; b < kBatch; ++b) {
        int best = 0;
        for (int c = 1; c < kClasses; ++c) {
          if (to_float(logits.data()[b * kClasses + c]) > to_float(logits.data()[b * kClasses + best])) best = c;
        }
        correct += best == d.y[static_cast<std::size_t>(first + b)] ? 1 : 0;
      }
    }
    return static_cast<double>(correct) / kTest;
  }
};

constexpr int kSteps = 600;

amp::GradScalerOptions static_scale() {
  amp::GradScalerOptions so;
  so.mode = amp::ScalingMode::static_scale;
  so.init_scale = 65536.0;
  return so;
}

monitor::PrecisionFallbackOptions policy(FallbackPolicy p) {
  monitor::PrecisionFallbackOptions fo;
  fo.policy = p;
  return fo;
}

// The all-fp32 run: the same model, data, initial values and optimizer,
// float everywhere, no loss scaling.
double fp32_reference_accuracy() {
  static const double acc = [] {
    amp::GradScalerOptions so;
    so.mode = amp::ScalingMode::disabled;
    Trainer<float> ref(so, {}, /*monitored=*/false);
    for (int s = 0; s < kSteps; ++s) ref.train_step();
    EXPECT_EQ(ref.scaler->skipped_steps(), 0);
    return ref.accuracy();
  }();
  return acc;
}

std::vector<const monitor::Event*> events_of(const monitor::Monitor& m, EventKind kind) {
  std::vector<const monitor::Event*> out;
  for (const monitor::Event& e : m.events()) {
    if (e.kind == kind) out.push_back(&e);
  }
  return out;
}

TEST(PrecisionFallback, ActMovesExactlyTheOverflowingLayerAndReachesTheFp32RunsAccuracy) {
  const double reference = fp32_reference_accuracy();
  // The task is learnable: the fp32 run learns it.
  EXPECT_GE(reference, 0.90);

  Trainer<half> run(static_scale(), policy(FallbackPolicy::act));
  for (int s = 0; s < 5; ++s) run.train_step();
  // Steps 1-5 overflow in layer 0 only; repeated_overflow fires at step 3
  // (3 of the last 200), the logged step 5 reports it and the fallback acts.
  ASSERT_EQ(run.scaler->skipped_steps(), 5);
  const auto overflow = events_of(*run.mon, EventKind::repeated_overflow);
  ASSERT_EQ(overflow.size(), 1u);
  EXPECT_EQ(overflow[0]->param, "0.weight");
  const auto moved = events_of(*run.mon, EventKind::precision_fallback);
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_EQ(moved[0]->param, "0.weight");
  EXPECT_EQ(moved[0]->step, 5);
  EXPECT_NE(moved[0]->message.find("layer 0 (Linear(16, 32, relu)) moved from float16 to float32"), std::string::npos)
      << moved[0]->message;
  ASSERT_EQ(run.fallback->moves().size(), 1u);
  EXPECT_EQ(run.fallback->moves()[0].layer, 0u);
  EXPECT_EQ(run.model.precision(0), DType::float32);
  EXPECT_EQ(run.model.precision(1), DType::float16);
  // The optimizer now steps the fp32 tensors; the fp32 weights are the masters.
  EXPECT_EQ(run.opt->param(0).weight.dtype(), DType::float32);
  EXPECT_EQ(run.opt->param(0).grad.dtype(), DType::float32);
  EXPECT_EQ(run.opt->param(1).weight.dtype(), DType::float32);  // 0.bias moves with its layer
  EXPECT_EQ(run.opt->param(2).weight.dtype(), DType::float16);
  const TensorView<float> w0 = run.opt->param(0).weight.as<float>();
  for (std::int64_t k = 0; k < w0.numel(); ++k) ASSERT_EQ(w0.data()[k], run.opt->master(0).at(k));
  EXPECT_EQ(run.mon->info().params[0].dtype, "float32");

  for (int s = 5; s < kSteps; ++s) run.train_step();
  EXPECT_EQ(run.scaler->skipped_steps(), 5) << "no overflow once layer 0 is fp32";
  EXPECT_EQ(run.fallback->moves().size(), 1u);
  const double acc = run.accuracy();
  // Tolerance: 2 points of the 2048 test samples. The runs differ by the
  // five skipped steps and by fp16 activations, weights and gradients
  // everywhere but layer 0; over 600 steps that moved a handful of samples.
  std::printf("fp32 reference accuracy %.4f, fp16 with layer 0 moved %.4f\n", reference, acc);
  EXPECT_GE(acc, reference - 0.02);
}

// on_move hears each move once, after it is made; generation() counts the
// moves (and load_state's), and check_graph tells a graph captured before
// a move from a current one, naming the move.
TEST(PrecisionFallback, OnMoveHearsTheMoveAndCheckGraphRefusesAStaleGeneration) {
  monitor::PrecisionFallbackOptions fo = policy(FallbackPolicy::act);
  std::vector<monitor::PrecisionMove> heard;
  std::vector<DType> precision_then;
  Trainer<half>* self = nullptr;
  fo.on_move = [&](const monitor::PrecisionMove& m) {
    heard.push_back(m);
    precision_then.push_back(self->model.precision(m.layer));
  };
  Trainer<half> run(static_scale(), fo);
  self = &run;
  const std::uint64_t captured_at = run.fallback->generation();
  EXPECT_EQ(captured_at, 0u);
  EXPECT_NO_THROW(run.fallback->check_graph(captured_at));
  for (int s = 0; s < 20; ++s) run.train_step();
  ASSERT_EQ(heard.size(), 1u);
  EXPECT_EQ(heard[0].layer, 0u);
  EXPECT_EQ(heard[0].step, 5);
  EXPECT_EQ(heard[0].param, "0.weight");
  EXPECT_EQ(heard[0].from, DType::float16);
  EXPECT_EQ(heard[0].to, DType::float32);
  EXPECT_EQ(heard[0].trigger, EventKind::repeated_overflow);
  EXPECT_EQ(precision_then[0], DType::float32) << "on_move comes after the move";
  EXPECT_EQ(run.fallback->generation(), 1u);
  const std::string stale = error_of([&] { run.fallback->check_graph(captured_at); });
  EXPECT_NE(stale.find("PrecisionFallback::check_graph: the CUDA graph captured at generation 0 would replay freed "
                       "buffers (generation() is 1: 1 layer change(s) since; the last: layer 0 (Linear(16, 32, "
                       "relu)) moved to float32 after step 5)"),
            std::string::npos)
      << stale;
  EXPECT_NO_THROW(run.fallback->check_graph(1));
  const std::string ahead = error_of([&] { run.fallback->check_graph(7); });
  EXPECT_NE(ahead.find("check_graph: captured_at = 7, but generation() is 1"), std::string::npos) << ahead;

  // load_state counts the layers it moves, and calls no on_move.
  Trainer<half> fresh(static_scale(), policy(FallbackPolicy::act));
  EXPECT_EQ(monitor::restore_precisions(fresh.model, *fresh.opt, run.fallback->save_state()), 1u);
  EXPECT_EQ(monitor::restore_precisions(fresh.model, *fresh.opt, run.fallback->save_state()), 0u) << "already so";
  Trainer<half> loaded(static_scale(), fo);
  self = &loaded;
  loaded.fallback->load_state(run.fallback->save_state());
  EXPECT_EQ(loaded.fallback->generation(), 1u);
  EXPECT_EQ(heard.size(), 1u);
  EXPECT_NE(error_of([&] { loaded.fallback->check_graph(0); }).find("by load_state"), std::string::npos);
}

// An on_move that throws: the exception reaches the caller of the step
// that logged the record, the move stays made and counted, and the monitor
// logs that record once (it does not read it again at the next step).
TEST(PrecisionFallback, AnOnMoveThatThrowsLeavesTheMoveMadeAndTheRecordLoggedOnce) {
  monitor::PrecisionFallbackOptions fo = policy(FallbackPolicy::act);
  int calls = 0;
  fo.on_move = [&](const monitor::PrecisionMove&) {
    calls += 1;
    throw std::runtime_error("the trainer's graphs could not be dropped");
  };
  Trainer<half> run(static_scale(), fo);
  std::string thrown;
  int step = 0;
  for (; step < 20 && thrown.empty(); ++step) {
    try {
      run.train_step();
    } catch (const std::runtime_error& e) {
      thrown = e.what();
    }
  }
  ASSERT_EQ(thrown, "the trainer's graphs could not be dropped");
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(run.model.precision(0), DType::float32);
  ASSERT_EQ(run.fallback->moves().size(), 1u);
  EXPECT_EQ(run.fallback->generation(), 1u);
  const std::int64_t records = run.mon->records();
  EXPECT_EQ(records, step / 5) << "the record of the move is counted";
  for (int s = 0; s < 10; ++s) run.train_step();  // no second move, no second call, no record read twice
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(run.fallback->moves().size(), 1u);
  EXPECT_EQ(run.mon->records(), records + 2);
}

TEST(PrecisionFallback, OffAndSuggestLeaveTheModelAsItIs) {
  for (FallbackPolicy p : {FallbackPolicy::off, FallbackPolicy::suggest}) {
    Trainer<half> run(static_scale(), policy(p));
    for (int s = 0; s < 40; ++s) run.train_step();
    // Without the move every step overflows in layer 0 and is skipped:
    // nothing trains.
    EXPECT_EQ(run.scaler->skipped_steps(), 40) << to_string(p);
    EXPECT_EQ(run.model.precision(0), DType::float16) << to_string(p);
    EXPECT_EQ(run.opt->param(0).weight.dtype(), DType::float16);
    EXPECT_TRUE(run.fallback->moves().empty());
    EXPECT_EQ(events_of(*run.mon, EventKind::repeated_overflow).size(), 1u);
    const auto said = events_of(*run.mon, EventKind::precision_fallback);
    if (p == FallbackPolicy::off) {
      EXPECT_TRUE(said.empty());
    } else {
      ASSERT_EQ(said.size(), 1u) << "suggested once, not at every record";
      EXPECT_EQ(said[0]->param, "0.weight");
      EXPECT_NE(said[0]->message.find("layer 0 (Linear(16, 32, relu)) should compute in float32"), std::string::npos)
          << said[0]->message;
      EXPECT_NE(said[0]->suggestion.find("model.set_precision(0, DType::float32)"), std::string::npos);
      EXPECT_EQ(run.fallback->suggested().count(0), 1u);
    }
  }
}

// Under dynamic scaling layer 0's first overflows are the scaler probing:
// it backs off a few times (staying within 2^4 of init_scale) and then a
// scale holds. Since issue 19 part 4 that raises no repeated_overflow
// (docs/monitor.md#detectors), so nothing moves, and fp16 trains at the
// lower scale.
TEST(PrecisionFallback, DynamicScalingsProbingMovesNothing) {
  Trainer<half> run(amp::GradScalerOptions{}, policy(FallbackPolicy::act));
  for (int s = 0; s < kSteps; ++s) run.train_step();
  EXPECT_GT(run.scaler->skipped_steps(), 0) << "layer 0 overflowed at the first scales";
  EXPECT_TRUE(events_of(*run.mon, EventKind::repeated_overflow).empty());
  EXPECT_TRUE(run.fallback->moves().empty());
  EXPECT_EQ(run.model.precision(0), DType::float16);
  const double acc = run.accuracy(), reference = fp32_reference_accuracy();
  std::printf("fp32 reference accuracy %.4f, fp16 with dynamic scaling %.4f (scale %g, %lld skipped)\n", reference,
              acc, static_cast<double>(run.scaler->scale()), static_cast<long long>(run.scaler->skipped_steps()));
  EXPECT_GE(acc, reference - 0.02);
}

// Underflow: layer 0 reads inputs of ~2^-16 with weights 2^16 the usual
// (the network is an ordinary one in 2^16 x), trained without loss scaling:
// its weight gradient is 2^-16 of the ordinary one, and a rising share of
// it falls under 2^-24, lost in fp16. The detector's thresholds are set so
// that a share of 25% fires (no rise asked, no minimum size).
struct UnderflowRun {
  static constexpr float kShrink = 65536.0f;  // 2^16
  nn::Sequential<half> model{Shape{kBatch, kIn}};
  std::unique_ptr<optim::AdamW> opt;
  std::unique_ptr<amp::GradScaler> scaler;
  std::unique_ptr<monitor::Monitor> mon;
  std::unique_ptr<monitor::PrecisionFallback<half>> fallback;

  explicit UnderflowRun(bool on_underflow) {
    auto& l0 = model.emplace<nn::Linear<half>>(kIn, kHidden, nn::Activation::relu, true, Device::cpu(), 1);
    for (std::int64_t k = 0; k < l0.weight().numel(); ++k) {
      l0.weight().at(k) = from_float<half>(to_float(l0.weight().at(k)) * kShrink);
    }
    model.emplace<nn::Linear<half>>(kHidden, kClasses, nn::Activation::none, true, Device::cpu(), 2);
    opt = make_optimizer(model.parameters(), kShrink);
    amp::GradScalerOptions so;
    so.mode = amp::ScalingMode::disabled;
    scaler = std::make_unique<amp::GradScaler>(so);
    monitor::MonitorOptions mo;
    mo.every = 5;
    mo.warnings = false;
    mo.detectors.underflow_rise = 0;
    mo.detectors.underflow_min_numel = 0;
    mon = std::make_unique<monitor::Monitor>(*opt, *scaler, mo);
    monitor::PrecisionFallbackOptions fo = policy(FallbackPolicy::act);
    fo.on_underflow = on_underflow;
    fallback = std::make_unique<monitor::PrecisionFallback<half>>(model, *opt, *mon, fo);
  }

  void train(int steps) {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> teacher(kClasses * kIn);
    for (float& t : teacher) t = normal(rng);
    Tensor<half> x(Shape{kBatch, kIn});
    std::vector<std::int32_t> y(kBatch);
    std::vector<float> u(kIn);
    for (int s = 0; s < steps; ++s) {
      for (int b = 0; b < kBatch; ++b) {
        for (int i = 0; i < kIn; ++i) {
          u[i] = normal(rng);
          x.at(b * kIn + i) = from_float<half>(u[i] / kShrink);
        }
        float best = -1e30f;
        for (int c = 0; c < kClasses; ++c) {
          float score = 0;
          for (int i = 0; i < kIn; ++i) score += teacher[c * kIn + i] * u[i];
          if (score > best) {
            best = score;
            y[b] = c;
          }
        }
      }
      const float loss = nn::softmax_cross_entropy(model.forward(x.view()), y.data(), 1.0f, model.output_grad());
      model.backward();
      mon->step(loss);
    }
  }
};

TEST(PrecisionFallback, AnUnderflowingLayerMovesOnlyWhenUnderflowMayTrigger) {
  UnderflowRun run(/*on_underflow=*/true);
  run.train(400);
  const auto under = events_of(*run.mon, EventKind::underflow);
  ASSERT_FALSE(under.empty());
  EXPECT_EQ(under[0]->param, "0.weight");
  const auto moved = events_of(*run.mon, EventKind::precision_fallback);
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_EQ(moved[0]->param, "0.weight");
  EXPECT_EQ(moved[0]->step, under[0]->step) << "the move answers the record that reported the underflow";
  EXPECT_NE(moved[0]->message.find("0.weight's gradient underflows float16"), std::string::npos) << moved[0]->message;
  EXPECT_EQ(run.model.precision(0), DType::float32);
  EXPECT_EQ(run.model.precision(1), DType::float16);
  // The fp32 gradient keeps what fp16 loses: nonzero values under 2^-24.
  const TensorView<float> g = run.opt->param(0).grad.as<float>();
  int kept = 0;
  for (std::int64_t k = 0; k < g.numel(); ++k) kept += g.data()[k] != 0 && std::fabs(g.data()[k]) < 0x1p-24f;
  EXPECT_GT(kept, 0);
  // And the detectors now judge fp16 parameters only: 0.weight is not named again.
  for (const auto* e : events_of(*run.mon, EventKind::underflow)) {
    if (e->step > moved[0]->step) {
      EXPECT_NE(e->param, "0.weight");
    }
  }

  UnderflowRun off(/*on_underflow=*/false);
  off.train(400);
  EXPECT_FALSE(events_of(*off.mon, EventKind::underflow).empty());
  EXPECT_TRUE(events_of(*off.mon, EventKind::precision_fallback).empty());
  EXPECT_EQ(off.model.precision(0), DType::float16);
}

TEST(PrecisionFallback, OnOverflowFalseIgnoresOverflow) {
  monitor::PrecisionFallbackOptions fo = policy(FallbackPolicy::act);
  fo.on_overflow = false;
  Trainer<half> run(static_scale(), fo);
  for (int s = 0; s < 20; ++s) run.train_step();
  EXPECT_EQ(events_of(*run.mon, EventKind::repeated_overflow).size(), 1u);
  EXPECT_TRUE(run.fallback->moves().empty());
  EXPECT_EQ(run.scaler->skipped_steps(), 20);
}

// A user's layer with a parameter and no copy in another type: y = x * w
// per feature.
class Gain final : public nn::Layer<half> {
 public:
  explicit Gain(std::int64_t features) : w_(Shape{features}), g_(Shape{features}) {
    fill(w_, 1.0f / kGain);
    fill(g_, 0.0f);
  }
  std::string name() const override { return "Gain"; }
  Device device() const override { return Device::cpu(); }
  Shape output_shape(const Shape& in) const override { return in; }
  void forward(TensorView<const half> x, TensorView<half> y, const nn::Context&) override {
    const std::int64_t f = w_.numel();
    for (std::int64_t i = 0; i < x.numel(); ++i) y.data()[i] = from_float<half>(to_float(x.data()[i]) * to_float(w_.at(i % f)));
  }
  void backward(TensorView<const half> x, TensorView<const half>, TensorView<const half> dy, TensorView<half> dx,
                const nn::Context&) override {
    const std::int64_t f = w_.numel();
    std::vector<float> g(static_cast<std::size_t>(f), 0.0f);
    for (std::int64_t i = 0; i < x.numel(); ++i) g[i % f] += to_float(dy.data()[i]) * to_float(x.data()[i]);
    for (std::int64_t k = 0; k < f; ++k) g_.at(k) = from_float<half>(g[k]);
    if (!dx.empty()) {
      for (std::int64_t i = 0; i < x.numel(); ++i) dx.data()[i] = from_float<half>(to_float(dy.data()[i]) * to_float(w_.at(i % f)));
    }
  }
  std::vector<optim::Param> parameters(const std::string& prefix) override { return {{prefix + "weight", w_, g_}}; }

 private:
  Tensor<half> w_, g_;
};

TEST(PrecisionFallback, ALayerThatCannotMoveIsReportedOnceAndTrainingGoesOn) {
  nn::Sequential<half> model(Shape{kBatch, kIn});
  model.emplace<Gain>(kIn);
  model.emplace<nn::Linear<half>>(kIn, kClasses, nn::Activation::none, true, Device::cpu(), 3);
  optim::AdamW opt(model.parameters());
  amp::GradScaler scaler(static_scale());
  monitor::MonitorOptions mo;
  mo.every = 5;
  mo.warnings = false;
  mo.detectors.repeat_interval = 10;  // the overflow event again every 10 steps
  monitor::Monitor mon(opt, scaler, mo);
  monitor::PrecisionFallback<half> fallback(model, opt, mon, policy(FallbackPolicy::act));
  const Data& d = train_data();
  Tensor<half> x(Shape{kBatch, kIn});
  for (int k = 0; k < kBatch * kIn; ++k) x.data()[k] = from_float<half>(d.x[static_cast<std::size_t>(k)]);
  for (int s = 0; s < 40; ++s) {
    const float loss = nn::softmax_cross_entropy(model.forward(x.view()), d.y.data(), 65536.0f, model.output_grad());
    model.backward();
    mon.step(loss);
  }
  EXPECT_GE(events_of(mon, EventKind::repeated_overflow).size(), 2u);
  const auto said = events_of(mon, EventKind::precision_fallback);
  ASSERT_EQ(said.size(), 1u) << "reported once";
  EXPECT_EQ(said[0]->param, "0.weight");
  EXPECT_NE(said[0]->message.find("layer 0 (Gain) should compute in float32"), std::string::npos) << said[0]->message;
  EXPECT_NE(said[0]->message.find("it could not move: Gain cannot compute in float32"), std::string::npos)
      << said[0]->message;
  EXPECT_TRUE(fallback.moves().empty());
  EXPECT_EQ(fallback.suggested().count(0), 1u);
  EXPECT_EQ(model.precision(0), DType::float16);
  EXPECT_EQ(opt.param(0).weight.data(), model.parameters()[0].weight.data());
  EXPECT_EQ(mon.steps(), 40);
}

// --- checkpoints ----------------------------------------------------------

struct Final {
  std::vector<std::vector<float>> masters;
  std::vector<std::vector<std::uint8_t>> weights;
  std::vector<std::string> events;
  std::vector<DType> precision;
  double scale = 0;
};

template <class T>
Final final_of(Trainer<T>& run) {
  Final f;
  for (std::size_t i = 0; i < run.opt->num_params(); ++i) {
    const Tensor<float>& m = run.opt->master(i);
    f.masters.emplace_back(m.data(), m.data() + m.numel());
    const TensorRef& w = run.opt->param(i).weight;
    const auto* b = static_cast<const std::uint8_t*>(w.data());
    f.weights.emplace_back(b, b + w.bytes());
  }
  for (const monitor::Event& e : run.mon->events()) {
    f.events.push_back(std::to_string(e.step) + " " + to_string(e.kind) + " " + e.param + " " + e.message);
  }
  for (std::size_t i = 0; i < run.model.size(); ++i) f.precision.push_back(run.model.precision(i));
  f.scale = run.scaler->scale();
  return f;
}

TEST(PrecisionFallback, ACheckpointKeepsTheMovedLayerAndResumesBitExactly) {
  const int total = 60;
  Trainer<half> straight(static_scale(), policy(FallbackPolicy::act));
  for (int s = 0; s < total; ++s) straight.train_step();
  const Final want = final_of(straight);
  ASSERT_EQ(want.precision[0], DType::float32);

  // Cut before the move (step 3) and after it (step 30).
  for (int cut : {3, 30}) {
    const std::string path = mixprec::test::temp_path("fallback_" + std::to_string(cut) + ".safetensors");
    {
      Trainer<half> first(static_scale(), policy(FallbackPolicy::act));
      for (int s = 0; s < cut; ++s) first.train_step();
      io::CheckpointExtras extras;
      extras.metadata["step"] = std::to_string(first.step);
      extras.metadata["monitor"] = first.mon->save_state();
      extras.metadata["precision_fallback"] = first.fallback->save_state();
      io::save_checkpoint(path, *first.opt, *first.scaler, extras);
    }
    Trainer<half> resumed(static_scale(), policy(FallbackPolicy::act));
    // The precisions first: the checkpoint's weights are in those types.
    // Either through the fallback, or (as the examples do, whose monitor is
    // made after the load) restore_precisions, then the fallback's memory.
    const std::map<std::string, std::string> meta = io::read_checkpoint_metadata(path);
    const std::string& state = meta.at("precision_fallback");
    if (cut == 3) {
      resumed.fallback->load_state(state);
    } else {
      monitor::restore_precisions(resumed.model, *resumed.opt, state);
      EXPECT_TRUE(resumed.fallback->moves().empty());
    }
    EXPECT_EQ(resumed.model.precision(0), cut > 5 ? DType::float32 : DType::float16) << "cut " << cut;
    io::CheckpointExtras extras;
    io::load_checkpoint(path, *resumed.opt, *resumed.scaler, &extras);
    if (cut != 3) resumed.fallback->load_state(state);  // the moves; the precisions are already so
    resumed.mon->load_state(extras.metadata.at("monitor"));
    resumed.step = std::stoll(extras.metadata.at("step"));
    EXPECT_EQ(resumed.fallback->moves().size(), cut > 5 ? 1u : 0u);
    for (std::int64_t s = resumed.step; s < total; ++s) resumed.train_step();
    const Final got = final_of(resumed);
    EXPECT_EQ(got.precision, want.precision) << "cut " << cut;
    EXPECT_EQ(got.scale, want.scale) << "cut " << cut;
    ASSERT_EQ(got.masters.size(), want.masters.size());
    for (std::size_t i = 0; i < want.masters.size(); ++i) {
      EXPECT_TRUE(got.masters[i] == want.masters[i]) << "cut " << cut << ": master " << i << " differs";
      EXPECT_TRUE(got.weights[i] == want.weights[i]) << "cut " << cut << ": weight " << i << " differs";
    }
    EXPECT_EQ(got.events, want.events) << "cut " << cut;
    std::remove(path.c_str());
  }
}

TEST(PrecisionFallback, ABadStateChangesNothing) {
  Trainer<half> run(static_scale(), policy(FallbackPolicy::act));
  const std::string good = run.fallback->save_state();
  EXPECT_NE(error_of([&] { run.fallback->load_state("{}"); }).find("not a fallback state"), std::string::npos);
  const std::string wrong_count = R"({"format":"mixprec-precision-fallback-1","precision":["float32"],"moves":[],"suggested":[]})";
  EXPECT_NE(error_of([&] { run.fallback->load_state(wrong_count); }).find("the state has 1 layers, the model 2"),
            std::string::npos);
  const std::string bad_dtype =
      R"({"format":"mixprec-precision-fallback-1","precision":["float32","float8"],"moves":[],"suggested":[]})";
  EXPECT_NE(error_of([&] { run.fallback->load_state(bad_dtype); }).find("precision of layer 1 = \"float8\", must be float16"),
            std::string::npos);
  EXPECT_EQ(run.model.precision(0), DType::float16);
  EXPECT_EQ(run.opt->param(0).weight.dtype(), DType::float16);
  EXPECT_EQ(run.fallback->save_state(), good);
}

// --- options ---------------------------------------------------------------

TEST(PrecisionFallback, BadOptionsAreRefusedNamingThem) {
  EXPECT_EQ(monitor::parse_fallback_policy("act"), FallbackPolicy::act);
  EXPECT_EQ(monitor::parse_fallback_policy("suggest"), FallbackPolicy::suggest);
  EXPECT_EQ(monitor::parse_fallback_policy("off"), FallbackPolicy::off);
  EXPECT_EQ(error_of([] { monitor::parse_fallback_policy("on", "--precision-fallback"); }),
            "--precision-fallback = \"on\", must be \"off\", \"suggest\" or \"act\"");
  EXPECT_EQ(monitor::parse_fallback_dtype("bf16"), DType::bfloat16);
  EXPECT_NE(error_of([] { monitor::parse_fallback_dtype("fp16"); }).find("PrecisionFallbackOptions::to = \"fp16\""),
            std::string::npos);

  Trainer<half> run(static_scale(), {}, /*monitored=*/false);
  monitor::MonitorOptions mo;
  mo.warnings = false;
  monitor::Monitor mon(*run.opt, *run.scaler, mo);
  monitor::PrecisionFallbackOptions fo;
  fo.policy = FallbackPolicy::act;
  fo.to = DType::float16;
  const std::string to16 = error_of([&] { monitor::PrecisionFallback<half> f(run.model, *run.opt, mon, fo); });
  EXPECT_NE(to16.find("to = float16, must be bfloat16 or float32"), std::string::npos) << to16;
  fo.to = DType::float32;
  fo.policy = static_cast<FallbackPolicy>(5);
  const std::string pol = error_of([&] { monitor::PrecisionFallback<half> f(run.model, *run.opt, mon, fo); });
  EXPECT_NE(pol.find("policy = 5"), std::string::npos) << pol;

  // A bf16 model can move to fp32 only; an fp32 model nowhere.
  EXPECT_NE(error_of([] {
              monitor::PrecisionFallbackOptions o;
              o.policy = FallbackPolicy::act;
              o.to = DType::bfloat16;
              o.validate(DType::bfloat16);
            }).find("to = bfloat16 with policy = act, but the model computes in bfloat16 already"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              monitor::PrecisionFallbackOptions o;
              o.policy = FallbackPolicy::suggest;
              o.validate(DType::float32);
            }).find("the model computes in float32 already"),
            std::string::npos);
  EXPECT_NO_THROW({
    monitor::PrecisionFallbackOptions o;
    o.policy = FallbackPolicy::off;
    o.validate(DType::float32);
  });

  // An optimizer that does not hold the model's buffers.
  Trainer<half> other(static_scale(), {}, /*monitored=*/false);
  const std::string foreign =
      error_of([&] { monitor::PrecisionFallback<half> f(other.model, *run.opt, mon, policy(FallbackPolicy::act)); });
  EXPECT_NE(foreign.find("parameter \"0.weight\" holds other buffers than the model's"), std::string::npos) << foreign;
}

}  // namespace
