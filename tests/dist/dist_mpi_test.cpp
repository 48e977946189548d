// SPDX-License-Identifier: Apache-2.0
// Data parallelism over MPI on CPU ranks (issue 16): run by ctest under
// mpirun with 2 and 3 ranks (and alone, as one rank). Every rank runs every
// test; a failure on any rank fails the job. Checked: the all-reduce gives
// every rank the same bits; data-parallel training of several optimizers
// with fp16 and bf16 weights ends with the same bits on every rank and
// matches a one-process run on the whole batch within a stated tolerance;
// an inf or NaN on one rank only, or a sum that overflows fp16, makes every
// rank skip and back off alike.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "rank_compare.hpp"
#include "mixprec/dist/mpi.hpp"
#include "mixprec/io/checkpoint.hpp"
#include "mixprec/dist/reducer.hpp"
#include "mixprec/dist/sharded.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

dist::MpiCommunicator* g_comm = nullptr;

using test::fnv;

// True when every rank passed the same value.
bool same_on_every_rank(std::uint64_t v) { return test::same_on_every_rank(v, g_comm->comm()); }

// The sum MpiCommunicator promises, computed here on its own: rank 0's
// value, then each next rank's added in rank order, in float (float32) or
// rounded to T after each addition (own_type).
template <class T>
T rank_order_sum(const std::vector<T>& values, dist::Accumulation how) {
  float acc = to_float(values[0]);
  for (std::size_t k = 1; k < values.size(); ++k) {
    acc = acc + to_float(values[k]);
    if (how == dist::Accumulation::own_type) acc = to_float(from_float<T>(acc));
  }
  return from_float<T>(acc);
}

template <class T>
void all_reduce_matches_oracle(dist::MpiCommunicator& comm, std::int64_t n, std::uint64_t seed) {
  const int r = comm.rank(), w = comm.size();
  Tensor<T> t({n});
  fill_normal(t, 0, 1, seed + static_cast<std::uint64_t>(r));
  std::vector<Tensor<T>> every;  // every rank's tensor (each rank can make them all from the seeds)
  for (int k = 0; k < w; ++k) {
    every.emplace_back(Shape{n});
    fill_normal(every.back(), 0, 1, seed + static_cast<std::uint64_t>(k));
  }
  if (n > 3) t.at(3) = from_float<T>(INFINITY);  // an inf on every rank stays an inf
  for (Tensor<T>& e : every) {
    if (n > 3) e.at(3) = from_float<T>(INFINITY);
  }
  comm.all_reduce_sum(t);
  EXPECT_TRUE(same_on_every_rank(fnv(t.data(), t.bytes())));
  std::vector<T> values(static_cast<std::size_t>(w));
  for (std::int64_t e = 0; e < n; ++e) {
    double exact = 0;
    for (int k = 0; k < w; ++k) {
      values[static_cast<std::size_t>(k)] = every[static_cast<std::size_t>(k)].at(e);
      exact += static_cast<double>(to_float(values[static_cast<std::size_t>(k)]));
    }
    const T want = rank_order_sum(values, comm.accumulation());
    ASSERT_EQ(std::memcmp(&want, &t.at(e), sizeof(T)), 0)
        << "element " << e << " of " << n << ": " << to_float(t.at(e)) << ", the rank-order sum is " << to_float(want);
    if (std::isfinite(exact)) {  // and it is a sum: within W - 1 roundings (float) or one of T (float32)
      const double u = sizeof(T) == 4 ? 6e-8 : std::is_same_v<T, half> ? 4.9e-4 : 3.9e-3;
      const double roundings = comm.accumulation() == dist::Accumulation::float32 && sizeof(T) == 2 ? 1 + (w - 1) * 1.2e-4 : (w - 1);
      ASSERT_NEAR(to_float(t.at(e)), exact, roundings * u * (std::fabs(exact) + 4.0)) << e;
    }
  }
}

TEST(DistMpi, AllReduceSumsInRankOrderWithTheSameBitsOnEveryRank) {
  all_reduce_matches_oracle<float>(*g_comm, 100003, 100);
  all_reduce_matches_oracle<half>(*g_comm, 4097, 200);
  all_reduce_matches_oracle<bfloat16>(*g_comm, 333, 300);
  all_reduce_matches_oracle<half>(*g_comm, 2, 400);  // fewer elements than ranks: some slices are empty
  all_reduce_matches_oracle<half>(*g_comm, 0, 500);
  dist::MpiCommunicator own(MPI_COMM_WORLD, dist::Accumulation::own_type);
  all_reduce_matches_oracle<half>(own, 4097, 600);
  all_reduce_matches_oracle<bfloat16>(own, 333, 700);
  all_reduce_matches_oracle<float>(own, 1001, 800);
}

// all_reduce_check: the or of the flags and the sum of the doubles in rank
// order (values chosen so that another order rounds differently), the same
// bits on every rank; null pointers are refused by name.
TEST(DistMpi, AllReduceCheckOrsTheFlagsAndAddsInRankOrder) {
  const int w = g_comm->size(), r = g_comm->rank();
  auto value = [](int k) { return k % 3 == 0 ? 1e16 : (k % 3 == 1 ? 1.0 : -1e16 + 3.0); };
  for (int flagged = -1; flagged < w; ++flagged) {  // -1: no rank's flag is set
    int flag = r == flagged ? 1 : 0;
    double sum = value(r);
    g_comm->all_reduce_check(&flag, &sum);
    double expected = 0;
    for (int k = 0; k < w; ++k) expected += value(k);
    EXPECT_EQ(flag, flagged >= 0 ? 1 : 0) << "flagged rank " << flagged;
    EXPECT_EQ(fnv(&sum, sizeof sum), fnv(&expected, sizeof expected)) << sum << " vs " << expected;
    EXPECT_TRUE(same_on_every_rank(fnv(&sum, sizeof sum)));
  }
  double sum = 0;
  try {
    g_comm->all_reduce_check(nullptr, &sum);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("found_inf = "), std::string::npos) << e.what();
  }
}

// reduce_scatter_sum leaves in each rank's slice the bits all_reduce_sum
// gives; all_gather_slices hands every slice to every rank. Mixed dtypes,
// tensors split between slices, a zero-size tensor, an empty slice.
TEST(DistMpi, ReduceScatterAndAllGatherHaveTheAllReduceBits) {
  const int r = g_comm->rank(), w = g_comm->size();
  auto seed = [&](int k) { return 900 + static_cast<std::uint64_t>(r) * 10 + static_cast<std::uint64_t>(k); };
  Tensor<half> a({51}), a2({51});
  Tensor<float> b({0}), b2({0}), c({17}), c2({17});
  Tensor<bfloat16> d({130}), d2({130});
  fill_normal(a, 0, 1, seed(1));
  fill_normal(c, 0, 1, seed(2));
  fill_normal(d, 0, 1, seed(3));
  copy(a, a2);
  copy(c, c2);
  copy(d, d2);
  for (TensorRef t : std::vector<TensorRef>{a2, c2, d2}) g_comm->all_reduce_sum(t);
  const std::vector<TensorRef> ts{a, b, c, d};
  std::vector<std::int64_t> bounds = dist::even_bounds(198, w);
  if (w > 1) bounds[1] = bounds[0];  // rank 0 owns nothing
  g_comm->reduce_scatter_sum(ts, bounds);
  // Every element of this rank's slice: the all-reduce's bits.
  auto element_bits = [](const TensorRef& t, std::int64_t e) {
    std::uint32_t bits = 0;
    const std::size_t s = dtype_size(t.dtype());
    std::memcpy(&bits, static_cast<const unsigned char*>(t.data()) + static_cast<std::size_t>(e) * s, s);
    return bits;
  };
  const std::vector<TensorRef> want{a2, b2, c2, d2};
  std::int64_t at = 0;
  for (std::size_t i = 0; i < ts.size(); ++i) {
    for (std::int64_t e = 0; e < ts[i].numel(); ++e, ++at) {
      if (at >= bounds[static_cast<std::size_t>(r)] && at < bounds[static_cast<std::size_t>(r) + 1]) {
        ASSERT_EQ(element_bits(ts[i], e), element_bits(want[i], e)) << "tensor " << i << " element " << e;
      }
    }
  }
  g_comm->all_gather_slices(ts, bounds);
  for (std::size_t i = 0; i < ts.size(); ++i) {
    for (std::int64_t e = 0; e < ts[i].numel(); ++e) {
      ASSERT_EQ(element_bits(ts[i], e), element_bits(want[i], e)) << "after the gather, tensor " << i << " element " << e;
    }
  }
  // Bad bounds: refused, naming them, before anything moves.
  try {
    g_comm->reduce_scatter_sum(ts, dist::even_bounds(197, w));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("need 0 to 198"), std::string::npos) << e.what();
  }
}

// Linear regression y = x . w* in fp16 or bf16, the loss the mean over the
// batch of (x . w - y)^2 / 2; gradients written (scaled) by this "backward".
template <class T>
struct Regression {
  static constexpr std::int64_t kDim = 37, kBatch = 24;  // kBatch: divisible by 1, 2, 3 ranks
  Tensor<T> w{Shape{kDim}}, g{Shape{kDim}}, bias{Shape{1}}, gb{Shape{1}};
  std::vector<float> x, y;  // the whole batch of every step, [step][kBatch][kDim]
  Regression() {
    fill_normal(w, 0, 0.1f, 5);
    fill(bias, 0.0f);
    std::mt19937_64 rng(11);
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::vector<float> truth(kDim);
    for (float& t : truth) t = n(rng);
    for (int s = 0; s < 40; ++s) {
      for (std::int64_t b = 0; b < kBatch; ++b) {
        float dot = 0.5f;
        for (std::int64_t d = 0; d < kDim; ++d) {
          x.push_back(n(rng));
          dot += x.back() * truth[d];
        }
        y.push_back(dot);
      }
    }
  }
  // Gradients of the mean loss over samples [first, first + count) of step s, times `scale`.
  void backward(int s, std::int64_t first, std::int64_t count, float scale) {
    std::vector<double> gw(kDim, 0.0);
    double g0 = 0;
    for (std::int64_t b = first; b < first + count; ++b) {
      const float* xs = &x[(static_cast<std::size_t>(s) * kBatch + b) * kDim];
      double pred = to_float(bias.at(0));
      for (std::int64_t d = 0; d < kDim; ++d) pred += static_cast<double>(to_float(w.at(d))) * xs[d];
      const double err = pred - y[static_cast<std::size_t>(s) * kBatch + b];
      for (std::int64_t d = 0; d < kDim; ++d) gw[d] += err * xs[d];
      g0 += err;
    }
    for (std::int64_t d = 0; d < kDim; ++d) g.at(d) = from_float<T>(static_cast<float>(gw[d] / count * scale));
    gb.at(0) = from_float<T>(static_cast<float>(g0 / count * scale));
  }
  std::vector<optim::Param> params() { return {{"w", w, g}, {"bias", bias, gb}}; }
};

enum class Kind { adamw, sgd, rmsprop };

std::unique_ptr<optim::Optimizer> make(Kind k, std::vector<optim::Param> p) {
  switch (k) {
    case Kind::adamw: {
      optim::AdamWOptions o;
      o.lr = 1e-2;
      return std::make_unique<optim::AdamW>(std::move(p), o);
    }
    case Kind::sgd: {
      optim::SGDOptions o;
      o.lr = 1e-2;
      o.momentum = 0.9;
      o.nesterov = true;
      return std::make_unique<optim::SGD>(std::move(p), o);
    }
    case Kind::rmsprop: {
      optim::RMSpropOptions o;
      o.lr = 1e-3;
      o.centered = true;
      return std::make_unique<optim::RMSprop>(std::move(p), o);
    }
  }
  return nullptr;
}

// The fingerprint of everything a rank holds: state, weights, scaler.
template <class T>
std::uint64_t fingerprint(const optim::Optimizer& opt, const Regression<T>& m, const amp::GradScaler& s) {
  const optim::OptimizerState st = opt.save_state();
  std::uint64_t h = 1469598103934665603ull;
  for (const optim::ParamState& p : st.params) {
    h = fnv(p.master.data(), p.master.size() * 4, h);
    for (const auto& t : p.state) {
      if (t) h = fnv(t->data(), t->size() * 4, h);
    }
    h = fnv(&p.step, 8, h);
  }
  h = fnv(m.w.data(), m.w.bytes(), h);
  h = fnv(m.bias.data(), m.bias.bytes(), h);
  const float scale = s.scale();
  const std::int64_t counts[2] = {s.applied_steps(), s.skipped_steps()};
  h = fnv(&scale, 4, h);
  return fnv(counts, sizeof counts, h);
}

template <class T>
void train_data_parallel(Kind kind) {
  const int r = g_comm->rank(), w = g_comm->size();
  const std::int64_t local = Regression<T>::kBatch / w;
  Regression<T> dp, one;  // this rank's data-parallel model; the one-process reference
  auto opt = make(kind, dp.params());
  auto ref = make(kind, one.params());
  amp::GradScalerOptions so;
  // A scale that only backs off: a growing one meets organic overflows,
  // which the sum over ranks reaches sooner than the one-process run.
  so.init_scale = 1024.0;
  so.growth_interval = 1000;
  if (std::is_same_v<T, bfloat16>) so.mode = amp::ScalingMode::static_scale;
  amp::GradScaler scaler(so), ref_scaler(so);
  scaler.set_grad_divisor(w);
  dist::ReducerOptions ro;
  ro.bucket_bytes = 64;  // w alone is 74 (fp16) bytes: two buckets
  dist::GradientReducer reducer(*g_comm, *opt, ro);
  EXPECT_EQ(reducer.num_buckets(), 2u);
  int skipped = 0;
  for (int s = 0; s < 40; ++s) {
    dp.backward(s, r * local, local, scaler.scale());
    one.backward(s, 0, Regression<T>::kBatch, ref_scaler.scale());
    // An inf on the last rank only (step 7), a NaN on rank 0 only (step 12):
    // the sum carries it to every rank. The reference skips these steps too.
    if (s == 7 && r == w - 1) dp.g.at(3) = from_float<T>(INFINITY);
    if (s == 12 && r == 0) dp.gb.at(0) = from_float<T>(NAN);
    if (s == 7 || s == 12) one.g.at(3) = from_float<T>(INFINITY);
    reducer.mark_ready(1);  // the bias first, as a backward pass goes
    reducer.mark_ready(0);
    reducer.reduce();
    const bool applied = scaler.step(*opt);
    scaler.update();
    ref_scaler.step(*ref);
    ref_scaler.update();
    skipped += applied ? 0 : 1;
    ASSERT_EQ(applied, s != 7 && s != 12) << "rank " << r << " step " << s;
    ASSERT_TRUE(same_on_every_rank(fingerprint(*opt, dp, scaler))) << "step " << s;
    ASSERT_EQ(scaler.scale(), ref_scaler.scale()) << "step " << s;
  }
  EXPECT_EQ(skipped, 2);
  // Against the one-process run on the whole batch: the mean over ranks of
  // per-rank means is the mean over the batch, but the gradients are rounded
  // to T per rank and summed in T, so the runs part by a few roundings of T
  // per step: 2^-8 (fp16) / 2^-5 (bf16) of the update, for 40 steps, bounds
  // the masters' distance (lr 1e-2).
  const double tol = (std::is_same_v<T, half> ? 40 * 1e-2 * std::ldexp(1.0, -8) : 40 * 1e-2 * std::ldexp(1.0, -5));
  double worst = 0;
  for (std::size_t i = 0; i < 2; ++i) {
    for (std::int64_t e = 0; e < opt->master(i).numel(); ++e) {
      worst = std::max(worst, std::fabs(static_cast<double>(opt->master(i).at(e)) - ref->master(i).at(e)));
    }
  }
  EXPECT_LE(worst, tol);
  // Not vacuous: the run moved the weights by much more than that.
  double moved = 0;
  Regression<T> start;
  for (std::int64_t e = 0; e < start.w.numel(); ++e) {
    moved = std::max(moved, std::fabs(static_cast<double>(to_float(start.w.at(e))) - opt->master(0).at(e)));
  }
  EXPECT_GT(moved, 10 * tol);
  if (r == 0) std::printf("%d ranks, worst master distance to one process: %.3g (bound %.3g)\n", w, worst, tol);
}

TEST(DistMpi, AdamWHalfTrainsAlikeOnEveryRank) { train_data_parallel<half>(Kind::adamw); }
TEST(DistMpi, SgdNesterovHalfTrainsAlikeOnEveryRank) { train_data_parallel<half>(Kind::sgd); }
TEST(DistMpi, RmspropCenteredHalfTrainsAlikeOnEveryRank) { train_data_parallel<half>(Kind::rmsprop); }
TEST(DistMpi, AdamWBfloat16TrainsAlikeOnEveryRank) { train_data_parallel<bfloat16>(Kind::adamw); }

TEST(DistMpi, ASumThatOverflowsFp16SkipsOnEveryRank) {
  if (g_comm->size() < 2) GTEST_SKIP() << "one rank: no sum to overflow";
  Tensor<half> w({8}), g({8});
  fill(w, 1.0f);
  optim::AdamW opt({{"w", w, g}});
  amp::GradScaler scaler;
  scaler.set_grad_divisor(g_comm->size());
  dist::GradientReducer reducer(*g_comm, opt);
  fill(g, 40000.0f);  // finite on every rank, 80000+ summed: inf in fp16
  reducer.reduce();
  EXPECT_TRUE(std::isinf(to_float(g.at(0))));
  EXPECT_FALSE(scaler.step(opt));
  scaler.update();
  EXPECT_EQ(scaler.scale(), 32768.0f);
  EXPECT_TRUE(same_on_every_rank(fnv(opt.master(0).data(), 32)));
}

// --- checkpoints of a data-parallel run ---------------------------------------
// Every rank holds the same state, so rank 0's file is the whole training
// state: it resumes on the same rank count bit-exactly, and loads on another.

struct DpRun {
  Regression<half> m;
  std::unique_ptr<optim::Optimizer> opt = make(Kind::adamw, m.params());
  amp::GradScaler scaler;
  std::unique_ptr<dist::GradientReducer> reducer;
  DpRun() {
    scaler.set_grad_divisor(g_comm->size());
    reducer = std::make_unique<dist::GradientReducer>(*g_comm, *opt);
  }
  void steps(int first, int last) {
    const int r = g_comm->rank();
    const std::int64_t local = Regression<half>::kBatch / g_comm->size();
    for (int s = first; s < last; ++s) {
      m.backward(s, r * local, local, scaler.scale());
      reducer->reduce();
      scaler.step(*opt);
      scaler.update();
    }
  }
  std::uint64_t fp() const { return fingerprint(*opt, m, scaler); }
};

std::string checkpoint_path(const char* what) {
  return ::testing::TempDir() + "dist_mpi_" + what + "_" + std::to_string(g_comm->size()) + ".safetensors";
}

TEST(DistMpi, ACheckpointOfRankZeroResumesEveryRankBitExactly) {
  DpRun straight, first;
  straight.steps(0, 20);
  first.steps(0, 10);
  const std::string path = checkpoint_path("resume");
  if (g_comm->rank() == 0) io::save_checkpoint(path, *first.opt, first.scaler);
  g_comm->barrier();
  DpRun resumed;  // fresh weights and state, then the file
  io::load_checkpoint(path, *resumed.opt, resumed.scaler);
  EXPECT_EQ(resumed.fp(), first.fp());
  resumed.steps(10, 20);
  EXPECT_EQ(resumed.fp(), straight.fp());
  EXPECT_TRUE(same_on_every_rank(resumed.fp()));
  // Rank 0 may write a checkpoint for another job (ctest's cross-world test).
  if (const char* out = std::getenv("MIXPREC_DIST_CHECKPOINT_OUT"); out != nullptr && g_comm->rank() == 0) {
    io::CheckpointExtras extras;
    extras.metadata["fingerprint"] = std::to_string(first.fp());
    io::save_checkpoint(out, *first.opt, first.scaler, extras);
  }
  g_comm->barrier();
  if (g_comm->rank() == 0) std::remove(path.c_str());
}

TEST(DistMpi, ACheckpointFromAnotherRankCountLoadsAndTrainsAlike) {
  const char* in = std::getenv("MIXPREC_DIST_CHECKPOINT_IN");
  if (in == nullptr) GTEST_SKIP() << "MIXPREC_DIST_CHECKPOINT_IN not set (ctest's dist_mpi_checkpoint_3 sets it)";
  DpRun run;
  io::CheckpointExtras extras;
  io::load_checkpoint(in, *run.opt, run.scaler, &extras);
  // The state saved by the other job, bit for bit (its fingerprint, saved
  // in the file, covers state, weights, scale and counts).
  EXPECT_EQ(std::to_string(run.fp()), extras.metadata.at("fingerprint"));
  const std::int64_t loaded = run.opt->step_count(0);
  run.steps(10, 20);
  EXPECT_TRUE(same_on_every_rank(run.fp()));
  EXPECT_GT(run.opt->step_count(0), loaded);  // it trained on (skipped steps do not count)
}

// --- ZeRO-1 (dist::ShardedOptimizer) -------------------------------------------
// Against plain data parallelism in the same job, fed the same gradients:
// uneven slices, a parameter split between ranks, a zero-size one, mixed
// dtypes, an inf on one rank only.

template <class A, class B, class C, bool kInf>
struct ParamSet {
  Tensor<A> a{Shape{37}}, ga{Shape{37}}, e{Shape{0}}, ge{Shape{0}}, d{Shape{100}}, gd{Shape{100}};
  Tensor<B> b{Shape{1}}, gb{Shape{1}};
  Tensor<C> c{Shape{5}}, gc{Shape{5}};
  ParamSet() {
    fill_normal(a, 0, 1, 1);
    fill_normal(b, 0, 1, 2);
    fill_normal(c, 0, 1, 3);
    fill_normal(d, 0, 1, 4);
  }
  std::vector<optim::Param> params() {
    return {{"a", a, ga}, {"e", e, ge}, {"b", b, gb}, {"d", d, gd}, {"c", c, gc}};
  }
  // This rank's gradients of step s (scaled); with kInf an inf at step 5 on the last rank.
  void gradients(int s, float scale) {
    const auto seed = static_cast<std::uint64_t>(1000 * s + 10 * g_comm->rank());
    fill_normal(ga, 0, 0.01f * scale, seed + 1);
    fill_normal(gb, 0, 0.01f * scale, seed + 2);
    fill_normal(gc, 0, 0.01f * scale, seed + 3);
    fill_normal(gd, 0, 0.01f * scale, seed + 4);
    if (kInf && s == 5 && g_comm->rank() == g_comm->size() - 1) gd.at(99) = from_float<A>(INFINITY);
  }
  std::uint64_t weights() const {
    std::uint64_t h = fnv(a.data(), a.bytes());
    h = fnv(b.data(), b.bytes(), h);
    h = fnv(c.data(), c.bytes(), h);
    return fnv(d.data(), d.bytes(), h);
  }
};
// Mixed dtypes, an inf on one rank at step 5.
using MixedParams = ParamSet<half, bfloat16, float, true>;

template <class Opt>
void expect_shard_is_its_slice(const dist::ShardedOptimizer<Opt>& zero, const optim::Optimizer& full);

// max_norm > 0: every step clips (unscale + clip_grad_norm + step).
template <class Opt>
void zero1_matches_data_parallel(const typename Opt::options_type& o, dist::ShardOptions::Cut cut,
                                 double max_norm = 0) {
  const int w = g_comm->size();
  MixedParams plain, sharded;
  Opt full(plain.params(), o);
  dist::GradientReducer reducer(*g_comm, full);
  dist::ShardedOptimizer<Opt> zero(*g_comm, sharded.params(), o, dist::ShardOptions{cut});
  amp::GradScaler s1, s2;
  s1.set_grad_divisor(w);
  s2.set_grad_divisor(w);
  s2.set_stats_reducer(zero.stats_reducer());
  // The slices partition the 143 elements; this rank's masters are its slice only.
  std::int64_t held = 0;
  for (std::size_t i = 0; i < zero.shard().num_params(); ++i) held += zero.shard().master(i).numel();
  EXPECT_EQ(held, zero.last() - zero.first());
  if (cut == dist::ShardOptions::Cut::elements) {
    EXPECT_EQ(zero.last() - zero.first(), 143 / w + (g_comm->rank() < 143 % w ? 1 : 0));
  } else {  // parameters of 37, 0, 1, 100, 5: cuts at 0, 37, 38, 138, 143 only
    const std::vector<std::int64_t> ends{0, 37, 38, 138, 143};
    for (std::int64_t b : zero.bounds()) EXPECT_NE(std::find(ends.begin(), ends.end(), b), ends.end()) << b;
  }
  for (int s = 0; s < 12; ++s) {
    plain.gradients(s, s1.scale());
    sharded.gradients(s, s2.scale());
    reducer.reduce();
    zero.reduce_gradients();
    const bool a1 = max_norm > 0 ? s1.step(full, max_norm) : s1.step(full);
    s1.update();
    const bool a2 = max_norm > 0 ? s2.step(zero.shard(), max_norm) : s2.step(zero.shard());
    s2.update();
    zero.gather_weights();
    ASSERT_EQ(a1, a2) << "step " << s;
    ASSERT_EQ(a1, s != 5) << "step " << s;
    ASSERT_EQ(s1.scale(), s2.scale()) << "step " << s;
    ASSERT_EQ(plain.weights(), sharded.weights()) << "step " << s << ": the weights differ";
    ASSERT_TRUE(same_on_every_rank(sharded.weights())) << "step " << s;
  }
  expect_shard_is_its_slice(zero, full);
}

// This rank's masters, state and step counts are the unsharded optimizer's
// over its slice, element for element.
template <class Opt>
void expect_shard_is_its_slice(const dist::ShardedOptimizer<Opt>& zero, const optim::Optimizer& full) {
  const optim::OptimizerState fs = full.save_state(), zs = zero.shard().save_state();
  std::vector<float> flat;
  std::vector<std::vector<float>> flat_state(fs.params[0].state.size());
  for (const optim::ParamState& p : fs.params) {
    flat.insert(flat.end(), p.master.begin(), p.master.end());
    for (std::size_t k = 0; k < p.state.size(); ++k) {
      if (p.state[k]) flat_state[k].insert(flat_state[k].end(), p.state[k]->begin(), p.state[k]->end());
    }
  }
  std::vector<std::int64_t> steps;  // per element
  for (const optim::ParamState& p : fs.params) steps.insert(steps.end(), p.master.size(), p.step);
  std::int64_t at = zero.first();
  for (const optim::ParamState& p : zs.params) {
    ASSERT_EQ(p.step, steps.at(static_cast<std::size_t>(at))) << "step count at element " << at;
    for (std::size_t e = 0; e < p.master.size(); ++e) {
      ASSERT_EQ(std::memcmp(&p.master[e], &flat[static_cast<std::size_t>(at) + e], 4), 0) << "master " << at + e;
      for (std::size_t k = 0; k < p.state.size(); ++k) {
        if (!p.state[k]) continue;
        ASSERT_EQ(std::memcmp(&(*p.state[k])[e], &flat_state[k][static_cast<std::size_t>(at) + e], 4), 0)
            << "state " << k << " element " << at + e;
      }
    }
    at += static_cast<std::int64_t>(p.master.size());
  }
  EXPECT_EQ(at, zero.last());
}

optim::AdamWOptions adamw_amsgrad() {
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.amsgrad = true;
  return o;
}

TEST(DistMpi, ZeroOneAdamWEqualsDataParallelBitForBit) {
  zero1_matches_data_parallel<optim::AdamW>(adamw_amsgrad(), dist::ShardOptions::Cut::elements);
  zero1_matches_data_parallel<optim::AdamW>(adamw_amsgrad(), dist::ShardOptions::Cut::parameters);
}

// Lean moments that are elementwise (bf16) shard as they are: still the
// unsharded run's bits. 8-bit blocks and stochastic rounding count a
// parameter's elements, which slices would renumber: refused by name.
TEST(DistMpi, ZeroOneWithBf16MomentsEqualsDataParallelBitForBit) {
  optim::AdamWOptions o = adamw_amsgrad();
  o.layout.moments = optim::Moments::bf16;
  zero1_matches_data_parallel<optim::AdamW>(o, dist::ShardOptions::Cut::elements);
  MixedParams p;
  o.layout.moments = optim::Moments::int8;
  try {
    dist::ShardedOptimizer<optim::AdamW> zero(*g_comm, p.params(), o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moments = 8bit"), std::string::npos) << e.what();
  }
  o.layout.moments = optim::Moments::bf16_sr;  // its counter numbers the parameter's elements
  try {
    dist::ShardedOptimizer<optim::AdamW> zero(*g_comm, p.params(), o);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moments = bf16sr"), std::string::npos) << e.what();
  }  // A pre-pass (update clipping, LAMB) sums whole tensors: refused too.
  optim::AdamWOptions clip = adamw_amsgrad();
  clip.update_clipping = true;
  try {
    dist::ShardedOptimizer<optim::AdamW> zero(*g_comm, p.params(), clip);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("per-tensor sums"), std::string::npos) << e.what();
  }
}

TEST(DistMpi, ZeroOneSgdEqualsDataParallelBitForBit) {
  optim::SGDOptions o;
  o.lr = 1e-2;
  o.momentum = 0.9;
  zero1_matches_data_parallel<optim::SGD>(o, dist::ShardOptions::Cut::elements);
  zero1_matches_data_parallel<optim::SGD>(o, dist::ShardOptions::Cut::parameters);
}

// Cut at parameters, the job's sum of squares adds every parameter's sum in
// parameter order, as one process does: the clip coefficient, and so every
// weight, has the unsharded run's bits. max_norm 1e-3 clips every step (the
// mean gradient's norm is about 0.01 * sqrt(143)).
TEST(DistMpi, ZeroOneCutAtParametersClipsBitForBit) {
  zero1_matches_data_parallel<optim::AdamW>(adamw_amsgrad(), dist::ShardOptions::Cut::parameters, 1e-3);
  optim::SGDOptions o;
  o.lr = 1e-2;
  o.momentum = 0.9;
  zero1_matches_data_parallel<optim::SGD>(o, dist::ShardOptions::Cut::parameters, 1e-3);
}

// Cut at parameters: the nearest parameter boundary that leaves every rank
// a parameter; too few parameters is a clear error. The sizes of
// examples/fashion_mnist_mlp with hidden 128 (the first layer holds 85%).
TEST(DistMpi, ZeroOneCutsAtParametersLeaveEveryRankAParameter) {
  const int w = g_comm->size();
  std::vector<Tensor<half>> ws, gs;
  for (std::int64_t n : {100352, 128, 16384, 0, 128, 1280, 10}) {
    ws.emplace_back(Shape{n});
    gs.emplace_back(Shape{n});
  }
  std::vector<optim::Param> params;
  for (std::size_t i = 0; i < ws.size(); ++i) params.push_back({"p" + std::to_string(i), ws[i], gs[i]});
  dist::ShardedOptimizer<optim::SGD> zero(*g_comm, params, optim::SGDOptions{});
  // Even cuts: 59141 (2 ranks); 39428, 78855 (3 ranks). Parameter starts:
  // 100352, 100480, 116864, 116992, 118272.
  const std::vector<std::vector<std::int64_t>> want{
      {0, 118282}, {0, 100352, 118282}, {0, 100352, 100480, 118282}};
  EXPECT_EQ(zero.bounds(), want.at(static_cast<std::size_t>(w) - 1));
  if (w < 2) return;
  std::vector<optim::Param> two{{"big", ws[0], gs[0]}, {"empty", ws[3], gs[3]}};
  if (w > 2) two.push_back({"small", ws[1], gs[1]});  // still one parameter too few
  try {
    dist::ShardedOptimizer<optim::SGD> refused(*g_comm, two, optim::SGDOptions{});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("would hold no element"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ShardOptions::Cut::elements"), std::string::npos) << e.what();
  }
  dist::ShardedOptimizer<optim::SGD> even(*g_comm, two, optim::SGDOptions{},
                                          dist::ShardOptions{dist::ShardOptions::Cut::elements});
  EXPECT_EQ(even.bounds(), dist::even_bounds(w > 2 ? 100480 : 100352, w));
}

// bf16 weights only (a remainder master needs them), the sizes of MixedParams.
using Bf16Params = ParamSet<bfloat16, bfloat16, bfloat16, false>;

// AdamW amsgrad with bf16 moments and a remainder master.
optim::AdamWOptions adamw_lean() {
  optim::AdamWOptions o = adamw_amsgrad();
  o.layout.moments = optim::Moments::bf16;
  o.layout.master = optim::Master::remainder;
  return o;
}

// A sharded run's checkpoint: every rank's shard and an index. Resumed on
// the same number of ranks it continues with the bits of a run that never
// stopped; a job of another size re-shards it (ctest's dist_mpi_checkpoint_3
// and _2).

template <class P = MixedParams>
struct ZeroRunOf {
  P m;
  dist::ShardedOptimizer<optim::AdamW> zero;
  amp::GradScaler scaler;
  double max_norm;
  explicit ZeroRunOf(dist::ShardOptions::Cut cut = dist::ShardOptions::Cut::parameters, double clip = 1e-3,
                     const optim::AdamWOptions& o = adamw_amsgrad())
      : zero(*g_comm, m.params(), o, dist::ShardOptions{cut}), max_norm(clip) {
    scaler.set_grad_divisor(g_comm->size());
    scaler.set_stats_reducer(zero.stats_reducer());
  }
  void steps(int from, int to) {
    for (int s = from; s < to; ++s) {
      m.gradients(s, scaler.scale());
      zero.reduce_gradients();
      if (max_norm > 0) {
        scaler.step(zero.shard(), max_norm);
      } else {
        scaler.step(zero.shard());
      }
      scaler.update();
      zero.gather_weights();
    }
  }
  // This rank's masters and state, the weights, the scale and counts.
  std::uint64_t fp() const {
    const optim::OptimizerState st = zero.shard().save_state();
    std::uint64_t h = m.weights();
    for (const optim::ParamState& p : st.params) {
      h = fnv(p.master.data(), p.master.size() * 4, h);
      h = fnv(&p.step, sizeof p.step, h);
      for (const auto& t : p.state) {
        if (t) h = fnv(t->data(), t->size() * 4, h);
      }
    }
    const float scale = scaler.scale();
    h = fnv(&scale, 4, h);
    const std::int64_t counts[2] = {scaler.applied_steps(), scaler.skipped_steps()};
    return fnv(counts, sizeof counts, h);
  }
};
using ZeroRun = ZeroRunOf<>;

// ZeroRun's twin without sharding: plain data parallelism on the same
// parameters and gradients (the same bits, ZeroOneCutAtParametersClipsBitForBit).
template <class P = MixedParams>
struct PlainRunOf {
  P m;
  optim::AdamW opt;
  dist::GradientReducer reducer{*g_comm, opt};
  amp::GradScaler scaler;
  double max_norm;
  explicit PlainRunOf(double clip = 1e-3, const optim::AdamWOptions& o = adamw_amsgrad())
      : opt(m.params(), o), max_norm(clip) {
    scaler.set_grad_divisor(g_comm->size());
  }
  void steps(int from, int to) {
    for (int s = from; s < to; ++s) {
      m.gradients(s, scaler.scale());
      reducer.reduce();
      if (max_norm > 0) {
        scaler.step(opt, max_norm);
      } else {
        scaler.step(opt);
      }
      scaler.update();
    }
  }
};
using PlainMixedRun = PlainRunOf<>;

// This rank's shard files of the index `path`.
std::vector<std::filesystem::path> shard_files(const std::string& path) {
  const std::string stem = std::filesystem::path(path).filename().string() + ".",
                    tail = ".rank" + std::to_string(g_comm->rank());
  std::vector<std::filesystem::path> files;
  for (const auto& f : std::filesystem::directory_iterator(std::filesystem::path(path).parent_path())) {
    const std::string n = f.path().filename().string();
    if (n.rfind(stem, 0) == 0 && n.size() > tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0) {
      files.push_back(f.path());
    }
  }
  return files;
}

TEST(DistMpi, ZeroOneCheckpointResumesBitExactlyOnTheSameRankCount) {
  const std::string path = checkpoint_path("zero_index");
  const std::string other = checkpoint_path("zero_index_other");
  for (const std::string& p : {path, other}) {
    for (const auto& f : shard_files(p)) std::filesystem::remove(f);  // an earlier run's
  }
  g_comm->barrier();
  ZeroRun straight, first;
  straight.steps(0, 12);
  first.steps(0, 6);
  first.zero.save_checkpoint(path, first.scaler);
  first.steps(6, 7);  // a second save replaces the first: its shard files go
  first.zero.save_checkpoint(path, first.scaler);
  // A save to another path is another checkpoint: path's files stay.
  first.zero.save_checkpoint(other, first.scaler);
  ZeroRun resumed;  // fresh weights and state, then the files
  resumed.zero.load_checkpoint(path, resumed.scaler);
  EXPECT_EQ(resumed.fp(), first.fp());
  resumed.steps(7, 12);
  EXPECT_EQ(resumed.fp(), straight.fp());
  EXPECT_TRUE(same_on_every_rank(resumed.m.weights()));
  // The index holds the world size, and of this rank's shard files only the
  // second save's is left.
  std::ifstream index(path);
  const std::string text((std::istreambuf_iterator<char>(index)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"world_size\": " + std::to_string(g_comm->size())), std::string::npos) << text;
  EXPECT_EQ(shard_files(path).size(), 1u);
  EXPECT_EQ(shard_files(other).size(), 1u);
  if (const char* out = std::getenv("MIXPREC_DIST_CHECKPOINT_OUT"); out != nullptr) {
    // For the 3-rank job: this state sharded, and the plain twin's at the
    // same step (checked equal here first).
    for (const auto& f : shard_files(std::string(out) + ".sharded")) std::filesystem::remove(f);  // an earlier run's
    g_comm->barrier();
    first.zero.save_checkpoint(std::string(out) + ".sharded", first.scaler);
    PlainMixedRun twin;
    twin.steps(0, 7);
    EXPECT_EQ(twin.m.weights(), first.m.weights());
    expect_shard_is_its_slice(first.zero, twin.opt);
    if (g_comm->rank() == 0) io::save_checkpoint(std::string(out) + ".plain_mixed", twin.opt, twin.scaler);
    // The same with bf16 weights, bf16 moments and a remainder master.
    for (const auto& f : shard_files(std::string(out) + ".sharded_lean")) std::filesystem::remove(f);
    g_comm->barrier();
    ZeroRunOf<Bf16Params> lean(dist::ShardOptions::Cut::parameters, 1e-3, adamw_lean());
    lean.steps(0, 7);
    lean.zero.save_checkpoint(std::string(out) + ".sharded_lean", lean.scaler);
    PlainRunOf<Bf16Params> lean_twin(1e-3, adamw_lean());
    lean_twin.steps(0, 7);
    EXPECT_EQ(lean_twin.m.weights(), lean.m.weights());
    expect_shard_is_its_slice(lean.zero, lean_twin.opt);
    if (g_comm->rank() == 0) {
      io::save_checkpoint(std::string(out) + ".plain_lean", lean_twin.opt, lean_twin.scaler);
    }
  }
  g_comm->barrier();
  for (const std::string& p : {path, other}) {
    for (const auto& f : shard_files(p)) std::filesystem::remove(f);
    if (g_comm->rank() == 0) std::filesystem::remove(p);
  }
}

// The 2-rank job's sharded checkpoint (step 7) on this job's ranks, cut
// either way: re-sharded. Each rank's masters, moments, step counts and the
// weights are the 2-rank job's plain twin's at the same step, element for
// element, and 5 more steps give plain data parallelism's bits on this many
// ranks resumed from the twin's checkpoint (clipping where the cut keeps it
// bit-identical). Files for other parameters are refused, nothing changed.
TEST(DistMpi, ZeroOneCheckpointFromAnotherRankCountIsResharded) {
  const char* in = std::getenv("MIXPREC_DIST_CHECKPOINT_IN");
  if (in == nullptr) GTEST_SKIP() << "MIXPREC_DIST_CHECKPOINT_IN not set (ctest's dist_mpi_checkpoint_3 sets it)";
  const std::string sharded = std::string(in) + ".sharded", plain = std::string(in) + ".plain_mixed";
  for (const auto cut : {dist::ShardOptions::Cut::parameters, dist::ShardOptions::Cut::elements}) {
    const double clip = cut == dist::ShardOptions::Cut::parameters ? 1e-3 : 0;
    ZeroRun run(cut, clip);
    run.zero.load_checkpoint(sharded, run.scaler);
    PlainMixedRun ref(clip);
    io::load_checkpoint(plain, ref.opt, ref.scaler);
    ASSERT_EQ(run.m.weights(), ref.m.weights());
    expect_shard_is_its_slice(run.zero, ref.opt);
    EXPECT_EQ(run.scaler.scale(), ref.scaler.scale());
    EXPECT_EQ(run.scaler.skipped_steps(), 1);  // step 5's inf
    EXPECT_EQ(run.zero.shard().applied_steps(), ref.opt.applied_steps());
    run.steps(7, 12);
    ref.steps(7, 12);
    EXPECT_EQ(run.m.weights(), ref.m.weights());
    expect_shard_is_its_slice(run.zero, ref.opt);
    EXPECT_TRUE(same_on_every_rank(run.m.weights()));
  }
  {  // bf16 weights, bf16 moments, a remainder master: the weights come from the state
    ZeroRunOf<Bf16Params> run(dist::ShardOptions::Cut::elements, 0, adamw_lean());
    run.zero.load_checkpoint(std::string(in) + ".sharded_lean", run.scaler);
    PlainRunOf<Bf16Params> ref(0, adamw_lean());
    io::load_checkpoint(std::string(in) + ".plain_lean", ref.opt, ref.scaler);
    ASSERT_EQ(run.m.weights(), ref.m.weights());
    expect_shard_is_its_slice(run.zero, ref.opt);
    run.steps(7, 12);
    ref.steps(7, 12);
    EXPECT_EQ(run.m.weights(), ref.m.weights());
    expect_shard_is_its_slice(run.zero, ref.opt);
  }
  // Other parameters (the same element count, another name): refused by
  // the shard files' own check on the ranks that read "a" (rank 0 does),
  // and so on every rank, before anything changed.
  MixedParams other;
  std::vector<optim::Param> params = other.params();
  params[0].name = "renamed";
  dist::ShardedOptimizer<optim::AdamW> zero(*g_comm, params, adamw_amsgrad());
  amp::GradScaler scaler;
  const std::uint64_t before = other.weights();
  try {
    zero.load_checkpoint(sharded, scaler);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    const bool own = m.find("holds the parameters") != std::string::npos;
    EXPECT_TRUE(own || m.find("another rank failed") != std::string::npos) << m;
    if (g_comm->rank() == 0) {
      EXPECT_TRUE(own) << m;
    }
  }
  EXPECT_EQ(other.weights(), before);
  EXPECT_EQ(zero.shard().step_count(0), 0);
  EXPECT_EQ(scaler.skipped_steps(), 0);
  // An index naming a shard file that is not there (old rank 1's): the
  // ranks that need it fail, every rank throws, none waits in a collective.
  const std::string broken = std::string(in) + ".broken_index";
  if (g_comm->rank() == 0) {
    std::ifstream f(sharded);
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const std::size_t at = text.find(".rank1\"");
    ASSERT_NE(at, std::string::npos) << text;
    text.replace(at, 6, ".gone1");
    std::ofstream(broken) << text;
  }
  g_comm->barrier();
  ZeroRun run;
  const std::uint64_t fp = run.fp();
  try {
    run.zero.load_checkpoint(broken, run.scaler);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_TRUE(m.find(".gone1") != std::string::npos || m.find("another rank failed") != std::string::npos) << m;
  }
  EXPECT_EQ(run.fp(), fp);
  g_comm->barrier();
  if (g_comm->rank() == 0) std::remove(broken.c_str());
}

TEST(DistMpi, MisuseIsAClearError) {
  Tensor<half> w({8}), g({8});
  optim::SGD opt({{"w", w, g}});
  dist::GradientReducer reducer(*g_comm, opt);
  reducer.mark_ready(0);
  try {
    reducer.mark_ready(0);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already marked ready"), std::string::npos) << e.what();
  }
  reducer.reduce();
  // A gradient rebound since the reducer was built would go unsummed.
  Tensor<half> g2({8});
  opt.rebind(0, w, g2);
  try {
    reducer.reduce();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("\"w\" was rebound"), std::string::npos) << e.what();
  }
  amp::GradScaler scaler;
  try {
    scaler.set_grad_divisor(0.5);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("divisor = 0.5"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mixprec

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  mixprec::dist::MpiCommunicator world;
  mixprec::g_comm = &world;
  int failed = RUN_ALL_TESTS();
  // The job fails if any rank failed.
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, world.comm());
  if (world.rank() == 0 && any != 0 && failed == 0) std::fprintf(stderr, "a test failed on another rank\n");
  return any;
}
