// SPDX-License-Identifier: Apache-2.0
// The spike guard in a data-parallel run over MPI (CPU ranks; ctest runs it
// on 1, 2 and 3 ranks): a gradient spike planted on ONE rank's local
// gradients makes every rank skip the step (the guard judges the norm of the
// reduced gradients), and a loss spike on one rank does too once the ranks
// judge the all-reduced loss. Every rank ends with the same weights, window
// and counters.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "rank_compare.hpp"
#include "mixprec/dist/mpi.hpp"
#include "mixprec/dist/reducer.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

dist::MpiCommunicator* g_comm = nullptr;

using test::fnv;

// True when every rank passed the same value.
bool same_on_every_rank(std::uint64_t v) { return test::same_on_every_rank(v, g_comm->comm()); }

struct Outcome {
  std::vector<int> guard_skipped;  // per step
  std::uint64_t fingerprint = 0;   // weights, masters, moments, window, counters
};

// 300 steps of Adam on 64 fp32 parameters; each rank's gradient is its own
// noise (seeded by rank and step), summed over the ranks by the reducer.
// At step 200 rank 0's gradient is multiplied by 50; at step 250 the last
// rank's loss by 100 (its gradient as usual).
Outcome train(bool judge_loss) {
  const int rank = g_comm->rank(), ranks = g_comm->size();
  constexpr int D = 64;
  Tensor<float> w(Shape{D}), g(Shape{D});
  fill_normal(w, 0, 1, 11);  // the same start on every rank
  optim::Adam opt({{"w", w, g}}, optim::AdamOptions{});
  amp::GradScalerOptions o = amp::GradScalerOptions::for_dtype(DType::float32);
  o.spike_guard.enabled = true;
  if (!judge_loss) o.spike_guard.loss_threshold = std::numeric_limits<double>::infinity();
  amp::GradScaler scaler(o);
  scaler.set_grad_divisor(ranks);
  dist::GradientReducer reducer(*g_comm, opt);
  Outcome out;
  for (int s = 0; s < 300; ++s) {
    std::mt19937 rng(static_cast<std::uint32_t>(1000 * s + rank));
    std::normal_distribution<float> n(0.0f, 0.1f);
    const float factor = (s == 200 && rank == 0) ? 50.0f : 1.0f;
    for (int j = 0; j < D; ++j) g.at(j) = n(rng) * factor;
    float local_loss = 1.0f + n(rng);
    if (s == 250 && rank == ranks - 1) local_loss *= 100.0f;
    reducer.reduce();
    float mean_loss = 0;
    EXPECT_EQ(MPI_Allreduce(&local_loss, &mean_loss, 1, MPI_FLOAT, MPI_SUM, g_comm->comm()), MPI_SUCCESS);
    mean_loss /= static_cast<float>(ranks);
    scaler.set_loss(mean_loss);  // the loss the ranks agree on
    const std::int64_t before = scaler.guard_skipped_steps();
    scaler.step(opt);
    scaler.update();
    out.guard_skipped.push_back(scaler.guard_skipped_steps() > before ? 1 : 0);
  }
  const optim::OptimizerState st = opt.save_state();
  std::uint64_t h = fnv(w.data(), static_cast<std::size_t>(D) * sizeof(float));
  for (const optim::ParamState& p : st.params) {
    h = fnv(p.master.data(), p.master.size() * sizeof(float), h);
    for (const auto& t : p.state) {
      if (t) h = fnv(t->data(), t->size() * sizeof(float), h);
    }
  }
  const amp::SpikeGuardSnapshot snap = scaler.spike_guard_snapshot();
  h = fnv(snap.loss.data(), snap.loss.size() * sizeof(double), h);
  h = fnv(snap.grad_norm.data(), snap.grad_norm.size() * sizeof(double), h);
  const std::int64_t counts[4] = {snap.state.count, snap.state.next, snap.state.streak, snap.state.skipped};
  out.fingerprint = fnv(counts, sizeof counts, h);
  return out;
}

TEST(SpikeGuardMpi, ASpikeOnOneRankIsSkippedByEveryRank) {
  const Outcome r = train(false);
  EXPECT_EQ(r.guard_skipped[200], 1) << "rank " << g_comm->rank() << ": rank 0's gradient spike";
  EXPECT_EQ(r.guard_skipped[250], 0) << "the loss is not judged";
  int total = 0;
  for (int x : r.guard_skipped) total += x;
  EXPECT_EQ(total, 1);
  EXPECT_TRUE(same_on_every_rank(r.fingerprint)) << "weights, moments or the guard's window differ between ranks";
}

TEST(SpikeGuardMpi, TheAllReducedLossIsJudgedAlikeOnEveryRank) {
  const Outcome r = train(true);
  EXPECT_EQ(r.guard_skipped[200], 1);
  EXPECT_EQ(r.guard_skipped[250], 1) << "rank " << g_comm->rank() << ": the last rank's loss spike, all-reduced";
  int total = 0;
  for (int x : r.guard_skipped) total += x;
  EXPECT_EQ(total, 2);
  EXPECT_TRUE(same_on_every_rank(r.fingerprint));
}

}  // namespace
}  // namespace mixprec

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  mixprec::dist::MpiCommunicator world;
  mixprec::g_comm = &world;
  int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, world.comm());
  if (world.rank() == 0 && any != 0 && failed == 0) std::fprintf(stderr, "a test failed on another rank\n");
  return any;
}
