// SPDX-License-Identifier: Apache-2.0
// IeeeFpMode: a scope in which host float arithmetic keeps subnormals
// (no flush-to-zero, no denormals-are-zero), whatever mode the caller set.
#pragma once

#include "mixprec/core/config.hpp"

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define MIXPREC_FP_MODE_X86 1
#else
#define MIXPREC_FP_MODE_X86 0
#endif

MIXPREC_NAMESPACE_BEGIN namespace detail {

/// The optimizer's host passes run inside one of these. A program built
/// with -ffast-math (which sets FTZ and DAZ at start-up on x86), or a
/// library that turned them on for speed, would otherwise flush subnormal
/// gradients, moments and masters to zero: the result would depend on the
/// caller, and would differ from the GPU's (which keeps subnormals) and
/// from PyTorch's CPU path. The constructor clears the flags and the
/// destructor restores the caller's, on this thread only.
///  * x86-64: MXCSR's DAZ (bit 6) and FTZ (bit 15).
///  * AArch64: FPCR's FZ (bit 24); FZ16 (bit 19) does not affect float.
///  * elsewhere: nothing (documented in docs/optimizers.md).
/// It costs two control-register accesses per pass.
class IeeeFpMode {
 public:
  IeeeFpMode() {
#if MIXPREC_FP_MODE_X86
    saved_ = _mm_getcsr();
    const unsigned ieee = saved_ & ~(kDaz | kFtz);
    if (ieee != saved_) _mm_setcsr(ieee);
#elif defined(__aarch64__) && defined(__GNUC__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const unsigned long ieee = saved_ & ~kFz;
    if (ieee != saved_) __asm__ __volatile__("msr fpcr, %0" : : "r"(ieee));
#endif
  }
  // Restores the caller's flush bits only: the exception flags raised in
  // the scope stay raised, as they would without it.
  ~IeeeFpMode() {
#if MIXPREC_FP_MODE_X86
    const unsigned now = _mm_getcsr();
    const unsigned back = (now & ~(kDaz | kFtz)) | (saved_ & (kDaz | kFtz));
    if (back != now) _mm_setcsr(back);
#elif defined(__aarch64__) && defined(__GNUC__)
    unsigned long now = 0;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(now));
    const unsigned long back = (now & ~kFz) | (saved_ & kFz);
    __asm__ __volatile__("msr fpcr, %0" : : "r"(back));
#endif
  }
  IeeeFpMode(const IeeeFpMode&) = delete;
  IeeeFpMode& operator=(const IeeeFpMode&) = delete;

 private:
#if MIXPREC_FP_MODE_X86
  static constexpr unsigned kDaz = 1u << 6, kFtz = 1u << 15;
  unsigned saved_ = 0;
#elif defined(__aarch64__) && defined(__GNUC__)
  static constexpr unsigned long kFz = 1ul << 24;
  unsigned long saved_ = 0;
#endif
};

}  // namespace detail
MIXPREC_NAMESPACE_END
