// SPDX-License-Identifier: Apache-2.0
// exact_float: a float whose arithmetic nvcc may not contract. The update
// formulas (optim/formulas.hpp) are written for any lane type; the device
// kernels instantiate them with exact_float, so each +, -, *, / and sqrt is
// one IEEE operation rounded to nearest, as on the CPU path, and the GPU
// gives the CPU's bits (plain float would let nvcc fuse a * b + c into FMAs:
// up to tens of ulp apart after one step, more where values cancel).
#pragma once

#include "mixprec/core/simd.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace cuda {

struct exact_float {
  float v;
  __device__ exact_float() = default;
  __device__ exact_float(float x) : v(x) {}  // NOLINT(google-explicit-constructor)
  __device__ explicit operator float() const { return v; }
};

__device__ inline exact_float operator+(exact_float a, exact_float b) { return __fadd_rn(a.v, b.v); }
__device__ inline exact_float operator-(exact_float a, exact_float b) { return __fsub_rn(a.v, b.v); }
__device__ inline exact_float operator*(exact_float a, exact_float b) { return __fmul_rn(a.v, b.v); }
__device__ inline exact_float operator/(exact_float a, exact_float b) { return __fdiv_rn(a.v, b.v); }
__device__ inline exact_float operator-(exact_float a) { return -a.v; }
__device__ inline exact_float operator+(exact_float a, float b) { return a + exact_float(b); }
__device__ inline exact_float operator-(exact_float a, float b) { return a - exact_float(b); }
__device__ inline exact_float operator*(exact_float a, float b) { return a * exact_float(b); }
__device__ inline exact_float operator/(exact_float a, float b) { return a / exact_float(b); }
__device__ inline exact_float operator+(float a, exact_float b) { return exact_float(a) + b; }
__device__ inline exact_float operator-(float a, exact_float b) { return exact_float(a) - b; }
__device__ inline exact_float operator*(float a, exact_float b) { return exact_float(a) * b; }
__device__ inline exact_float operator/(float a, exact_float b) { return exact_float(a) / b; }

}  // namespace cuda
MIXPREC_NAMESPACE_END

MIXPREC_NAMESPACE_BEGIN namespace math {
__device__ inline cuda::exact_float sqrt(cuda::exact_float x) { return __fsqrt_rn(x.v); }
__device__ inline cuda::exact_float max(cuda::exact_float a, cuda::exact_float b) { return a.v > b.v ? a : b; }
__device__ inline cuda::exact_float sign(cuda::exact_float x) { return sign(x.v); }
}  // namespace math
MIXPREC_NAMESPACE_END
