// SPDX-License-Identifier: Apache-2.0
// NCCL on several GPUs, one rank per GPU, started by mpirun (issue 21's
// machine; ctest runs it with one rank on the one-GPU machine, where NCCL
// copies nothing). Every rank runs every test; a failure on any rank fails
// the job. The oracle is the MPI path (MpiCommunicator, its arithmetic
// ours and tested in dist_mpi_test) on host copies of the same data:
// with 2 ranks NCCL's sums are the same bits (a + b in either order); with
// more, NCCL may add in another order, so sums are compared within a bound
// and, always, across ranks bit for bit. Then ZeRO-1 over NCCL against
// plain data parallelism over NCCL on the same gradients: the same weights,
// bit for bit, at every step, and an inf on one rank only skips everywhere.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "../gpu_skip.hpp"
#include "rank_compare.hpp"
#include "mixprec/dist/mpi.hpp"
#include "mixprec/dist/nccl_mpi.hpp"
#include "mixprec/dist/reducer.hpp"
#include "mixprec/dist/sharded.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

dist::MpiCommunicator* g_mpi = nullptr;
dist::NcclCommunicator* g_nccl = nullptr;  // null: not enough GPUs for one a rank (every rank alike)
std::string g_why;                          // why g_nccl is null

#define SKIP_WITHOUT_NCCL()                  \
  do {                                       \
    if (g_nccl == nullptr) {                 \
      GTEST_SKIP() << g_why;                 \
    }                                        \
  } while (false)

using test::fnv;

// True when every rank passed the same value.
bool same_on_every_rank(std::uint64_t v) { return test::same_on_every_rank(v, g_mpi->comm()); }

template <class T>
std::vector<std::uint8_t> bytes_of(const Tensor<T>& t) {
  const Tensor<T> h = t.to(Device::cpu());
  const auto* p = reinterpret_cast<const std::uint8_t*>(h.data());
  return std::vector<std::uint8_t>(p, p + h.bytes());
}

// Mixed dtypes, a tensor split between slices, a zero-size one; each rank's
// values its own (seeded by rank).
struct Lists {
  Tensor<half> a{Shape{70001}};
  Tensor<float> e{Shape{0}};
  Tensor<bfloat16> b{Shape{513}};
  Tensor<float> c{Shape{37}};
  explicit Lists(int salt) {
    const auto r = static_cast<std::uint64_t>(g_mpi->rank());
    fill_normal(a, 0, 4, 100 * r + salt);
    fill_normal(b, 0, 4, 100 * r + salt + 1);
    fill_normal(c, 0, 4, 100 * r + salt + 2);
  }
  std::vector<TensorRef> refs() { return {a, e, b, c}; }
};

// reduce_scatter_sum / all_gather_slices over NCCL by pieces against the
// MPI path on host copies (uneven bounds; own-type sums as NCCL's).
TEST(DistNcclMpi, PiecesMatchTheMpiPath) {
  SKIP_WITHOUT_NCCL();
  const Device dev = g_nccl->device();
  const int w = g_mpi->size();
  dist::MpiCommunicator own(MPI_COMM_WORLD, dist::Accumulation::own_type);
  Lists host(1);
  Tensor<half> da = host.a.to(dev);
  Tensor<float> de = host.e.to(dev);
  Tensor<bfloat16> db = host.b.to(dev);
  Tensor<float> dc = host.c.to(dev);
  std::vector<TensorRef> dev_refs{da, de, db, dc};
  const std::int64_t n = 70001 + 0 + 513 + 37;
  std::vector<std::int64_t> bounds = dist::even_bounds(n, w);
  if (w > 1) bounds[1] -= 1234;  // uneven
  own.reduce_scatter_sum(host.refs(), bounds);
  g_nccl->reduce_scatter_sum(dev_refs, bounds);
  own.all_gather_slices(host.refs(), bounds);
  g_nccl->all_gather_slices(dev_refs, bounds);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // Every rank holds the whole sums now, the same bits on every rank.
  const std::uint64_t h = fnv(bytes_of(da).data(), da.bytes(), fnv(bytes_of(db).data(), db.bytes(),
                                                                   fnv(bytes_of(dc).data(), dc.bytes())));
  EXPECT_TRUE(same_on_every_rank(h));
  if (w <= 2) {  // a + b: NCCL's sum is the MPI path's, bit for bit
    EXPECT_EQ(bytes_of(da), bytes_of(host.a));
    EXPECT_EQ(bytes_of(db), bytes_of(host.b));
    EXPECT_EQ(bytes_of(dc), bytes_of(host.c));
  } else {  // another order: within W - 1 roundings of the type
    const Tensor<half> ga = da.to(Device::cpu());
    for (std::int64_t i = 0; i < host.a.numel(); ++i) {
      const float x = to_float(ga.at(i)), y = to_float(host.a.at(i));
      ASSERT_LE(std::fabs(x - y), w * std::ldexp(std::fabs(y) + 16.0f, -10)) << i;  // inputs ~N(0, 16)
    }
  }
}

// all_reduce_check: one rank's flag reaches every rank, the sums add, the
// same bits on every rank (2 ranks: exactly a + b).
TEST(DistNcclMpi, AllReduceCheckOrsAndAdds) {
  SKIP_WITHOUT_NCCL();
  const Device dev = g_nccl->device();
  const int w = g_mpi->size(), r = g_mpi->rank();
  for (int flagged = -1; flagged < w; ++flagged) {
    struct {
      int flag;
      int pad;
      double sum;
    } v{r == flagged ? 1 : 0, 0, 0.1 * (r + 1) + 1e-17 * r}, back{};
    Buffer d(sizeof v, dev);
    mixprec::detail::copy_raw(d.data(), dev, &v, Device::cpu(), sizeof v);
    g_nccl->all_reduce_check(static_cast<int*>(d.data()), reinterpret_cast<double*>(static_cast<char*>(d.data()) + 8));
    mixprec::detail::copy_raw(&back, Device::cpu(), d.data(), dev, sizeof back);
    EXPECT_EQ(back.flag != 0, flagged >= 0) << flagged;
    EXPECT_TRUE(same_on_every_rank(fnv(&back.sum, sizeof back.sum)));
    double expected = 0;
    for (int k = 0; k < w; ++k) expected += 0.1 * (k + 1) + 1e-17 * k;
    if (w <= 2) {
      EXPECT_EQ(back.sum, expected);
    } else {
      EXPECT_NEAR(back.sum, expected, 1e-15 * w);
    }
  }
}

// Three fp16 parameters on this rank's GPU and this rank's gradients of
// step s; an inf at step 4 on the last rank only.
struct Net {
  std::vector<Tensor<half>> w, g;
  explicit Net(Device dev) {
    const std::int64_t sizes[] = {65536 * 2 + 3, 1000, 17};
    for (int i = 0; i < 3; ++i) {
      Tensor<half> hw({sizes[i]});
      fill_normal(hw, 0, 1, 10 + i);
      w.push_back(hw.to(dev));
      g.push_back(Tensor<half>({sizes[i]}, dev));
    }
  }
  void gradients(int s, float scale) {
    const int r = g_mpi->rank();
    for (int i = 0; i < 3; ++i) {
      Tensor<half> hg(g[i].shape());
      fill_normal(hg, 0, 1, 1000 * s + 10 * r + i);
      for (std::int64_t e = 0; e < hg.numel(); ++e) hg.at(e) = from_float<half>(to_float(hg.at(e)) * scale);
      if (s == 4 && i == 1 && r == g_mpi->size() - 1) hg.at(7) = from_float<half>(INFINITY);
      copy(hg, g[i]);
    }
  }
  std::vector<optim::Param> params() { return {{"a", w[0], g[0]}, {"b", w[1], g[1]}, {"c", w[2], g[2]}}; }
  std::uint64_t weights() const {
    std::uint64_t h = 1469598103934665603ull;
    for (const Tensor<half>& t : w) {
      const std::vector<std::uint8_t> b = bytes_of(t);
      h = fnv(b.data(), b.size(), h);
    }
    return h;
  }
};

// ZeRO-1 over NCCL (both cuts) against plain data parallelism over NCCL on
// the same gradients: the same weights after every step, on every rank;
// the inf on one rank skips everywhere. Without clipping the weights are
// bit-identical given the same reduced gradients, which with 2 ranks they
// are (a + b); with more, NCCL's reduce and all-reduce may round apart, so
// only the cross-rank identity and the skip are checked then.
void zero_one_against_plain(dist::ShardOptions::Cut cut) {
  const Device dev = g_nccl->device();
  const int w = g_mpi->size();
  Net plain(dev), sharded(dev);
  optim::AdamW full(plain.params());
  dist::GradientReducer reducer(*g_nccl, full);
  dist::ShardedOptimizer<optim::AdamW> zero(*g_nccl, sharded.params(), optim::AdamWOptions{}, dist::ShardOptions{cut});
  amp::DeviceGradScaler s1(amp::GradScalerOptions{}, dev), s2(amp::GradScalerOptions{}, dev);
  s1.set_grad_divisor(w);
  s2.set_grad_divisor(w);
  s2.set_stats_reducer(zero.device_stats_reducer());
  for (int s = 0; s < 8; ++s) {
    plain.gradients(s, 1024.0f);
    sharded.gradients(s, 1024.0f);
    reducer.reduce();
    s1.step(full);
    s1.update();
    zero.reduce_gradients();
    s2.step(zero.shard());
    s2.update();
    zero.gather_weights();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_TRUE(same_on_every_rank(sharded.weights())) << "step " << s;
    ASSERT_EQ(s2.skipped_steps(), s >= 4 ? 1 : 0) << "step " << s;
    ASSERT_EQ(s1.scale(), s2.scale()) << "step " << s;
    if (w <= 2) {
      ASSERT_EQ(plain.weights(), sharded.weights()) << "step " << s;
    }
  }
}

TEST(DistNcclMpi, ZeroOneEqualsPlainDataParallelism) {
  SKIP_WITHOUT_NCCL();
  zero_one_against_plain(dist::ShardOptions::Cut::parameters);
  zero_one_against_plain(dist::ShardOptions::Cut::elements);
}

}  // namespace
}  // namespace mixprec

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  mixprec::dist::MpiCommunicator world;
  mixprec::g_mpi = &world;
  std::unique_ptr<mixprec::dist::NcclCommunicator> nccl;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  (void)cudaGetLastError();
  if (count == 0) {
    mixprec::g_why = "no CUDA device: cudaGetDeviceCount says 0 devices";
  } else if (count < world.local_size()) {
    mixprec::g_why = "no CUDA device for every rank: " + std::to_string(world.local_size()) + " ranks on this node, " +
                     std::to_string(count) + " GPUs";
  } else {
    nccl = mixprec::dist::nccl_over_mpi(world);
    mixprec::g_nccl = nccl.get();
  }
  int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, world.comm());
  if (world.rank() == 0 && any != 0 && failed == 0) std::fprintf(stderr, "a test failed on another rank\n");
  nccl.reset();
  return any;
}
