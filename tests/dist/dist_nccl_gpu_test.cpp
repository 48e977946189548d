// SPDX-License-Identifier: Apache-2.0
// Data parallelism over NCCL with one rank on the lent GPU (issue 16): the
// NCCL path compiles, runs, captures in a CUDA graph and is sanitizer-clean.
// Runs on several GPUs are a separate issue.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../gpu_skip.hpp"
#include "mixprec/dist/nccl.hpp"
#include "mixprec/dist/reducer.hpp"
#include "mixprec/dist/sharded.hpp"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

std::unique_ptr<dist::NcclCommunicator> one_rank() {
  return std::make_unique<dist::NcclCommunicator>(dist::NcclCommunicator::make_id(), 0, 1, Device::cuda(0));
}

template <class T>
std::vector<std::uint8_t> bytes_of(const Tensor<T>& d) {
  const Tensor<T> h = d.to(Device::cpu());
  const auto* p = reinterpret_cast<const std::uint8_t*>(h.data());
  return std::vector<std::uint8_t>(p, p + h.bytes());
}

TEST(DistNccl, OneRankAllReduceKeepsEveryBit) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  EXPECT_STREQ(comm->backend(), "nccl");
  EXPECT_EQ(comm->size(), 1);
  Tensor<half> h({70001});
  Tensor<bfloat16> b({513});
  Tensor<float> f({3});
  fill_normal(h, 0, 100, 1);
  fill_normal(b, 0, 100, 2);
  fill_normal(f, 0, 100, 3);
  Tensor<half> dh = h.to(Device::cuda(0));
  Tensor<bfloat16> db = b.to(Device::cuda(0));
  Tensor<float> df = f.to(Device::cuda(0));
  comm->all_reduce_sum(dh);
  comm->all_reduce_sum(db);
  comm->all_reduce_sum(df);
  EXPECT_EQ(bytes_of(dh), bytes_of(h.to(Device::cuda(0))));
  EXPECT_EQ(bytes_of(db), bytes_of(b.to(Device::cuda(0))));
  EXPECT_EQ(bytes_of(df), bytes_of(f.to(Device::cuda(0))));
  comm->barrier();
  // Host tensors are refused, naming the device.
  try {
    comm->all_reduce_sum(h);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cpu"), std::string::npos) << e.what();
  }
}

// Three fp16 parameters on the device and their gradients of step s.
struct Net {
  std::vector<Tensor<half>> w, g;
  Net() {
    const std::int64_t sizes[] = {65536 * 2 + 3, 1000, 17};
    for (int i = 0; i < 3; ++i) {
      Tensor<half> hw({sizes[i]});
      fill_normal(hw, 0, 1, 10 + i);
      w.push_back(hw.to(Device::cuda(0)));
      g.push_back(Tensor<half>({sizes[i]}, Device::cuda(0)));
    }
  }
  void gradients(int s, float scale) {
    for (int i = 0; i < 3; ++i) {
      Tensor<half> hg(g[i].shape());
      fill_normal(hg, 0, 1, 100 * s + i);
      for (std::int64_t e = 0; e < hg.numel(); ++e) hg.at(e) = from_float<half>(to_float(hg.at(e)) * scale);
      if (s == 4 && i == 1) hg.at(7) = from_float<half>(INFINITY);
      copy(hg, g[i]);
    }
  }
  std::vector<optim::Param> params() { return {{"a", w[0], g[0]}, {"b", w[1], g[1]}, {"c", w[2], g[2]}}; }
};

TEST(DistNccl, OneRankDataParallelStepEqualsThePlainStep) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  Net dp, plain;
  optim::AdamW opt(dp.params()), ref(plain.params());
  amp::DeviceGradScaler scaler, ref_scaler;
  scaler.set_grad_divisor(comm->size());
  dist::ReducerOptions ro;
  ro.bucket_bytes = 4096;  // two buckets: "c" + "b" (2,034 bytes), "a" alone
  dist::GradientReducer reducer(*comm, opt, ro);
  EXPECT_EQ(reducer.num_buckets(), 2u);
  for (int s = 0; s < 8; ++s) {
    dp.gradients(s, 1024.0f);
    plain.gradients(s, 1024.0f);
    for (std::size_t i = 3; i-- > 0;) reducer.mark_ready(i);
    reducer.reduce();
    scaler.step(opt, 1.0);
    scaler.update();
    ref_scaler.step(ref, 1.0);
    ref_scaler.update();
  }
  EXPECT_EQ(scaler.skipped_steps(), 1);
  const optim::OptimizerState a = opt.save_state(), b = ref.save_state();
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a.params[i].master, b.params[i].master) << i;
    EXPECT_EQ(bytes_of(dp.w[i]), bytes_of(plain.w[i])) << i;
  }
}

TEST(DistNccl, TheReductionCapturesInACudaGraph) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  Net dp;
  Stream stream(Device::cuda(0));
  optim::AdamW opt(dp.params());
  opt.set_stream(stream.get());
  amp::DeviceGradScaler scaler(amp::GradScalerOptions{}, Device::cuda(0), stream.get());
  dist::GradientReducer reducer(*comm, opt);
  dp.gradients(1, 1024.0f);
  auto step = [&] {
    reducer.reduce(stream.get());
    scaler.step(opt);
    scaler.update();
  };
  step();  // eager first: plans made
  Graph graph;
  graph.capture(stream.get(), step);
  for (int r = 0; r < 5; ++r) graph.replay(stream.get());
  stream.synchronize();
  EXPECT_EQ(opt.step_count(0), 6);
  EXPECT_EQ(scaler.applied_steps(), 6);
}

// ZeRO-1 on the GPU with one rank: the shard is the whole model, so the
// sharded step (grouped ncclReduce / ncclBroadcast, the scaler's flag and
// sum combined in place by all_reduce_check) must give the plain step's bits,
// with clipping and an overflow skip, for both cuts.
void zero_one_equals_the_plain_step(dist::ShardOptions::Cut cut) {
  auto comm = one_rank();
  Net dp, plain;
  dist::ShardOptions so;
  so.cut = cut;
  dist::ShardedOptimizer<optim::AdamW> sharded(*comm, dp.params(), optim::AdamWOptions{}, so);
  optim::AdamW ref(plain.params());
  amp::DeviceGradScaler scaler, ref_scaler;
  scaler.set_grad_divisor(comm->size());
  scaler.set_stats_reducer(sharded.device_stats_reducer());
  for (int s = 0; s < 8; ++s) {
    dp.gradients(s, 1024.0f);
    plain.gradients(s, 1024.0f);
    sharded.reduce_gradients();
    scaler.step(sharded.shard(), 1.0);
    ref_scaler.step(ref, 1.0);
    EXPECT_EQ(scaler.found_inf(sharded.shard()), s == 4) << "step " << s;
    if (s != 4) {
      EXPECT_EQ(scaler.grad_norm(sharded.shard()), ref_scaler.grad_norm(ref)) << "step " << s;
    }
    scaler.update();
    sharded.gather_weights();
    ref_scaler.update();
  }
  EXPECT_EQ(scaler.skipped_steps(), 1);
  EXPECT_EQ(scaler.scale(), ref_scaler.scale());
  const optim::OptimizerState a = sharded.shard().save_state(), b = ref.save_state();
  ASSERT_EQ(a.params.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a.params[i].master, b.params[i].master) << i;
    EXPECT_EQ(bytes_of(dp.w[i]), bytes_of(plain.w[i])) << i;
  }
}

TEST(DistNccl, OneRankZeroOneEqualsThePlainStep) {
  MIXPREC_SKIP_WITHOUT_GPU();
  zero_one_equals_the_plain_step(dist::ShardOptions::Cut::parameters);
  zero_one_equals_the_plain_step(dist::ShardOptions::Cut::elements);
}

TEST(DistNccl, OneRankAllReduceCheckKeepsTheValues) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  struct {
    int flag;
    int pad;
    double sum;
  } host{1, 0, 0.1}, back{};
  Buffer d(sizeof host, Device::cuda(0));
  mixprec::detail::copy_raw(d.data(), Device::cuda(0), &host, Device::cpu(), sizeof host);
  auto* flag = static_cast<int*>(d.data());
  auto* sum = reinterpret_cast<double*>(static_cast<char*>(d.data()) + 8);
  comm->all_reduce_check(flag, sum);
  mixprec::detail::copy_raw(&back, Device::cpu(), d.data(), Device::cuda(0), sizeof back);
  EXPECT_EQ(back.flag, 1);
  EXPECT_EQ(back.sum, 0.1);
}

// The sharded step captures in a CUDA graph: 1 eager + 5 replays give the
// bits of 6 plain eager steps on the same gradients.
TEST(DistNccl, ZeroOneCapturesInACudaGraph) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  Net dp, plain;
  Stream stream(Device::cuda(0));
  dist::ShardedOptimizer<optim::AdamW> sharded(*comm, dp.params(), optim::AdamWOptions{});
  sharded.shard().set_stream(stream.get());
  amp::DeviceGradScaler scaler(amp::GradScalerOptions{}, Device::cuda(0), stream.get());
  scaler.set_stats_reducer(sharded.device_stats_reducer());
  dp.gradients(1, 1024.0f);
  auto step = [&] {
    sharded.reduce_gradients(stream.get());
    scaler.step(sharded.shard());
    scaler.update();
    sharded.gather_weights(stream.get());
  };
  step();
  Graph graph;
  graph.capture(stream.get(), step);
  for (int r = 0; r < 5; ++r) graph.replay(stream.get());
  stream.synchronize();
  optim::AdamW ref(plain.params());
  amp::DeviceGradScaler ref_scaler;
  plain.gradients(1, 1024.0f);
  for (int r = 0; r < 6; ++r) {
    ref_scaler.step(ref);
    ref_scaler.update();
  }
  EXPECT_EQ(sharded.shard().step_count(0), 6);
  EXPECT_EQ(scaler.applied_steps(), 6);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(bytes_of(dp.w[i]), bytes_of(plain.w[i])) << i;
}

// More pieces than one NCCL group takes (1,100 parameters > kMaxGroupOps):
// the collectives split into groups, and the sharded step still equals the
// plain one. Collectives on a stream other than the shard's are refused, and
// so is a scaler on another stream or stepping another optimizer.
TEST(DistNccl, ZeroOneSplitsGroupsAndRefusesAnotherStream) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  static_assert(dist::NcclCommunicator::kMaxGroupOps < 1100, "more pieces than a group takes");
  std::vector<Tensor<half>> w, g, rw, rg;
  std::vector<optim::Param> params, ref_params;
  for (int i = 0; i < 1100; ++i) {
    Tensor<half> h({3 + i % 5});
    fill_normal(h, 0, 1, 7000 + i);
    w.push_back(h.to(Device::cuda(0)));
    rw.push_back(h.to(Device::cuda(0)));
    Tensor<half> hg(h.shape());
    fill_normal(hg, 0, 64, 9000 + i);
    g.push_back(hg.to(Device::cuda(0)));
    rg.push_back(hg.to(Device::cuda(0)));
    params.push_back({"p" + std::to_string(i), w.back(), g.back()});
    ref_params.push_back({"p" + std::to_string(i), rw.back(), rg.back()});
  }
  dist::ShardedOptimizer<optim::AdamW> sharded(*comm, params, optim::AdamWOptions{});
  optim::AdamW ref(ref_params);
  amp::DeviceGradScaler scaler, ref_scaler;
  scaler.set_stats_reducer(sharded.device_stats_reducer());
  for (int s = 0; s < 3; ++s) {
    sharded.reduce_gradients();
    scaler.step(sharded.shard());
    scaler.update();
    sharded.gather_weights();
    ref_scaler.step(ref);
    ref_scaler.update();
  }
  for (std::size_t i = 0; i < w.size(); ++i) ASSERT_EQ(bytes_of(w[i]), bytes_of(rw[i])) << i;
  Stream other(Device::cuda(0));
  try {
    sharded.reduce_gradients(other.get());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is not shard().stream()"), std::string::npos) << e.what();
  }
  amp::DeviceGradScaler elsewhere(amp::GradScalerOptions{}, Device::cuda(0), other.get());
  elsewhere.set_stats_reducer(sharded.device_stats_reducer());
  EXPECT_THROW(elsewhere.step(sharded.shard()), Error);
  amp::DeviceGradScaler wrong;
  wrong.set_stats_reducer(sharded.device_stats_reducer());
  try {
    wrong.step(ref);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not this rank's shard()"), std::string::npos) << e.what();
  }
}

// A sharded checkpoint on the GPU: save after 3 steps, 3 more, load, the
// same 3 again: the same bits.
TEST(DistNccl, ZeroOneCheckpointResumesBitExactly) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  Net dp;
  dist::ShardedOptimizer<optim::AdamW> sharded(*comm, dp.params(), optim::AdamWOptions{});
  amp::DeviceGradScaler scaler;
  scaler.set_stats_reducer(sharded.device_stats_reducer());
  auto steps = [&](int from, int to) {
    for (int s = from; s < to; ++s) {
      dp.gradients(s, 1024.0f);
      sharded.reduce_gradients();
      scaler.step(sharded.shard());
      scaler.update();
      sharded.gather_weights();
    }
  };
  steps(0, 3);
  const std::string path = ::testing::TempDir() + "mixprec_nccl_zero1.index";
  sharded.save_checkpoint(path, scaler);
  steps(3, 6);
  std::vector<std::vector<std::uint8_t>> first;
  for (std::size_t i = 0; i < 3; ++i) first.push_back(bytes_of(dp.w[i]));
  const optim::OptimizerState a = sharded.shard().save_state();
  const float scale = scaler.scale();
  sharded.load_checkpoint(path, scaler);
  steps(3, 6);
  const optim::OptimizerState b = sharded.shard().save_state();
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(bytes_of(dp.w[i]), first[i]) << i;
    EXPECT_EQ(a.params[i].master, b.params[i].master) << i;
  }
  EXPECT_EQ(scaler.scale(), scale);
  EXPECT_EQ(scaler.skipped_steps(), 1);  // step 4's inf, in both runs of steps 3-5
}

// The watchdog over a device collective: the stream is held by a host
// function that waits for the test, so the all-reduce queued behind it
// cannot finish; the handler (the test's, instead of ending the process)
// names it once the time-out has passed. Then the stream is let go. A
// collective queued while the stream captures a graph is not watched.
TEST(DistNccl, TheWatchdogNamesACollectiveThatDoesNotFinish) {
  MIXPREC_SKIP_WITHOUT_GPU();
  auto comm = one_rank();
  std::mutex mutex;
  std::vector<std::string> fired;
  comm->set_timeout(std::chrono::milliseconds(300), [&](const std::string& what, double seconds) {
    std::lock_guard<std::mutex> lock(mutex);
    fired.push_back(what + (seconds >= 0.3 ? " (after the time-out)" : " (too early)"));
  });
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  Tensor<float> t({1024}, Device::cuda(0));
  // Finishes in time: nothing fires.
  comm->all_reduce_sum(t, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  {
    std::lock_guard<std::mutex> lock(mutex);
    EXPECT_TRUE(fired.empty());
  }
  // Held: fires.
  static std::atomic<bool> release{false};
  release = false;
  ASSERT_EQ(cudaLaunchHostFunc(
                stream, [](void*) { while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1)); },
                nullptr),
            cudaSuccess);
  comm->all_reduce_sum(t, stream);
  const auto start = std::chrono::steady_clock::now();
  bool seen = false;
  while (!seen && std::chrono::steady_clock::now() - start < std::chrono::seconds(20)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::lock_guard<std::mutex> lock(mutex);
    seen = !fired.empty();
  }
  release = true;
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_TRUE(seen) << "the watchdog did not fire within 20 s";
  EXPECT_EQ(fired[0], "all_reduce_sum (after the time-out)");
  comm->set_timeout(std::chrono::milliseconds(0));
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

}  // namespace
}  // namespace mixprec
