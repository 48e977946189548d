// SPDX-License-Identifier: Apache-2.0
// The per-step cost of the data-parallel gradient reduction,
// dist::GradientReducer::reduce(), over the optimizer benchmarks' tensor
// list (model_list.hpp) with fp16 gradients: on CPU ranks over MPI
// (bench_reduce) and, in a build with NCCL, on GPU ranks with the time the
// reduction hides behind a concurrent stand-in for the backward
// (bench_reduce_nccl). Run under mpirun; every rank runs every benchmark,
// rank 0 alone reports.
//
//   mpirun -np 2 bench_reduce [--benchmark_filter=reduce] [--benchmark_repetitions=N]
//   mpirun -np G bench_reduce_nccl                     (one rank per GPU; G = 1 on one GPU)
//   mpirun -np G bench_reduce_nccl --benchmark_filter=BM_nccl_allreduce   (NCCL's own ceiling)
//
// Timing. Before each timed iteration the gradients are put back to their
// first values (summed again and again they would grow to inf and NaN,
// not what a training step reduces) and every rank waits in a barrier, so
// the ranks start together. Each rank times
// its own reduce(); the iteration's time is the maximum over the ranks
// (MPI_Allreduce MAX), which is what the step waits for. The iteration
// count is fixed per size (every rank must run the same collectives, so
// Google Benchmark may not choose it per rank). Reported: the median of 5
// repetitions unless --benchmark_repetitions says otherwise.
//
// Counters (rank 0's; they already hold the maximum over the ranks):
//   GBps              gradient bytes (2 per parameter) over the step time,
//                     nccl-tests' "algbw".
//   wire_B_per_param  the ALGORITHMIC volume, not measured traffic: bytes
//                     each rank sends (and as many it receives) per
//                     parameter. MpiCommunicator's all-reduce sends each
//                     element's owner the other ranks' values
//                     (MPI_Alltoallv) and every owner's sums to every rank
//                     (MPI_Allgatherv): each rank sends (W - 1) / W of the
//                     2-byte values in each, so 2 x 2 x (W - 1) / W: 2 at
//                     W = 2, towards 4 for many ranks, the same on every rank
//                     (a ring all-reduce, NCCL's, moves as much). Open MPI on
//                     one node goes through shared memory and may cut and
//                     pipeline messages: what actually crosses the memory
//                     bus is not this number.
//   memcpy_fraction   the time of one memcpy of the same gradient bytes in
//                     one process (rank 0, the others waiting), over the
//                     step time: 1 would be a reduction as fast as copying
//                     the gradients once.
//   hidden_ms (NCCL)  T(backward alone) + T(reduce alone) - T(both queued
//                     together): the reduction time the backward hides.
// On CPU ranks nothing is hidden, by construction: a host bucket is
// reduced while the caller waits (reducer.hpp), so no hidden time is
// reported there.
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "mixprec/dist/mpi.hpp"
#include "mixprec/dist/reducer.hpp"
#include "mixprec/mixprec.hpp"
#include "model_list.hpp"

#if MIXPREC_BENCH_REDUCE_NCCL
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "mixprec/core/cublas_check.hpp"
#include "mixprec/core/cuda_check.hpp"
#include "mixprec/dist/nccl_mpi.hpp"
#endif

namespace {

using mixprec::half;
namespace dist = mixprec::dist;
using Clock = std::chrono::steady_clock;

// Set by main for the benchmarks, which run between MPI_Init and MPI_Finalize.
dist::MpiCommunicator* g_mpi = nullptr;

constexpr double kHalfBytes = 2;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double max_over_ranks(double x) {
  const int rc = MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_MAX, g_mpi->comm());
  MIXPREC_CHECK(rc == MPI_SUCCESS, "bench_reduce: MPI_Allreduce (max over ranks) failed with code ", rc);
  return x;
}

double wire_bytes_per_param(int ranks) { return 2.0 * kHalfBytes * (ranks - 1) / ranks; }

std::int64_t iterations_for(std::int64_t n) { return std::clamp<std::int64_t>((std::int64_t{1} << 24) / n, 10, 200); }

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// Seconds of one memcpy of `bytes` on rank 0 while the other ranks wait in
// a barrier (median of 21 after one to fault the pages in). 0 elsewhere.
double memcpy_seconds_on_rank0(std::size_t bytes) {
  double s = 0;
  g_mpi->barrier();
  if (g_mpi->rank() == 0) {
    std::vector<char> src(bytes, 1), dst(bytes, 0);
    std::memcpy(dst.data(), src.data(), bytes);
    std::vector<double> t;
    for (int k = 0; k < 21; ++k) {
      const auto t0 = Clock::now();
      std::memcpy(dst.data(), src.data(), bytes);
      benchmark::ClobberMemory();
      t.push_back(seconds_since(t0));
    }
    s = median(t);
  }
  g_mpi->barrier();
  return s;
}

// The tensor list of n parameters, fp16 weights and gradients on the host,
// different gradients on each rank; restore() puts the first ones back.
struct HostModel {
  std::vector<std::unique_ptr<mixprec::Tensor<half>>> weights, grads, first;
  std::vector<mixprec::optim::Param> params;
  HostModel(std::int64_t n, int rank) {
    int k = 0;
    for (const std::int64_t size : mixprec::bench::model_tensor_sizes(n)) {
      weights.push_back(std::make_unique<mixprec::Tensor<half>>(mixprec::Shape{size}));
      grads.push_back(std::make_unique<mixprec::Tensor<half>>(mixprec::Shape{size}));
      first.push_back(std::make_unique<mixprec::Tensor<half>>(mixprec::Shape{size}));
      mixprec::fill_normal(*weights.back(), 0, 1, 2 * k);
      mixprec::fill_normal(*first.back(), 0, 1, 1000 * (rank + 1) + k);
      params.push_back({"p" + std::to_string(k), *weights.back(), *grads.back()});
      ++k;
    }
    restore();
  }
  void restore() {
    for (std::size_t i = 0; i < grads.size(); ++i) std::memcpy(grads[i]->data(), first[i]->data(), grads[i]->bytes());
  }
};

void set_common_counters(benchmark::State& state, std::int64_t n, double seconds_per_step, double memcpy_s) {
  const double bytes = kHalfBytes * static_cast<double>(n);
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) * bytes));
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["params"] = static_cast<double>(n);
  state.counters["ranks"] = g_mpi->size();
  state.counters["wire_B_per_param"] = wire_bytes_per_param(g_mpi->size());
  state.counters["memcpy_fraction"] = seconds_per_step > 0 ? memcpy_s / seconds_per_step : 0;
}

// reduce() over MPI: what a CPU trainer's step waits for.
void BM_reduce_mpi(benchmark::State& state) {
  dist::MpiCommunicator& comm = *g_mpi;
  const std::int64_t n = state.range(0);
  HostModel model(n, comm.rank());
  mixprec::optim::SGD opt(model.params, mixprec::optim::SGDOptions{});
  dist::GradientReducer reducer(comm, opt);
  const double memcpy_s = memcpy_seconds_on_rank0(static_cast<std::size_t>(kHalfBytes * n));
  reducer.reduce();  // warm-up: the staging buffers' pages, MPI's connections
  double total = 0;
  for (auto _ : state) {
    model.restore();
    comm.barrier();
    const auto t0 = Clock::now();
    reducer.reduce();
    const double s = max_over_ranks(seconds_since(t0));
    state.SetIterationTime(s);
    total += s;
  }
  set_common_counters(state, n, total / static_cast<double>(state.iterations()), memcpy_s);
  state.counters["buckets"] = static_cast<double>(reducer.num_buckets());
}

// The pairwise 16-bit sum of a user-defined MPI operation: each sum in
// float, rounded to half (what NCCL's half sum does).
void half_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const half* a = static_cast<const half*>(in);
  half* b = static_cast<half*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = mixprec::from_float<half>(mixprec::to_float(a[i]) + mixprec::to_float(b[i]));
}

// For scale, not what mixprec does: one MPI_Allreduce of the same bytes
// with a 16-bit sum in the library's own order and algorithm, which
// mixprec gives up for sums whose bits do not depend on the library
// (docs/distributed.md, how the sums are made). One buffer, no bucket
// copies.
void BM_allreduce_reference(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  std::vector<half> first(static_cast<std::size_t>(n)), data(first.size());
  {
    mixprec::Tensor<half> t(mixprec::Shape{n});
    mixprec::fill_normal(t, 0, 1, 77 + g_mpi->rank());
    std::memcpy(first.data(), t.data(), t.bytes());
  }
  MPI_Op op = MPI_OP_NULL;
  MIXPREC_CHECK(MPI_Op_create(&half_sum, 1, &op) == MPI_SUCCESS, "bench_reduce: MPI_Op_create");
  const auto all_reduce = [&] {
    const int rc = MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(n), MPI_UINT16_T, op, g_mpi->comm());
    MIXPREC_CHECK(rc == MPI_SUCCESS, "bench_reduce: MPI_Allreduce failed with code ", rc);
  };
  const double memcpy_s = memcpy_seconds_on_rank0(static_cast<std::size_t>(kHalfBytes * n));
  data = first;
  all_reduce();
  double total = 0;
  for (auto _ : state) {
    data = first;
    g_mpi->barrier();
    const auto t0 = Clock::now();
    all_reduce();
    const double s = max_over_ranks(seconds_since(t0));
    state.SetIterationTime(s);
    total += s;
  }
  MPI_Op_free(&op);
  // wire_B_per_param: the same 2 x 2 x (W - 1) / W, the volume of a ring;
  // the library picks its own algorithm.
  set_common_counters(state, n, total / static_cast<double>(state.iterations()), memcpy_s);
}

#if MIXPREC_BENCH_REDUCE_NCCL

dist::NcclCommunicator* g_nccl = nullptr;

// The stand-in for the backward: cuBLAS fp16 GEMMs of 2048 x 2048 x 2048
// (fp32 accumulation), as many as the backward of linear layers holding n
// weights would need for 2048 rows of batch: 4 x n x 2048 flops (dX and
// dW, 2 flops a multiply-add), at least one.
constexpr int kGemm = 2048;
int gemms_for(std::int64_t n) {
  const double flops = 4.0 * static_cast<double>(n) * kGemm;
  const double per_gemm = 2.0 * kGemm * kGemm * kGemm;
  return std::max(1, static_cast<int>(flops / per_gemm + 0.5));
}

struct Backward {
  mixprec::Tensor<half> a, b, c;
  cublasHandle_t handle = nullptr;
  explicit Backward(mixprec::Device dev)
      : a(random_half(dev, 5)), b(random_half(dev, 6)), c(mixprec::Shape{kGemm * kGemm}, dev) {
    MIXPREC_CUBLAS_CHECK(cublasCreate(&handle));
  }
  ~Backward() { cublasDestroy(handle); }
  Backward(const Backward&) = delete;
  Backward& operator=(const Backward&) = delete;
  static mixprec::Tensor<half> random_half(mixprec::Device dev, std::uint64_t seed) {
    // Random, not zeros: a GEMM on zeros draws less power and runs faster.
    mixprec::Tensor<half> h(mixprec::Shape{kGemm * kGemm});
    mixprec::fill_normal(h, 0, 1, seed);
    return h.to(dev);
  }
  void queue(int count, cudaStream_t stream) {
    MIXPREC_CUBLAS_CHECK(cublasSetStream(handle, stream));
    const float one = 1, zero = 0;
    for (int k = 0; k < count; ++k) {
      MIXPREC_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, kGemm, kGemm, kGemm, &one, a.data(),
                                        CUDA_R_16F, kGemm, b.data(), CUDA_R_16F, kGemm, &zero, c.data(), CUDA_R_16F,
                                        kGemm, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }
};

// The tensor list on this rank's GPU; restore() queues the copy of the
// first gradients back on `stream`.
struct DeviceModel {
  std::vector<mixprec::Tensor<half>> weights, grads, first;
  std::vector<mixprec::optim::Param> params;
  DeviceModel(std::int64_t n, int rank, mixprec::Device dev) {
    int k = 0;
    for (const std::int64_t size : mixprec::bench::model_tensor_sizes(n)) {
      mixprec::Tensor<half> w(mixprec::Shape{size}), g(mixprec::Shape{size});
      mixprec::fill_normal(w, 0, 1, 2 * k);
      mixprec::fill_normal(g, 0, 1, 1000 * (rank + 1) + k);
      weights.push_back(w.to(dev));
      first.push_back(g.to(dev));
      grads.push_back(g.to(dev));
      ++k;
    }
    for (std::size_t i = 0; i < grads.size(); ++i) params.push_back({"p" + std::to_string(i), weights[i], grads[i]});
  }
  void restore(cudaStream_t stream) {
    for (std::size_t i = 0; i < grads.size(); ++i) {
      MIXPREC_CUDA_CHECK(cudaMemcpyAsync(grads[i].data(), first[i].data(), grads[i].bytes(), cudaMemcpyDeviceToDevice,
                                         stream));
    }
  }
};

// reduce() over NCCL on the reducer's side stream, alone and behind the
// stand-in backward. Every phase: gradients restored, the stream drained,
// a barrier on the host, then CUDA events on the caller's stream around
// what is queued (the join in reduce() makes the caller's stream wait for
// the side stream, so the stop event covers the reduction).
void BM_reduce_nccl(benchmark::State& state) {
  dist::NcclCommunicator& comm = *g_nccl;
  const mixprec::Device dev = comm.device();
  mixprec::detail::DeviceGuard guard(dev);
  const std::int64_t n = state.range(0);
  const int gemms = gemms_for(n);
  DeviceModel model(n, comm.rank(), dev);
  mixprec::optim::SGD opt(model.params, mixprec::optim::SGDOptions{});
  dist::GradientReducer reducer(comm, opt);
  Backward backward(dev);
  mixprec::Stream stream(dev);
  const auto s = static_cast<cudaStream_t>(stream.get());
  mixprec::Event start(dev), stop(dev);
  // Milliseconds between the events, the maximum over the ranks.
  const auto timed = [&](auto&& queue) {
    model.restore(s);
    stream.synchronize();
    g_mpi->barrier();
    start.record(s);
    queue();
    stop.record(s);
    stop.synchronize();
    return max_over_ranks(stop.elapsed_ms(start));
  };
  const auto mark_all = [&] {
    for (std::size_t i = opt.num_params(); i-- > 0;) reducer.mark_ready(i, s);
  };
  const auto reduce_alone = [&] { reducer.reduce(s); };
  const auto backward_alone = [&] { backward.queue(gemms, s); };
  // Every gradient is ready at the start (the fork), the backward is
  // queued after it, reduce() joins: the most the backward can hide.
  const auto both = [&] {
    mark_all();
    backward.queue(gemms, s);
    reducer.reduce(s);
  };
  for (int k = 0; k < 3; ++k) {  // warm-up: NCCL's channels, cuBLAS's heuristics, clocks
    timed(reduce_alone);
    timed(backward_alone);
    timed(both);
  }
  double r_sum = 0, b_sum = 0, both_sum = 0;
  for (auto _ : state) {
    const double r = timed(reduce_alone);
    const double b = timed(backward_alone);
    const double rb = timed(both);
    state.SetIterationTime(r / 1e3);
    r_sum += r;
    b_sum += b;
    both_sum += rb;
  }
  const double it = static_cast<double>(state.iterations());
  const double bytes = kHalfBytes * static_cast<double>(n);
  state.SetBytesProcessed(static_cast<std::int64_t>(it * bytes));
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["params"] = static_cast<double>(n);
  state.counters["ranks"] = comm.size();
  state.counters["buckets"] = static_cast<double>(reducer.num_buckets());
  // NCCL's ring all-reduce: 2 (W - 1) / W sends of each 2-byte value per rank.
  state.counters["wire_B_per_param"] = wire_bytes_per_param(comm.size());
  state.counters["backward_gemms"] = gemms;
  state.counters["reduce_ms"] = r_sum / it;
  state.counters["backward_ms"] = b_sum / it;
  state.counters["both_ms"] = both_sum / it;
  state.counters["hidden_ms"] = (b_sum + r_sum - both_sum) / it;
  state.counters["hidden_fraction"] = r_sum > 0 ? (b_sum + r_sum - both_sum) / r_sum : 0;
}

// NCCL's own all-reduce: one buffer of n fp16 values summed in place,
// the ceiling that reduce()'s buckets are measured against (issue 21 asks
// for it at 2, 4 and 8 GPUs; nccl-tests' all_reduce_perf reports the same
// two figures). kCalls all-reduces queued back to back between two events;
// a call's time is that over kCalls, the maximum over the ranks. The
// buffer holds zeros, which stay zeros however often they are summed.
//   algbw_GBps  bytes / time
//   busbw_GBps  algbw x 2 (W - 1) / W: what each rank's links carry in a
//               ring, comparable across world sizes (0 with one rank)
void BM_nccl_allreduce(benchmark::State& state) {
  constexpr int kCalls = 10;
  dist::NcclCommunicator& comm = *g_nccl;
  const mixprec::Device dev = comm.device();
  mixprec::detail::DeviceGuard guard(dev);
  const std::int64_t n = state.range(0);
  mixprec::Tensor<half> buf(mixprec::Shape{n}, dev);
  mixprec::Stream stream(dev);
  const auto s = static_cast<cudaStream_t>(stream.get());
  mixprec::fill(buf, 0.0f, s);
  mixprec::Event start(dev), stop(dev);
  const auto timed = [&] {
    stream.synchronize();
    g_mpi->barrier();
    start.record(s);
    for (int c = 0; c < kCalls; ++c) comm.all_reduce_sum(buf, s);
    stop.record(s);
    stop.synchronize();
    return max_over_ranks(stop.elapsed_ms(start)) / kCalls;
  };
  for (int k = 0; k < 3; ++k) timed();  // warm-up: NCCL's channels and clocks
  double ms_sum = 0;
  for (auto _ : state) {
    const double ms = timed();
    state.SetIterationTime(ms / 1e3);
    ms_sum += ms;
  }
  const double ms = ms_sum / static_cast<double>(state.iterations());
  const double bytes = kHalfBytes * static_cast<double>(n);
  const double algbw = ms > 0 ? bytes / (ms * 1e-3) / 1e9 : 0;
  const int w = comm.size();
  state.counters["params"] = static_cast<double>(n);
  state.counters["ranks"] = w;
  state.counters["algbw_GBps"] = algbw;
  state.counters["busbw_GBps"] = algbw * 2.0 * (w - 1) / w;
}

#endif  // MIXPREC_BENCH_REDUCE_NCCL

void register_benchmarks() {
#if MIXPREC_BENCH_REDUCE_NCCL
  for (const std::int64_t n : {std::int64_t{1} << 20, std::int64_t{1} << 22, std::int64_t{1} << 24,
                               std::int64_t{1} << 26}) {
    benchmark::RegisterBenchmark("BM_reduce_nccl", BM_reduce_nccl)
        ->Arg(n)
        ->Iterations(20)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (int e = 20; e <= 28; e += 2) {  // 2 MiB to 512 MiB of fp16
    benchmark::RegisterBenchmark("BM_nccl_allreduce", BM_nccl_allreduce)
        ->Arg(std::int64_t{1} << e)
        ->Iterations(10)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
#else
  for (const std::int64_t n : {std::int64_t{1} << 16, std::int64_t{1} << 20, std::int64_t{1} << 22}) {
    benchmark::RegisterBenchmark("BM_reduce_mpi", BM_reduce_mpi)
        ->Arg(n)
        ->Iterations(iterations_for(n))
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (const std::int64_t n : {std::int64_t{1} << 16, std::int64_t{1} << 20, std::int64_t{1} << 22}) {
    benchmark::RegisterBenchmark("BM_allreduce_reference", BM_allreduce_reference)
        ->Arg(n)
        ->Iterations(iterations_for(n))
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
#endif
}

// Ranks other than 0 report nothing.
class NullReporter final : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  dist::MpiCommunicator mpi;
  g_mpi = &mpi;
  int status = 0;
  dist::run_or_abort(mpi, [&] {
#if MIXPREC_BENCH_REDUCE_NCCL
    const auto nccl = dist::nccl_over_mpi(mpi);
    g_nccl = nccl.get();
#endif
    register_benchmarks();
    // Defaults first, so that the same flags given on the command line win.
    // Ranks other than 0 drop --benchmark_out*: only rank 0 writes a file.
    std::string reps = "--benchmark_repetitions=5", aggregates = "--benchmark_report_aggregates_only=true";
    std::vector<char*> args = {argv[0], reps.data(), aggregates.data()};
    for (int i = 1; i < argc; ++i) {
      if (mpi.rank() != 0 && std::strncmp(argv[i], "--benchmark_out", 15) == 0) continue;
      args.push_back(argv[i]);
    }
    int count = static_cast<int>(args.size());
    args.push_back(nullptr);
    benchmark::Initialize(&count, args.data());
    if (benchmark::ReportUnrecognizedArguments(count, args.data())) {
      status = 1;  // every rank got the same arguments, so every rank stops here
      return;
    }
    benchmark::AddCustomContext("ranks", std::to_string(mpi.size()));
    benchmark::AddCustomContext("ranks_on_this_node", std::to_string(mpi.local_size()));
#if MIXPREC_BENCH_REDUCE_NCCL
    benchmark::AddCustomContext("backend", "nccl (ids over mpi)");
#else
    benchmark::AddCustomContext("backend", "mpi");
#endif
    if (mpi.rank() == 0) {
      benchmark::RunSpecifiedBenchmarks();
    } else {
      NullReporter quiet;
      benchmark::RunSpecifiedBenchmarks(&quiet);
    }
    benchmark::Shutdown();
  });
  return status;
}
