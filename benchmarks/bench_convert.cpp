// SPDX-License-Identifier: Apache-2.0
// Host whole-array conversions (convert_n: AVX2/F16C where the CPU has it)
// against the scalar functions in a loop and against memcpy of the same
// bytes. Reports bytes/s counting bytes read + bytes written.
//   bench_convert --benchmark_filter=...
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace {

constexpr std::int64_t kElements = std::int64_t{1} << 24;  // 64 MiB of float: beyond any cache

// Scalar = false: convert_n (SIMD where the CPU has it); true: the scalar
// functions in a plain loop.
template <class From, class To, bool Scalar>
void BM_convert(benchmark::State& state) {
  mixprec::Tensor<From> src({kElements});
  mixprec::fill_normal(src, 0.0f, 10.0f, 1);
  mixprec::Tensor<To> dst({kElements});
  for (auto _ : state) {
    if constexpr (Scalar) {
      const From* s = src.data();
      To* d = dst.data();
      for (std::int64_t i = 0; i < kElements; ++i) d[i] = mixprec::convert<To>(s[i]);
    } else {
      mixprec::convert_n(src.data(), kElements, dst.data());
    }
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kElements * (sizeof(From) + sizeof(To)));
}
template <class From, class To>
void BM_convert_n(benchmark::State& state) { BM_convert<From, To, false>(state); }
template <class From, class To>
void BM_scalar_loop(benchmark::State& state) { BM_convert<From, To, true>(state); }

// memcpy of the bytes a float -> half conversion moves (4 read + 2 written
// per element): 3 bytes per element copied is read once and written once.
void BM_memcpy(benchmark::State& state) {
  std::vector<char> src(static_cast<std::size_t>(kElements) * 3, 1), dst(src.size());
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(src.size()) * 2);
}

using mixprec::bfloat16;
using mixprec::half;
BENCHMARK(BM_memcpy)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_convert_n<float, half>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_scalar_loop<float, half>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_convert_n<half, float>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_scalar_loop<half, float>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_convert_n<float, bfloat16>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_scalar_loop<float, bfloat16>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_convert_n<bfloat16, float>)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_scalar_loop<bfloat16, float>)->Unit(benchmark::kMillisecond);

}  // namespace
