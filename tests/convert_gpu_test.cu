// SPDX-License-Identifier: Apache-2.0
// Device conversions give the host's bits: every one of the 2^32 float
// patterns narrowed to half and to bfloat16, every 16-bit pattern widened,
// and launch_convert over device tensors.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "gpu_skip.hpp"
#include "mixprec/cuda/convert.cuh"
#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

// Narrows the float with bit pattern (base + i) on the device.
__global__ void narrow_all_kernel(std::uint32_t base, std::uint32_t count, std::uint16_t* h,
                                  std::uint16_t* b) {
  const std::uint32_t stride = gridDim.x * blockDim.x;
  for (std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
    const float x = __uint_as_float(base + i);
    h[i] = to_bits(from_float<half>(x));
    b[i] = to_bits(from_float<bfloat16>(x));
  }
}

__global__ void widen_all_kernel(std::uint32_t* from_half, std::uint32_t* from_bf16) {
  const std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < 65536) {
    from_half[i] = to_bits(to_float(from_bits<half>(static_cast<std::uint16_t>(i))));
    from_bf16[i] = to_bits(to_float(from_bits<bfloat16>(static_cast<std::uint16_t>(i))));
  }
}

TEST(ConvertGpu, EveryFloatPatternNarrowsToTheHostBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  constexpr std::uint32_t chunk = 1u << 28;
  std::uint16_t *dh = nullptr, *db = nullptr, *hh = nullptr, *hb = nullptr;
  MIXPREC_CUDA_CHECK(cudaMalloc(&dh, chunk * sizeof(std::uint16_t)));
  MIXPREC_CUDA_CHECK(cudaMalloc(&db, chunk * sizeof(std::uint16_t)));
  MIXPREC_CUDA_CHECK(cudaMallocHost(&hh, chunk * sizeof(std::uint16_t)));
  MIXPREC_CUDA_CHECK(cudaMallocHost(&hb, chunk * sizeof(std::uint16_t)));
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::atomic<std::uint64_t> half_mismatches{0}, bf16_mismatches{0};
  std::atomic<std::uint32_t> first_bad{0xffffffffu};
  for (std::uint64_t base = 0; base < (std::uint64_t{1} << 32); base += chunk) {
    narrow_all_kernel<<<4096, 256>>>(static_cast<std::uint32_t>(base), chunk, dh, db);
    MIXPREC_CUDA_CHECK_LAUNCH("narrow_all_kernel");
    MIXPREC_CUDA_CHECK(cudaMemcpy(hh, dh, chunk * sizeof(std::uint16_t), cudaMemcpyDeviceToHost));
    MIXPREC_CUDA_CHECK(cudaMemcpy(hb, db, chunk * sizeof(std::uint16_t), cudaMemcpyDeviceToHost));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        std::uint64_t bad_h = 0, bad_b = 0;
        for (std::uint32_t i = t; i < chunk; i += threads) {
          const auto u = static_cast<std::uint32_t>(base + i);
          const bool h_ok = detail::float_bits_to_half_bits(u) == hh[i];
          const bool b_ok = detail::float_bits_to_bfloat16_bits(u) == hb[i];
          bad_h += !h_ok;
          bad_b += !b_ok;
          if (!(h_ok && b_ok)) {
            std::uint32_t seen = first_bad.load();
            while (u < seen && !first_bad.compare_exchange_weak(seen, u)) {
            }
          }
        }
        half_mismatches += bad_h;
        bf16_mismatches += bad_b;
      });
    }
    for (auto& th : pool) th.join();
  }
  cudaFree(dh);
  cudaFree(db);
  cudaFreeHost(hh);
  cudaFreeHost(hb);
  std::printf("2^32 float patterns checked: half mismatches %llu, bfloat16 mismatches %llu\n",
              static_cast<unsigned long long>(half_mismatches.load()),
              static_cast<unsigned long long>(bf16_mismatches.load()));
  EXPECT_EQ(half_mismatches.load(), 0u) << std::hex << "first bad float bits 0x" << first_bad.load();
  EXPECT_EQ(bf16_mismatches.load(), 0u) << std::hex << "first bad float bits 0x" << first_bad.load();
}

TEST(ConvertGpu, EverySixteenBitPatternWidensToTheHostBits) {
  MIXPREC_SKIP_WITHOUT_GPU();
  std::uint32_t *dh = nullptr, *db = nullptr;
  MIXPREC_CUDA_CHECK(cudaMalloc(&dh, 65536 * sizeof(std::uint32_t)));
  MIXPREC_CUDA_CHECK(cudaMalloc(&db, 65536 * sizeof(std::uint32_t)));
  widen_all_kernel<<<256, 256>>>(dh, db);
  MIXPREC_CUDA_CHECK_LAUNCH("widen_all_kernel");
  std::vector<std::uint32_t> h(65536), b(65536);
  MIXPREC_CUDA_CHECK(cudaMemcpy(h.data(), dh, h.size() * 4, cudaMemcpyDeviceToHost));
  MIXPREC_CUDA_CHECK(cudaMemcpy(b.data(), db, b.size() * 4, cudaMemcpyDeviceToHost));
  cudaFree(dh);
  cudaFree(db);
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto bits = static_cast<std::uint16_t>(i);
    ASSERT_EQ(h[i], detail::half_bits_to_float_bits(bits)) << std::hex << i;
    ASSERT_EQ(b[i], detail::bfloat16_bits_to_float_bits(bits)) << std::hex << i;
  }
}

template <class From, class To>
void check_launch_convert(std::int64_t n) {
  Tensor<From> host({n});
  fill_normal(host, 0.0f, 300.0f, 11);  // reaches past the half range
  host.at(0) = from_float<From>(NAN);
  Tensor<From> src = host.to(Device::cuda(0));
  Tensor<To> dst({n}, Device::cuda(0));
  fill(dst, 12345.0f);  // poison
  cuda::launch_convert<From, To>(src.view(), dst.view());
  MIXPREC_CUDA_CHECK(cudaDeviceSynchronize());
  Tensor<To> want({n});
  convert(host, want);
  const Tensor<To> got = dst.to(Device::cpu());
  for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(to_bits(got.at(i)), to_bits(want.at(i))) << i;
}

TEST(ConvertGpu, LaunchConvertMatchesTheHost) {
  MIXPREC_SKIP_WITHOUT_GPU();
  for (std::int64_t n : {1, 257, (1 << 22) + 1}) {
    check_launch_convert<float, half>(n);
    check_launch_convert<float, bfloat16>(n);
    check_launch_convert<half, float>(n);
    check_launch_convert<bfloat16, half>(n);
  }
}

}  // namespace
}  // namespace mixprec
