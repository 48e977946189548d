// SPDX-License-Identifier: Apache-2.0
// Lean optimizer state: how a parameter group stores its moments and its
// master weight, and the codecs that the step reads and writes them with.
//
//   moments  fp32 (4 B per value), bf16 (2 B, rounded to nearest even),
//            bf16_sr (2 B, written with stochastic rounding from a
//            counter-based RNG), or int8 (1 B + a float scale per block of
//            256: a logarithmic 8-bit code scaled by the block's largest
//            magnitude);
//   master   fp32 (a 4 B copy beside the 16-bit weight), remainder (the
//            bf16 weight is the master's rounded upper half; 16 bits of
//            remainder and one tie bit give the fp32 master back exactly),
//            or none (the 16-bit weight is the only copy; each update is
//            written with stochastic rounding from a counter-based RNG).
//
// The step decodes a chunk of state to fp32, runs the optimizer's element
// formula (the same operations as with fp32 state) and encodes it again:
// the arithmetic is unchanged, only what is kept between steps is rounded.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "mixprec/core/config.hpp"
#include "mixprec/core/convert.hpp"
#include "mixprec/core/error.hpp"

MIXPREC_NAMESPACE_BEGIN namespace optim {

/// How the optimizer's moments (every state tensor) are stored.
enum class Moments : std::uint8_t {
  fp32,  ///< 4 bytes a value (the default; what torch.optim keeps)
  bf16,  ///< 2 bytes a value, rounded to nearest even after every update
  int8,  ///< 1 byte a value + a float per 256 values (lean::kBlock)
  /// 2 bytes a value, written with stochastic rounding after every update
  /// (StateLayout::seed's stream): unbiased, so a second moment decays as
  /// an fp32 one does; rounded to nearest (bf16), a bf16 second moment with
  /// beta2 = 0.999 never decays (docs/optimizers.md, "Lean state").
  bf16_sr,
};

/// How the fp32 master weight is kept.
enum class Master : std::uint8_t {
  fp32,       ///< a 4-byte copy beside the model weight (the default)
  remainder,  ///< bf16 weights only: the weight + 16 bits + 1 tie bit = the exact fp32 master
  none,       ///< the model weight only; updates written with stochastic rounding
};

inline const char* to_string(Moments m) {
  switch (m) {
    case Moments::fp32: return "fp32";
    case Moments::bf16: return "bf16";
    case Moments::int8: return "8bit";
    case Moments::bf16_sr: return "bf16sr";
  }
  return "?";
}
inline const char* to_string(Master m) {
  switch (m) {
    case Master::fp32: return "fp32";
    case Master::remainder: return "remainder";
    case Master::none: return "none";
  }
  return "?";
}
/// "fp32", "bf16", "bf16sr" or "8bit" (the examples' --moments values).
inline Moments parse_moments(const std::string& s) {
  for (Moments m : {Moments::fp32, Moments::bf16, Moments::bf16_sr, Moments::int8}) {
    if (s == to_string(m)) return m;
  }
  detail::throw_error("moments = \"", s, "\", must be fp32, bf16, bf16sr or 8bit");
}
/// "fp32", "remainder" or "none" (the examples' --master values).
inline Master parse_master(const std::string& s) {
  for (Master m : {Master::fp32, Master::remainder, Master::none}) {
    if (s == to_string(m)) return m;
  }
  detail::throw_error("master = \"", s, "\", must be fp32, remainder or none");
}

/// A parameter group's state layout: a member of every optimizer's options
/// (`AdamWOptions o; o.layout.moments = optim::Moments::bf16;`), fixed when
/// the group is added.
struct StateLayout {
  Moments moments = Moments::fp32;
  Master master = Master::fp32;
  /// Master::none and Moments::bf16_sr: the stochastic rounding's stream.
  /// The random number of an element is a function of (seed, parameter
  /// index, step count, element index) alone: a run repeats its bits, and a
  /// resumed one goes on with the numbers an uninterrupted one would have
  /// drawn. The moments draw from a stream of their own (moment_key).
  std::uint64_t seed = 0;

  bool lean() const { return moments != Moments::fp32 || master != Master::fp32; }
  friend bool operator==(const StateLayout& a, const StateLayout& b) {
    return a.moments == b.moments && a.master == b.master && a.seed == b.seed;
  }
  friend bool operator!=(const StateLayout& a, const StateLayout& b) { return !(a == b); }
};

namespace lean {

/// Values per scale of the 8-bit code.
inline constexpr std::int64_t kBlock = 256;

// --- the 8-bit code -----------------------------------------------------------
//
// A block's values are divided by the block's largest magnitude (its scale)
// and rounded to the nearest entry of a fixed table of magnitudes in [0, 1]:
// 8 steps a binade, (16 - s) / 16 * 2^-e for s = 0..7, so every value keeps
// about the same relative precision (half a step: 1/32 to 1/16 of it) down
// to the table's smallest entry. Signed tensors (momentum) spend a bit on
// the sign: 127 magnitudes over 16 binades (the smallest 2^-15.68 of the
// block's maximum). Nonnegative tensors (second moments, which span the
// square of the gradients' range) use all 8 bits: 255 magnitudes over 32
// binades (the smallest 2^-31.68).
// A linear int8 code would round every second moment below 1/255 of its
// block's maximum to 0, and the update divides by its square root.

/// Nonzero magnitudes of the signed (127) and unsigned (255) codes.
inline constexpr int kSignedMagnitudes = 127;
inline constexpr int kUnsignedMagnitudes = 255;

// The entries are floats with 3 mantissa bits: (16 - s) / 16 * 2^-e is
// (1 + (8 - s) / 8) * 2^-(e + 1), or 2^-e for s = 0, so one step down the
// table is one step down a float's bits >> 20, and entry q is the float
// with bits (q + 1016 - count) << 20 (1016 << 20 is 1.0f). The nearest
// entry to y is y's bits rounded to a multiple of 2^20, since the entries
// of a binade are evenly spaced. Both are integer arithmetic, the same bits
// on host and device: ldexpf, frexpf and rintf are library routines on the
// GPU.

/// Entry q of the table with `count` nonzero magnitudes (0: zero; count: 1;
/// each entry below one step down: 8 steps a binade, (16 - s) / 16 * 2^-e).
/// Exact for q <= count <= 1009 (every entry a normal float; the tables
/// have 127 and 255); q <= 0 gives 0.
MIXPREC_HOST_DEVICE inline float code_value(int q, int count) {
  return q > 0 ? from_bits<float>(static_cast<std::uint32_t>(q + 1016 - count) << 20) : 0.0f;
}

/// The table index of y >= 0 (its bits u) rounded to the nearest step: the
/// nearest entry when >= 1, below the smallest entry when <= 0. y's bits
/// rounded to nearest even at 2^20: in y's binade, to the nearest multiple
/// of its step (1/8 of the binade's bottom). A carry out of the mantissa
/// gives the next binade's bottom, the entry 16/16 * 2^-e at the top of
/// y's. A subnormal y (biased exponent 0) lands below the smallest entry
/// for count <= 1008.
MIXPREC_HOST_DEVICE inline int step_index(std::uint32_t u, int count) {
  return static_cast<int>((u + 0x7ffffu + ((u >> 20) & 1u)) >> 20) - (1016 - count);
}

/// The entry nearest to y in [0, 1] (ties: the even multiple of the
/// binade's step, as rintf rounds), for the table with `count` magnitudes;
/// 0 for y = 0, a negative y and NaN.
MIXPREC_HOST_DEVICE inline int code_nearest(float y, int count) {
  if (!(y > 0.0f)) return 0;
  const int q = step_index(to_bits(y), count);
  if (q >= 1) return q;
  // Below the smallest entry: it or zero, whichever is nearer (ties: zero).
  return y > 0.5f * code_value(1, count) ? 1 : 0;  // exact: a power of 2
}

/// |x| where x is finite, else 0: what a block's scale is the largest of.
MIXPREC_HOST_DEVICE inline float finite_magnitude(float x) {
  const float a = ::fabsf(x);
  return a <= 3.40282347e38f ? a : 0.0f;  // NaN and inf compare false
}

/// The byte of magnitude code q for x: q itself in the nonnegative table,
/// else q with x's sign in bit 7 (a zero code has none).
MIXPREC_HOST_DEVICE inline std::uint8_t code_byte(int q, bool nonnegative, float x) {
  return static_cast<std::uint8_t>(nonnegative ? q : q | (q != 0 && x < 0.0f ? 0x80 : 0));
}

/// A block's scale: the largest finite magnitude of its values (an inf
/// must not turn the block's other values into 0 * inf = NaN).
MIXPREC_HOST_DEVICE inline float block_scale(const float* x, std::int64_t n) {
  float m = 0.0f;
  for (std::int64_t j = 0; j < n; ++j) m = ::fmaxf(m, finite_magnitude(x[j]));
  return m;
}

/// Encodes n values of one block (n <= kBlock) with their scale. Values
/// the code cannot hold: an inf saturates to the block's largest finite
/// magnitude (the top entry, its sign kept), a NaN becomes 0. A positive
/// nonnegative value (a second moment) never becomes 0: below the smallest
/// entry it takes that entry, since the update divides by its square root
/// and a moment rounded up only shrinks a step (rounded to 0 it would not
/// be bounded).
MIXPREC_HOST_DEVICE inline void encode_block(const float* x, std::int64_t n, bool nonnegative, float scale,
                                             std::uint8_t* out) {
  const int count = nonnegative ? kUnsignedMagnitudes : kSignedMagnitudes;
  for (std::int64_t j = 0; j < n; ++j) {
    const float a = ::fabsf(x[j]);
    int q = 0;
    if (!(a <= 3.40282347e38f)) {
      q = a > 0.0f && scale > 0.0f ? count : 0;  // inf: the top entry; NaN (compares false): 0
    } else if (scale > 0.0f) {
      q = code_nearest(a / scale, count);
      if (nonnegative && q == 0 && a > 0.0f) q = 1;
    }
    out[j] = code_byte(q, nonnegative, x[j]);
  }
}

// encode_finite gives encode_block's codes with no division and no branch
// a value where a block's values are all finite and its scale is within
// [2^-60, 2^100], for a device encoder whose warp shares one scale and one
// reciprocal over its 256 values (lean_step.cuh's vector path): the
// quotient from the scale's reciprocal and two residual corrections is the
// division's quotient, bit for bit (tested).

/// Whether encode_finite takes this scale: a finite positive scale within
/// [2^-60, 2^100]. Below, the residuals of quotients the code tells apart
/// can be subnormal and inexact (a scale of 2^-100 gave a quotient an ulp
/// off); above, the reciprocal would lose precision. The 2^-60 and
/// quotient's 2^-43 below go together: a residual is exact while
/// ulp(scale) * ulp(q) >= 2^-149, i.e. scale * q >= 2^-103.
MIXPREC_HOST_DEVICE inline bool fast_scale(float scale) { return scale >= 0x1p-60f && scale <= 0x1p100f; }

/// a / scale rounded to nearest, given r = 1 / scale rounded to nearest, for
/// 0 <= a <= scale and fast_scale(scale): q0 = a * r is within 1.5 units in
/// the last place, one correction with the residual a - scale * q0 (an FMA)
/// makes it faithful, and a second gives the rounded quotient (Markstein's
/// theorem: a faithful quotient, the rounded reciprocal and an exact
/// residual, see fast_scale). A quotient below 2^-43 may differ from the
/// division's, and lies far below every entry of the tables (the smallest
/// 2^-31.68, half of it 2^-32.68), as the division's does.
MIXPREC_HOST_DEVICE inline float quotient(float a, float scale, float r) {
#ifdef __CUDA_ARCH__
  float q = __fmul_rn(a, r);  // never contracted
#else
  float q = a * r;  // feeds no addition: nothing to contract it with
#endif
  q = ::fmaf(::fmaf(-scale, q, a), r, q);
  return ::fmaf(::fmaf(-scale, q, a), r, q);
}

/// encode_block's code of one finite x whose block scale is `scale`
/// (|x| <= scale, fast_scale(scale)) and r = 1.0f / scale: the same code,
/// computed without a division or a branch.
MIXPREC_HOST_DEVICE inline std::uint8_t encode_finite(float x, bool nonnegative, float scale, float r) {
  const int count = nonnegative ? kUnsignedMagnitudes : kSignedMagnitudes;
  const float a = ::fabsf(x);
  const float y = quotient(a, scale, r);
  const int q = step_index(to_bits(y), count);
  // Below the smallest entry (q < 1): code_nearest's comparison with half
  // of it; a positive second moment keeps the entry (encode_block).
  const bool smallest = nonnegative ? a > 0.0f : y > 0.5f * code_value(1, count);
  return code_byte(q >= 1 ? q : (smallest ? 1 : 0), nonnegative, x);
}

MIXPREC_HOST_DEVICE inline float decode_value(std::uint8_t c, bool nonnegative, float scale) {
  if (nonnegative) return code_value(c, kUnsignedMagnitudes) * scale;
  const float v = code_value(c & 0x7f, kSignedMagnitudes) * scale;
  return (c & 0x80) != 0 ? -v : v;
}

// --- the remainder master -------------------------------------------------------
//
// The model weight is the master rounded to nearest even in bf16 (as with an
// fp32 master), the remainder is the master's lower 16 bits, and the tie bit
// says, for a master exactly halfway between two bf16 values, whether it was
// rounded up. 16 bits alone cannot do it: for an even weight, 65,537 masters
// round to it. (Rounding ties away from zero instead, 16 bits suffice, but
// the weights then differ from an fp32-master run's in those ties.)

struct SplitMaster {
  std::uint16_t weight;     // bf16 bits
  std::uint16_t remainder;  // the master's lower 16 bits
  bool tie_up;              // the lower half was 0x8000 and the weight rounded up
};

MIXPREC_HOST_DEVICE inline SplitMaster split_master(float master) {
  const std::uint32_t bits = to_bits(master);
  SplitMaster s;
  s.weight = to_bits(from_float<bfloat16>(master));
  s.remainder = static_cast<std::uint16_t>(bits & 0xffffu);
  s.tie_up = s.remainder == 0x8000u && s.weight != static_cast<std::uint16_t>(bits >> 16);
  return s;
}

MIXPREC_HOST_DEVICE inline float join_master(std::uint16_t weight, std::uint16_t remainder, bool tie_up) {
  // Nothing rounds up to a zero weight: with one (written outside the
  // optimizer, as a pruning mask does) a stale remainder must not borrow
  // from the sign bit.
  const bool rounded_up =
      (weight & 0x7fffu) != 0 && (remainder > 0x8000u || (remainder == 0x8000u && tie_up));
  const std::uint32_t upper = static_cast<std::uint32_t>(weight) - (rounded_up ? 1u : 0u);
  return from_bits<float>((upper << 16) | remainder);
}

// --- stochastic rounding ----------------------------------------------------------

/// splitmix64's finaliser: a bijection of 64-bit words with full avalanche.
MIXPREC_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
inline constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ull;

/// The key of one parameter's step: every element's number derives from it.
MIXPREC_HOST_DEVICE inline std::uint64_t rounding_key(std::uint64_t seed, std::uint64_t param, std::uint64_t step) {
  return mix64(mix64(seed + kGolden * (param + 1)) + kGolden * (step + 1));
}
/// Element e's 32 random bits.
MIXPREC_HOST_DEVICE inline std::uint32_t rounding_bits(std::uint64_t key, std::uint64_t element) {
  return static_cast<std::uint32_t>(mix64(key + kGolden * (element + 1)) >> 32);
}

/// The moments' key (Moments::bf16_sr) in the step whose weight key
/// (Master::none) is `key`: another stream, so an element's moment and
/// weight roundings are independent draws. Every state tensor of the
/// parameter draws element e's number from this one stream: rounding with a
/// shared number is monotone, so a running maximum (AdamW's amsgrad
/// max_exp_avg_sq, equal in fp32 to exp_avg_sq whenever that rose) is never
/// stored below the moment it bounds, as with rounding to nearest.
MIXPREC_HOST_DEVICE inline std::uint64_t moment_key(std::uint64_t key) { return mix64(key ^ 0x5ca1ab1e0ddba11ull); }

/// Whether the moments are bf16 values (rounded either way).
MIXPREC_HOST_DEVICE inline bool bf16_moments(Moments m) { return m == Moments::bf16 || m == Moments::bf16_sr; }

/// x rounded to T stochastically: to the neighbour away from zero with
/// probability (|x| - |toward|) / (|away| - |toward|), decided by the top
/// 24 bits of r (exact: that probability is a multiple of 2^-24 or finer
/// only deep in the subnormals). Values T holds exactly, NaN and values that
/// round to nearest to inf are rounded to nearest.
template <class T>
MIXPREC_HOST_DEVICE inline T stochastic_round(float x, std::uint32_t r) {
  if constexpr (std::is_same_v<T, float>) {
    (void)r;
    return x;
  } else {
    const T n = from_float<T>(x);
    const float nf = to_float(n);
    if (nf == x || !(nf - nf == 0.0f)) return n;  // exact, inf or NaN (inf - inf and NaN give NaN)
    const std::uint16_t b = to_bits(n);
    // Adjacent values of one sign are adjacent bit patterns.
    const bool n_away = ::fabsf(nf) > ::fabsf(x);
    const T toward = n_away ? from_bits<T>(static_cast<std::uint16_t>(b - 1)) : n;
    const T away = n_away ? n : from_bits<T>(static_cast<std::uint16_t>(b + 1));
    const float lo = ::fabsf(to_float(toward));
    const float p = (::fabsf(x) - lo) / (::fabsf(to_float(away)) - lo);  // exact (Sterbenz; a power of 2)
    const float u = static_cast<float>(r >> 8) * 0x1p-24f;
    return u < p ? away : toward;
  }
}

/// stochastic_round<bfloat16>(x, r)'s bits, for every float x and r (tested
/// against it), computed on x's bits: bf16 is x's upper half, so the
/// neighbour toward zero is x truncated and the one away from zero the next
/// pattern up, and the probability of going up is x's lower half / 2^16,
/// compared with the top 24 bits of r in integers (u < p is r >> 8 <
/// low << 8). inf, NaN and values whose upper neighbour would be inf are
/// rounded to nearest, as stochastic_round does. No division and no
/// conversion: the moments' path (Moments::bf16_sr), about 10x cheaper on the
/// CPU than the generic function.
MIXPREC_HOST_DEVICE inline std::uint16_t stochastic_round_bf16_bits(float x, std::uint32_t r) {
  const std::uint32_t u = to_bits(x);
  const std::uint32_t toward = u >> 16, low = u & 0xffffu;
  if ((toward & 0x7f80u) == 0x7f80u || (toward & 0x7fffu) == 0x7f7fu) return to_bits(from_float<bfloat16>(x));
  return static_cast<std::uint16_t>(toward + ((r >> 8) < (low << 8) ? 1u : 0u));
}

}  // namespace lean
}  // namespace optim
MIXPREC_NAMESPACE_END
