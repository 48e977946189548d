// SPDX-License-Identifier: Apache-2.0
// Lean optimizer state (optim/state_layout.hpp): the codecs against
// references written here (a brute-force nearest entry, exact split and
// join), and the optimizers in every layout against runs that keep fp32
// state and round it through the public save/load API after each step
// (the lean step must give those bits; bf16_sr's rounding written out here
// from its counter), stochastic rounding's expectation, bf16 second moments
// against a float64 one, skips, checkpoints and refusals. Built twice: with
// the SIMD CPU paths and without.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "state_bits.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

using optim::Master;
using optim::Moments;
using optim::StateLayout;
using test::expect_error;
using test::first_difference;
namespace lean = optim::lean;

std::uint32_t bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// The table of magnitudes, from its definition: 8 steps a binade,
// (16 - s) / 16 * 2^-e for the s-th step below the top of binade e.
std::vector<double> table(int count) {
  std::vector<double> t(static_cast<std::size_t>(count) + 1, 0.0);
  for (int d = 0; d < count; ++d) t[static_cast<std::size_t>(count - d)] = (16.0 - d % 8) / 16.0 * std::pow(2.0, -(d / 8));
  return t;
}

// The nearest entry by a linear search (ties: the smaller magnitude... are
// not drawn: y is random).
int nearest(double y, const std::vector<double>& t) {
  int best = 0;
  for (int q = 1; q < static_cast<int>(t.size()); ++q) {
    if (std::fabs(t[static_cast<std::size_t>(q)] - y) < std::fabs(t[static_cast<std::size_t>(best)] - y)) best = q;
  }
  return best;
}

TEST(LeanCodec, TablesAreTheirDefinition) {
  for (int count : {lean::kSignedMagnitudes, lean::kUnsignedMagnitudes}) {
    const std::vector<double> t = table(count);
    for (int q = 0; q <= count; ++q) {
      ASSERT_EQ(static_cast<double>(lean::code_value(q, count)), t[static_cast<std::size_t>(q)]) << count << " " << q;
      if (q > 0) {
        ASSERT_GT(t[static_cast<std::size_t>(q)], t[static_cast<std::size_t>(q - 1)]) << "ascending";
      }
    }
    EXPECT_EQ(t.back(), 1.0);
  }
  // 16 binades signed, 32 unsigned.
  EXPECT_NEAR(std::log2(lean::code_value(1, lean::kSignedMagnitudes)), -15.68, 0.01);
  EXPECT_NEAR(std::log2(lean::code_value(1, lean::kUnsignedMagnitudes)), -31.68, 0.01);
}

TEST(LeanCodec, EncodesToTheNearestEntry) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> log2y(-36.0, 0.0);
  for (int count : {lean::kSignedMagnitudes, lean::kUnsignedMagnitudes}) {
    const std::vector<double> t = table(count);
    for (int k = 0; k < 20000; ++k) {
      const float y = static_cast<float>(std::pow(2.0, log2y(rng)));
      ASSERT_EQ(lean::code_nearest(y, count), nearest(y, t)) << "count " << count << " y " << y;
    }
    EXPECT_EQ(lean::code_nearest(0.0f, count), 0);
    EXPECT_EQ(lean::code_nearest(1.0f, count), count);
  }
}

TEST(LeanCodec, ABlockDecodesWithinHalfAStepAndReencodesToItsCodes) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (bool nonnegative : {false, true}) {
    std::vector<float> x(lean::kBlock);
    for (float& v : x) v = nonnegative ? std::exp(6.0f * normal(rng)) : normal(rng) * std::exp(2.0f * normal(rng));
    const float scale = lean::block_scale(x.data(), lean::kBlock);
    std::vector<std::uint8_t> codes(lean::kBlock), again(lean::kBlock);
    lean::encode_block(x.data(), lean::kBlock, nonnegative, scale, codes.data());
    std::vector<float> back(lean::kBlock);
    const int count = nonnegative ? lean::kUnsignedMagnitudes : lean::kSignedMagnitudes;
    const float smallest = lean::code_value(1, count) * scale;
    for (std::size_t e = 0; e < x.size(); ++e) {
      back[e] = lean::decode_value(codes[e], nonnegative, scale);
      if (std::fabs(x[e]) >= smallest) {
        // Within half a step: 1/32 of the binade's top, so <= 1/16 of the value.
        ASSERT_LE(std::fabs(back[e] - x[e]), std::fabs(x[e]) / 15.9) << e << ": " << x[e] << " -> " << back[e];
        ASSERT_EQ(std::signbit(back[e]), std::signbit(x[e])) << e;
      } else {
        ASSERT_LE(std::fabs(back[e]), smallest) << e;  // it, or zero
      }
    }
    // Decoded values encode to the same codes and scale (checkpoints hold
    // decoded values and resume bit-exactly).
    const float scale2 = lean::block_scale(back.data(), lean::kBlock);
    ASSERT_EQ(bits_of(scale2), bits_of(scale));
    lean::encode_block(back.data(), lean::kBlock, nonnegative, scale2, again.data());
    ASSERT_EQ(codes, again);
  }
}

// A positive second moment below the unsigned table's smallest entry keeps
// that entry (rounded to 0, Adam would divide by eps alone), while a
// momentum of the same size may become 0. Found in review: AdamW with 8-bit
// moments moved such an element 7x further than with fp32 moments.
TEST(LeanCodec, APositiveSecondMomentIsNeverZero) {
  std::vector<float> v(lean::kBlock, 1.0f);
  v[3] = std::ldexp(1.0f, -33);  // under the smallest entry's half (2^-32.68)
  v[4] = 0.0f;
  std::vector<std::uint8_t> codes(lean::kBlock);
  lean::encode_block(v.data(), lean::kBlock, true, lean::block_scale(v.data(), lean::kBlock), codes.data());
  EXPECT_EQ(codes[3], 1);
  EXPECT_EQ(codes[4], 0);
  EXPECT_GT(lean::decode_value(codes[3], true, 1.0f), 0.0f);
  lean::encode_block(v.data(), lean::kBlock, false, 1.0f, codes.data());
  EXPECT_EQ(codes[3], 0) << "signed state may round to 0";
}

// An inf does not take its block's other values with it (0 * inf = NaN):
// the scale is the largest finite magnitude, the inf saturates to it, a
// NaN becomes 0.
TEST(LeanCodec, NonfiniteValuesDoNotSpoilTheirBlock) {
  std::vector<float> x(lean::kBlock);
  for (std::size_t e = 0; e < x.size(); ++e) x[e] = 0.01f * static_cast<float>(e + 1);
  x[7] = std::numeric_limits<float>::infinity();
  x[8] = -std::numeric_limits<float>::infinity();
  x[9] = std::nanf("");
  for (bool nonnegative : {false, true}) {
    const float scale = lean::block_scale(x.data(), lean::kBlock);
    EXPECT_EQ(scale, 0.01f * 256);
    std::vector<std::uint8_t> codes(lean::kBlock);
    lean::encode_block(x.data(), lean::kBlock, nonnegative, scale, codes.data());
    for (std::size_t e = 0; e < x.size(); ++e) {
      const float back = lean::decode_value(codes[e], nonnegative, scale);
      ASSERT_FALSE(std::isnan(back)) << e;
      if (e == 7) {
        EXPECT_EQ(back, scale);
      }
      if (e == 8 && !nonnegative) {
        EXPECT_EQ(back, -scale);
      }
      if (e == 9) {
        EXPECT_EQ(back, 0.0f);
      }
      if (e > 9) {
        ASSERT_NEAR(back, x[e], x[e] / 15.9) << e;
      }
    }
  }
}

// The 8-bit codec as it was written with ldexpf, frexpf and rintf (commit
// 39bd605), copied verbatim: the bit-built codec must give its bits for
// every input that has them (the device kernels' results must not move).
namespace reference {
using optim::lean::kSignedMagnitudes;
using optim::lean::kUnsignedMagnitudes;

/// Entry q of the table with `count` nonzero magnitudes (0: zero; count: 1;
/// each entry below one step down: 8 steps a binade, (16 - s) / 16 * 2^-e).
MIXPREC_HOST_DEVICE inline float code_value(int q, int count) {
  if (q <= 0) return 0.0f;
  const int d = count - q;  // steps below the top
  return ::ldexpf(static_cast<float>(16 - d % 8) / 16.0f, -(d / 8));
}

/// The entry nearest to y in [0, 1] (ties: the even multiple of the
/// binade's step, as rintf rounds), for the table with `count` magnitudes.
MIXPREC_HOST_DEVICE inline int code_nearest(float y, int count) {
  if (!(y > 0.0f)) return 0;
  int exponent = 0;
  (void)::frexpf(y, &exponent);  // y in [2^(exponent - 1), 2^exponent)
  const int e = -exponent;       // binade [2^-(e + 1), 2^-e): entries n / 16 * 2^-e, n = 8..16
  const float n = ::rintf(::ldexpf(y, e + 4));
  // n = 8 is the top of the binade below (s = 0 at e + 1).
  const int d = n == 8.0f ? (e + 1) * 8 : e * 8 + (16 - static_cast<int>(n));
  const int q = count - d;
  if (q >= 1) return q;
  // Below the smallest entry: it or zero, whichever is nearer (ties: zero).
  return y > 0.5f * code_value(1, count) ? 1 : 0;
}

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
    if (nonnegative) {
      out[j] = static_cast<std::uint8_t>(q);
    } else {
      out[j] = static_cast<std::uint8_t>(q | (q != 0 && x[j] < 0.0f ? 0x80 : 0));
    }
  }
}

MIXPREC_HOST_DEVICE inline float decode_value(std::uint8_t c, bool nonnegative, float scale) {
  if (nonnegative) return code_value(c, kUnsignedMagnitudes) * scale;
  const float v = code_value(c & 0x7f, kSignedMagnitudes) * scale;
  return (c & 0x80) != 0 ? -v : v;
}
}  // namespace reference

// The codec built from bits against the reference above, bit for bit:
// every entry; every code decoded with scales from the subnormal to the
// largest float, 0, inf and NaN; code_nearest over every 11th bit pattern
// of [0, 1] (97 million), every pattern within 64 of each binade boundary,
// entry and midpoint between adjacent entries (the ties, and the threshold
// between 0 and the smallest entry), and a coarse sweep above 1 (outside
// the contract, but the reference's results there are kept too); and
// blocks of random values with infs, NaNs, signed zeros and subnormals,
// encoded with their scale and others. About 3 s in a Release build.
TEST(LeanCodec, BitBuiltCodecGivesTheLibmCodecsBits) {
  const int counts[] = {lean::kSignedMagnitudes, lean::kUnsignedMagnitudes};
  for (int count : counts) {
    for (int q = -1; q <= count; ++q) {
      ASSERT_EQ(bits_of(lean::code_value(q, count)), bits_of(reference::code_value(q, count)))
          << "code_value(" << q << ", " << count << ")";
    }
  }

  std::mt19937 rng(41);
  std::vector<float> scales = {1.0f, 0.75f, 3e-38f, 1e38f, 0x1p-20f, std::numeric_limits<float>::max(),
                               std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(),
                               1e-40f, 0.0f, -0.0f, std::numeric_limits<float>::infinity(), std::nanf("")};
  std::uniform_real_distribution<float> log2_scale(-126.0f, 127.0f);
  for (int k = 0; k < 8; ++k) scales.push_back(std::exp2(log2_scale(rng)));
  for (float scale : scales) {
    for (bool nonnegative : {false, true}) {
      for (int c = 0; c < 256; ++c) {
        const auto code = static_cast<std::uint8_t>(c);
        ASSERT_EQ(bits_of(lean::decode_value(code, nonnegative, scale)),
                  bits_of(reference::decode_value(code, nonnegative, scale)))
            << "decode_value(" << c << ", " << nonnegative << ", " << scale << ")";
      }
    }
  }

  // code_nearest: the first mismatch of each count is reported (an ASSERT
  // a pattern would be slower than the functions).
  std::int64_t checked = 0;
  auto first_mismatch = [&](auto&& patterns) {
    for (int count : counts) {
      const bool found = patterns([&](std::uint32_t u) {
        const float y = from_bits<float>(u);
        ++checked;
        return lean::code_nearest(y, count) != reference::code_nearest(y, count);
      });
      if (found) return count;
    }
    return 0;
  };
  std::uint32_t bad = 0;
  auto sweep = [&](std::uint32_t lo, std::uint32_t hi, std::uint32_t stride) {
    return [&bad, lo, hi, stride](auto&& differs) {
      for (std::uint64_t u = lo; u <= hi; u += stride) {
        if (differs(static_cast<std::uint32_t>(u))) {
          bad = static_cast<std::uint32_t>(u);
          return true;
        }
      }
      return false;
    };
  };
  const std::uint32_t one = 0x3f800000u;
  int count = first_mismatch(sweep(0, one, 11));
  ASSERT_EQ(count, 0) << "code_nearest(bits " << std::hex << bad << ", " << std::dec << count << ")";

  // Centres of the ±64 neighbourhoods: binade boundaries, entries, midpoints.
  std::vector<std::uint32_t> centres;
  for (std::uint32_t b = 0; b <= 127; ++b) centres.push_back(b << 23);
  for (int c : counts) {
    for (int q = 1; q <= c; ++q) {
      const float lo = reference::code_value(q - 1, c), hi = reference::code_value(q, c);
      const double mid = (static_cast<double>(lo) + hi) / 2;
      ASSERT_EQ(static_cast<double>(static_cast<float>(mid)), mid) << "midpoints have 5 significant bits";
      centres.push_back(bits_of(hi));
      centres.push_back(bits_of(static_cast<float>(mid)));
    }
  }
  for (std::uint32_t centre : centres) {
    const std::uint32_t lo = centre < 64 ? 0 : centre - 64, hi = std::min(centre + 64, one);
    count = first_mismatch(sweep(lo, hi, 1));
    ASSERT_EQ(count, 0) << "code_nearest(bits " << std::hex << bad << ", " << std::dec << count << ")";
  }
  // Above 1 up to the largest float (inf: the reference converts inf to
  // int), and values that give 0: negative ones and NaNs.
  count = first_mismatch(sweep(one, 0x7f7fffffu, 4099));
  ASSERT_EQ(count, 0) << "code_nearest(bits " << std::hex << bad << ", " << std::dec << count << ")";
  count = first_mismatch(sweep(0x7f800001u, 0xffffffffu, 4099));
  ASSERT_EQ(count, 0) << "code_nearest(bits " << std::hex << bad << ", " << std::dec << count << ")";
  EXPECT_GT(checked, 2 * 96000000) << "the sweeps ran";

  // encode_block: random blocks of every kind of value.
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> kind(0, 15);
  std::uniform_int_distribution<std::uint32_t> mantissa(0, 0x7fffffu);
  std::uniform_int_distribution<int> entry(0, lean::kUnsignedMagnitudes);
  for (int block = 0; block < 400; ++block) {
    std::vector<float> x(lean::kBlock);
    const float spread = static_cast<float>(block % 8);  // log-normal magnitudes up to e^(8 sigma)
    for (float& v : x) {
      const float sign = rng() & 1u ? -1.0f : 1.0f;
      switch (kind(rng)) {
        case 0: v = sign * std::numeric_limits<float>::infinity(); break;
        case 1: v = from_bits<float>(0x7fc00000u | mantissa(rng) | (rng() & 0x80000000u)); break;  // NaN
        case 2: v = sign * 0.0f; break;
        case 3: v = sign * from_bits<float>(mantissa(rng) | 1u); break;  // subnormal
        case 4: v = sign * reference::code_value(entry(rng), lean::kUnsignedMagnitudes); break;  // an entry
        default: v = normal(rng) * std::exp(spread * normal(rng)); break;
      }
    }
    // A nonnegative tensor holds magnitudes (NaN and -0 kept).
    std::vector<float> ax(x);
    for (float& v : ax) v = std::signbit(v) && !std::isnan(v) && v != 0.0f ? -v : v;
    const std::int64_t n = block % 5 == 0 ? 1 + static_cast<std::int64_t>(rng() % lean::kBlock) : lean::kBlock;
    for (bool nonnegative : {false, true}) {
      const std::vector<float>& in = nonnegative ? ax : x;
      const float max = lean::block_scale(in.data(), n);
      for (float scale : {max, 2.0f * max, std::exp2(std::ceil(std::log2(max))), 0.0f,
                          std::numeric_limits<float>::infinity(), std::nanf("")}) {
        // Poisoned differently: an element left unwritten differs.
        std::vector<std::uint8_t> got(lean::kBlock, 0x5a), want(lean::kBlock, 0xa5);
        lean::encode_block(in.data(), n, nonnegative, scale, got.data());
        reference::encode_block(in.data(), n, nonnegative, scale, want.data());
        std::fill(got.begin() + n, got.end(), 0);
        std::fill(want.begin() + n, want.end(), 0);
        ASSERT_EQ(got, want) << "block " << block << " nonnegative " << nonnegative << " scale " << scale;
      }
    }
  }
}

// The device's encoder (encode_finite: the quotient from the scale's
// reciprocal and two FMA corrections, no branch) against the division's:
// the quotient's bits wherever it is at least 2^-43 (below, the code does
// not depend on them: fast_scale), and the code of every
// value (both signs, signed and nonnegative tables) against the reference
// encoder above. Scales over the whole accepted range [2^-60, 2^100] with
// random and extreme mantissas; values uniform and log-uniform below the
// scale, at the scale and the float below it, at the tables' entries and
// the midpoints between them (the ties) and a few units in the last place
// around those, zero and subnormals.
TEST(LeanCodec, FastEncoderGivesTheDivisionsQuotientAndCodes) {
  std::mt19937 rng(43);
  std::uniform_int_distribution<std::uint32_t> mantissa(0, 0x7fffffu);
  std::uniform_int_distribution<int> exponent(-60, 99);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::uniform_real_distribution<float> log2_ratio(-44.0f, 0.0f);
  std::vector<float> scales = {0x1p-60f, 0x1p100f, 1.0f, 0x1.fffffep-1f, 0x1.fffffep99f, 0x1.000002p-60f, 3.0f};
  for (int k = 0; k < 600; ++k) {
    const std::uint32_t m = k % 3 == 0 ? 0x7fffffu - (mantissa(rng) & 0xffu) : k % 3 == 1 ? mantissa(rng) & 0xffu
                                                                                             : mantissa(rng);
    scales.push_back(std::ldexp(from_bits<float>(0x3f800000u | m), exponent(rng)));
  }
  // Ratios at the tables' entries and midpoints.
  std::vector<float> ratios;
  for (int count : {lean::kSignedMagnitudes, lean::kUnsignedMagnitudes}) {
    for (int q = 1; q <= count; ++q) {
      const float lo = reference::code_value(q - 1, count), hi = reference::code_value(q, count);
      ratios.push_back(hi);
      ratios.push_back(static_cast<float>((static_cast<double>(lo) + hi) / 2));
    }
  }
  std::int64_t quotients = 0, codes = 0;
  for (float scale : scales) {
    ASSERT_TRUE(lean::fast_scale(scale)) << scale;
    const float r = 1.0f / scale;
    std::vector<float> values = {0.0f, scale, std::nextafter(scale, 0.0f), std::numeric_limits<float>::denorm_min(),
                                 std::numeric_limits<float>::min()};
    for (int k = 0; k < 2000; ++k) values.push_back(std::min(scale, scale * unit(rng)));
    for (int k = 0; k < 2000; ++k) values.push_back(std::min(scale, scale * std::exp2(log2_ratio(rng))));
    for (float y : ratios) {
      const float at = y * scale;  // rounded: within an ulp of the exact product
      std::uint32_t u = bits_of(at);
      for (std::uint32_t d = 0; d < 7; ++d) {
        const float v = from_bits<float>(u - 3 + d);
        if (v >= 0.0f && v <= scale) values.push_back(v);
      }
    }
    for (float a : values) {
      const float want = a / scale;
      const float got = lean::quotient(a, scale, r);
      if (want >= 0x1p-43f) {  // below, the code does not look at the quotient's last bits
        ASSERT_EQ(bits_of(got), bits_of(want)) << a << " / " << scale;
        ++quotients;
      }
      for (float x : {a, -a}) {
        for (bool nonnegative : {false, true}) {
          if (nonnegative && std::signbit(x)) continue;
          std::uint8_t ref = 0;
          reference::encode_block(&x, 1, nonnegative, scale, &ref);
          ASSERT_EQ(lean::encode_finite(x, nonnegative, scale, r), ref)
              << "x " << x << " scale " << scale << " nonnegative " << nonnegative;
          ++codes;
        }
      }
    }
  }
  EXPECT_GT(quotients, 5000000);
  EXPECT_GT(codes, 15000000);
  // Where the residuals come nearest to the subnormals: scales at the
  // bound, quotients in [2^-44, 2^-41], every 97th bit pattern of a.
  quotients = 0;
  for (float scale : {0x1p-60f, 0x1.fffffep-60f, 0x1.000002p-60f}) {
    const float r = 1.0f / scale;
    const std::uint32_t lo = bits_of(scale * 0x1p-44f), hi = bits_of(scale * 0x1p-41f);
    for (std::uint32_t u = lo; u <= hi; u += 97) {
      const float a = from_bits<float>(u), want = a / scale;
      if (want < 0x1p-43f) continue;
      ASSERT_EQ(bits_of(lean::quotient(a, scale, r)), bits_of(want)) << a << " / " << scale;
      ++quotients;
    }
  }
  EXPECT_GT(quotients, 400000);
}

// A zero weight written outside the optimizer (a pruning mask) with a
// stale remainder reads as a small master of the weight's sign, not NaN.
TEST(LeanCodec, AZeroWeightWithAStaleRemainderIsNotNaN) {
  for (std::uint16_t w : {std::uint16_t{0x0000}, std::uint16_t{0x8000}}) {
    for (std::uint16_t r : {std::uint16_t{0x9000}, std::uint16_t{0x8000}, std::uint16_t{0x0001}}) {
      const float m = lean::join_master(w, r, true);
      EXPECT_FALSE(std::isnan(m)) << w << " " << r;
      EXPECT_LT(std::fabs(m), 1e-37f);
      EXPECT_EQ(std::signbit(m), w == 0x8000);
    }
  }
}

TEST(LeanCodec, RemainderRebuildsEveryMasterAndTheWeightIsRoundToNearestEven) {
  std::mt19937 rng(9);
  std::vector<float> masters;
  for (int k = 0; k < 200000; ++k) {
    std::uint32_t u = rng();
    if ((u & 0x7f800000u) == 0x7f800000u) continue;  // finite masters only
    masters.push_back(from_bits<float>(u));
  }
  // The ties, rounded up and down; the largest finite float (its weight is inf).
  for (std::uint32_t upper : {0x3f80u, 0x3f81u, 0xbf80u, 0xbf81u, 0x0000u, 0x8001u}) {
    masters.push_back(from_bits<float>((upper << 16) | 0x8000u));
  }
  masters.push_back(std::numeric_limits<float>::max());
  masters.push_back(-std::numeric_limits<float>::max());
  int ties_up = 0;
  for (float m : masters) {
    const lean::SplitMaster s = lean::split_master(m);
    ASSERT_EQ(bits_of(lean::join_master(s.weight, s.remainder, s.tie_up)), bits_of(m)) << m;
    // Round to nearest even, from the definition.
    const std::uint32_t u = bits_of(m), low = u & 0xffffu, upper = u >> 16;
    const std::uint32_t rne = low > 0x8000u || (low == 0x8000u && (upper & 1u)) ? upper + 1 : upper;
    ASSERT_EQ(s.weight, static_cast<std::uint16_t>(rne)) << m;
    ties_up += s.tie_up ? 1 : 0;
  }
  EXPECT_GE(ties_up, 3) << "the odd-upper ties round up";
}

TEST(LeanCodec, StochasticRoundingIsUnbiasedAndRoundToNearestIsNot) {
  // A bf16 weight of 1.0 given 10,000 updates of 1e-4 (1/78 of its ulp):
  // the mean over 256 elements (each its own random stream) and 4 seeds
  // is about 2.0; rounding to nearest without a master never moves it.
  EXPECT_EQ(to_float(from_float<bfloat16>(1.0f + 1e-4f)), 1.0f);
  double total = 0;
  int runs = 0;
  for (std::uint64_t seed : {1u, 2u, 3u, 4u}) {
    for (std::uint64_t e = 0; e < 256; ++e) {
      bfloat16 w = from_float<bfloat16>(1.0f);
      for (std::uint64_t s = 1; s <= 10000; ++s) {
        const float next = to_float(w) + 1e-4f;
        w = lean::stochastic_round<bfloat16>(next, lean::rounding_bits(lean::rounding_key(seed, 0, s), e));
      }
      total += to_float(w);
      ++runs;
    }
  }
  EXPECT_NEAR(total / runs, 2.0, 0.02);  // within 1%
  // fp16: a value between two neighbours goes to each with its probability.
  const float x = to_float(from_float<half>(1.0f)) + 0.25f * 0x1p-10f;  // a quarter ulp above 1
  int up = 0;
  for (std::uint64_t e = 0; e < 100000; ++e) {
    up += to_float(lean::stochastic_round<half>(x, lean::rounding_bits(7, e))) > 1.0f ? 1 : 0;
  }
  EXPECT_NEAR(up / 100000.0, 0.25, 0.005);
  // Exact values, inf and NaN are left as rounding to nearest leaves them.
  EXPECT_EQ(to_float(lean::stochastic_round<half>(0.5f, 123)), 0.5f);
  EXPECT_TRUE(std::isinf(to_float(lean::stochastic_round<half>(1e6f, 0))));
  EXPECT_TRUE(std::isnan(to_float(lean::stochastic_round<bfloat16>(std::nanf(""), 0))));
}

// The moments' bf16 rounding on bits is stochastic_round<bfloat16>, bit for
// bit: 2^22 random floats (every exponent, NaN and inf among them) with
// random numbers, and the edges: numbers at each side of the threshold,
// r = 0 and 2^32 - 1, zeros, subnormals, exact values, the largest finite
// bf16 and the floats above it.
TEST(LeanCodec, Bf16StochasticRoundingOnBitsIsStochasticRound) {
  std::mt19937 rng(31);
  auto same = [](float x, std::uint32_t r) {
    const std::uint16_t want = to_bits(lean::stochastic_round<bfloat16>(x, r));
    const std::uint16_t got = lean::stochastic_round_bf16_bits(x, r);
    return want == got;
  };
  for (int k = 0; k < (1 << 22); ++k) {
    const float x = from_bits<float>(static_cast<std::uint32_t>(rng()));
    const std::uint32_t r = static_cast<std::uint32_t>(rng());
    ASSERT_TRUE(same(x, r)) << std::hex << bits_of(x) << " r " << r;
  }
  std::vector<std::uint32_t> edges = {0x00000000u, 0x80000000u, 0x00000001u, 0x0000ffffu, 0x00010000u, 0x8000ffffu,
                                      0x007fffffu, 0x3f800000u, 0x3f808000u, 0x3f80ffffu, 0xbf800001u, 0x7f7f0000u,
                                      0x7f7f0001u, 0x7f7f7fffu, 0x7f7f8000u, 0x7f7fffffu, 0xff7fffffu, 0x7f800000u,
                                      0xff800000u, 0x7fc00000u, 0xffc00001u, 0x7f7effffu};
  for (std::uint32_t u : edges) {
    const std::uint32_t low = u & 0xffffu;
    for (std::uint32_t r : {0u, 0xffffffffu, low << 8 << 8, ((low << 8) - 1u) << 8, (low << 8) << 8 | 0xffu,
                            static_cast<std::uint32_t>(rng())}) {
      ASSERT_TRUE(same(from_bits<float>(u), r)) << std::hex << u << " r " << r;
    }
  }
}

// --- the optimizers ---------------------------------------------------------

// A model of two parameters (sizes not multiples of the chunk or block) in
// 16-bit weights with their gradients.
template <class W>
struct Model {
  Tensor<W> a{Shape{1500}}, b{Shape{37}};
  Tensor<W> ga{Shape{1500}}, gb{Shape{37}};
  Model() {
    fill_normal(a, 0, 1, 11);
    fill_normal(b, 0, 1, 12);
  }
  void gradients(int s) {
    fill_normal(ga, 0, 0.5f, 200 + static_cast<std::uint64_t>(s));
    fill_normal(gb, 0, 2.0f, 300 + static_cast<std::uint64_t>(s));
  }
  std::vector<optim::Param> params() { return {{"a", a, ga}, {"b", b, gb}}; }
  std::vector<float> weights() const {
    std::vector<float> w;
    for (const Tensor<W>* t : {&a, &b}) {
      for (std::int64_t e = 0; e < t->numel(); ++e) w.push_back(to_float(t->at(e)));
    }
    return w;
  }
};

enum class Kind { adamw, sgd, rmsprop, lion };

std::unique_ptr<optim::Optimizer> make(Kind k, std::vector<optim::Param> params, StateLayout layout,
                                       bool amsgrad = true) {
  switch (k) {
    case Kind::adamw: {
      optim::AdamWOptions o;
      o.lr = 1e-2;
      o.amsgrad = amsgrad;  // three state tensors
      o.layout = layout;
      return std::make_unique<optim::AdamW>(std::move(params), o);
    }
    case Kind::sgd: {
      optim::SGDOptions o;
      o.lr = 1e-2;
      o.momentum = 0.9;
      o.nesterov = true;
      o.weight_decay = 1e-3;
      o.layout = layout;
      return std::make_unique<optim::SGD>(std::move(params), o);
    }
    case Kind::rmsprop: {
      optim::RMSpropOptions o;
      o.lr = 1e-3;
      o.momentum = 0.5;
      o.centered = true;
      o.layout = layout;
      return std::make_unique<optim::RMSprop>(std::move(params), o);
    }
    case Kind::lion: {
      optim::LionOptions o;
      o.lr = 1e-3;
      o.weight_decay = 0.1;
      o.layout = layout;
      return std::make_unique<optim::Lion>(std::move(params), o);
    }
  }
  return nullptr;
}

// bf16_sr's counter, written out from its documentation (docs/optimizers.md,
// "bf16 moments with stochastic rounding") rather than called: splitmix64's
// finaliser; a parameter's step key mix(mix(seed + G (param + 1)) + G (step
// + 1)), step = its step count after the step; the moments' key
// mix(step key ^ 0x5ca1ab1e0ddba11), one stream for every state tensor of the
// parameter; element e's 32 bits the upper half of mix(moment key + G (e + 1)).
std::uint64_t splitmix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
std::uint32_t moment_bits(std::uint64_t seed, std::uint64_t param, std::uint64_t step, std::uint64_t e) {
  const std::uint64_t g = 0x9e3779b97f4a7c15ull;
  const std::uint64_t key = splitmix(splitmix(seed + g * (param + 1)) + g * (step + 1));
  const std::uint64_t moments = splitmix(key ^ 0x5ca1ab1e0ddba11ull);
  return static_cast<std::uint32_t>(splitmix(moments + g * (e + 1)) >> 32);
}
// A finite float rounded to bf16 stochastically, on its bits: the truncated
// upper half (toward zero), one bf16 ulp further with probability low16 /
// 2^16, decided by the top 24 random bits: up when r >> 8 < low16 << 8.
float bf16_stochastic(float x, std::uint32_t r) {
  const std::uint32_t u = bits_of(x), low = u & 0xffffu, toward = u - low;
  const std::uint32_t out = (r >> 8) < (low << 8) ? toward + 0x10000u : toward;
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

// Rounds every state tensor of `opt` (fp32 layout) as `moments` would keep
// it, through save_state / load_state: bf16 by rounding to nearest even,
// bf16_sr stochastically with the counter above (seed: the lean run's
// StateLayout::seed), 8-bit by the brute-force nearest entry of the table
// above per block of 256 with the block's largest magnitude as its scale.
void round_state(optim::Optimizer& opt, Moments moments, const std::vector<bool>& nonnegative,
                 std::uint64_t seed = 0) {
  optim::OptimizerState st = opt.save_state();
  for (std::size_t i = 0; i < st.params.size(); ++i) {
    optim::ParamState& p = st.params[i];
    for (std::size_t k = 0; k < p.state.size(); ++k) {
      if (!p.state[k]) continue;
      std::vector<float>& v = *p.state[k];
      if (moments == Moments::bf16) {
        for (float& x : v) x = to_float(from_float<bfloat16>(x));
        continue;
      }
      if (moments == Moments::bf16_sr) {
        for (std::size_t e = 0; e < v.size(); ++e) {
          v[e] = bf16_stochastic(v[e], moment_bits(seed, i, static_cast<std::uint64_t>(p.step), e));
        }
        continue;
      }
      const bool nonneg = nonnegative[k];
      const std::vector<double> t = table(nonneg ? lean::kUnsignedMagnitudes : lean::kSignedMagnitudes);
      for (std::size_t b = 0; b < v.size(); b += 256) {
        const std::size_t end = std::min(v.size(), b + 256);
        float scale = 0;
        for (std::size_t e = b; e < end; ++e) scale = std::max(scale, std::fabs(v[e]));
        for (std::size_t e = b; e < end; ++e) {
          if (scale == 0) continue;
          const float y = std::fabs(v[e]) / scale;
          int q = nearest(y, t);
          if (nonneg && q == 0 && v[e] > 0) q = 1;  // a positive second moment keeps the smallest entry
          const float mag = static_cast<float>(t[static_cast<std::size_t>(q)]) * scale;
          v[e] = v[e] < 0 && !nonneg && mag != 0 ? -mag : mag;
        }
      }
    }
  }
  opt.load_state(st);
}

std::vector<bool> nonnegative_states(Kind k) {
  switch (k) {
    case Kind::adamw: return {false, true, true};
    case Kind::rmsprop: return {true, false, false};
    default: return {false, false, false};
  }
}

class LeanMoments : public ::testing::TestWithParam<std::tuple<Kind, Moments>> {};

// The lean step equals an fp32-state step whose state is rounded after
// every step: the same arithmetic, only what is kept is rounded.
TEST_P(LeanMoments, EqualFp32StateRoundedAfterEveryStep) {
  const auto [kind, moments] = GetParam();
  Model<bfloat16> m1, m2;
  StateLayout lean_layout;
  lean_layout.moments = moments;
  lean_layout.seed = 99;
  // (8-bit: no amsgrad here, since the reference's load_state refuses a
  // running maximum rounded below its moment, which 8-bit blocks allow; the
  // lean optimizer's own checkpoints take it: CheckpointsResumeBitExactly.)
  const bool amsgrad = moments != Moments::int8;
  auto lean_opt = make(kind, m1.params(), lean_layout, amsgrad);
  auto ref = make(kind, m2.params(), {}, amsgrad);
  for (int s = 0; s < 12; ++s) {
    m1.gradients(s);
    m2.gradients(s);
    lean_opt->step();
    ref->step();
    round_state(*ref, moments, nonnegative_states(kind), lean_layout.seed);
    ASSERT_EQ(first_difference(m1.weights(), m2.weights()), -1) << "weights, step " << s;
  }
  EXPECT_EQ(test::state_bits(*lean_opt), test::state_bits(*ref));
}

INSTANTIATE_TEST_SUITE_P(Layouts, LeanMoments,
                         ::testing::Combine(::testing::Values(Kind::adamw, Kind::sgd, Kind::rmsprop, Kind::lion),
                                            ::testing::Values(Moments::bf16, Moments::bf16_sr, Moments::int8)));

// A remainder master is the fp32 master: the same weights and masters, bit
// for bit, with fp32 moments and with bf16 ones.
TEST(LeanMaster, RemainderIsTheFp32MasterBitForBit) {
  for (Kind kind : {Kind::adamw, Kind::sgd, Kind::rmsprop, Kind::lion}) {
    for (Moments moments : {Moments::fp32, Moments::bf16, Moments::bf16_sr}) {
      Model<bfloat16> m1, m2;
      StateLayout rem, full;
      rem.master = Master::remainder;
      rem.moments = full.moments = moments;
      auto a = make(kind, m1.params(), rem);
      auto b = make(kind, m2.params(), full);
      for (int s = 0; s < 30; ++s) {
        m1.gradients(s);
        m2.gradients(s);
        a->step();
        b->step();
      }
      ASSERT_EQ(first_difference(m1.weights(), m2.weights()), -1) << static_cast<int>(kind);
      for (std::size_t i = 0; i < 2; ++i) {
        ASSERT_EQ(first_difference(a->master_values(i), b->master_values(i)), -1) << static_cast<int>(kind);
      }
      EXPECT_EQ(test::state_bits(*a), test::state_bits(*b));
    }
  }
}

// Without a master, fp32 weights are their own master: the fp32-master run.
TEST(LeanMaster, NoMasterOnFp32WeightsIsTheFp32MasterRun) {
  Model<float> m1, m2;
  StateLayout none;
  none.master = Master::none;
  auto a = make(Kind::adamw, m1.params(), none);
  auto b = make(Kind::adamw, m2.params(), {});
  for (int s = 0; s < 10; ++s) {
    m1.gradients(s);
    m2.gradients(s);
    a->step();
    b->step();
  }
  EXPECT_EQ(first_difference(m1.weights(), m2.weights()), -1);
  EXPECT_EQ(test::state_bits(*a), test::state_bits(*b));
}

// SGD without a master on bf16 weights: 10,000 steps of 1e-4 take 1.0 to
// about 2.0 on average; the run repeats its bits, and another seed draws
// other numbers.
TEST(LeanMaster, StochasticRoundingReachesTheSumOfTheUpdates) {
  auto run = [](std::uint64_t seed) {
    Tensor<bfloat16> w(Shape{512}), g(Shape{512});
    fill(w, bfloat16(1.0f));
    fill(g, bfloat16(-1.0f));
    optim::SGDOptions o;
    o.lr = 1e-4;
    o.layout.master = Master::none;
    o.layout.seed = seed;
    optim::SGD opt({{"w", w, g}}, o);
    for (int s = 0; s < 10000; ++s) opt.step();
    std::vector<float> out;
    for (std::int64_t e = 0; e < w.numel(); ++e) out.push_back(to_float(w.at(e)));
    return out;
  };
  const std::vector<float> a = run(1), again = run(1), other = run(2);
  double mean = 0;
  for (float x : a) mean += x;
  mean /= static_cast<double>(a.size());
  EXPECT_NEAR(mean, 2.0, 0.02);
  EXPECT_EQ(first_difference(a, again), -1);
  EXPECT_NE(first_difference(a, other), -1);
}

// The drift of a bf16 second moment (benchmarks/bf16_moment_drift.py): AdamW
// (lr 0: the moments alone) on n elements with N(0, sigma_e^2 s(t)^2)
// gradients, sigma_e log-normal, s(t) = 1 or halving every 1,000 steps, for
// 3,000 steps. Returns the median over elements of exp_avg_sq divided by
// the float64 moment of the same gradients, written here.
double median_v_over_float64(Moments moments, bool decay) {
  const std::int64_t n = 4096;
  const int steps = 3000;
  const double beta2 = 0.999;
  Tensor<float> w(Shape{n}), g(Shape{n});
  fill_normal(w, 0, 1, 1);
  optim::AdamWOptions o;
  o.lr = 0;
  o.weight_decay = 0;
  o.betas = {0.9, beta2};
  o.layout.moments = moments;
  o.layout.seed = 17;
  optim::AdamW opt({{"w", w, g}}, o);
  std::mt19937_64 rng(23);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> sigma(static_cast<std::size_t>(n)), v64(static_cast<std::size_t>(n), 0.0);
  for (double& s : sigma) s = std::exp(normal(rng));
  for (int t = 0; t < steps; ++t) {
    const double scale = decay ? std::pow(0.5, t / 1000.0) : 1.0;
    for (std::int64_t e = 0; e < n; ++e) {
      const float x = static_cast<float>(normal(rng) * sigma[static_cast<std::size_t>(e)] * scale);
      g.at(e) = x;
      double& v = v64[static_cast<std::size_t>(e)];
      v = beta2 * v + (1.0 - beta2) * static_cast<double>(x) * static_cast<double>(x);
    }
    opt.step();
  }
  const optim::OptimizerState st = opt.save_state();
  const std::vector<float>& v = *st.params[0].state[1];  // exp_avg_sq
  std::vector<double> ratio(static_cast<std::size_t>(n));
  for (std::size_t e = 0; e < ratio.size(); ++e) ratio[e] = v[e] / v64[e];
  std::nth_element(ratio.begin(), ratio.begin() + n / 2, ratio.end());
  return ratio[static_cast<std::size_t>(n / 2)];
}

// Rounded to nearest, a bf16 second moment cannot move by 0.1% of itself
// (half its ulp is 2^-9 to 2^-8 of it): it ends 1.33x the float64 moment
// with stationary gradients and 4x with decaying ones. Stochastic rounding
// keeps each update in expectation: within 2% (the rounding noise of one
// element is about 4%, of the median of 4,096 a fraction of that).
TEST(LeanMoments, StochasticBf16SecondMomentsTrackFloat64AndRoundToNearestDoesNot) {
  for (bool decay : {false, true}) {
    SCOPED_TRACE(decay ? "gradients halving every 1,000 steps" : "stationary gradients");
    const double fp32 = median_v_over_float64(Moments::fp32, decay);
    const double rne = median_v_over_float64(Moments::bf16, decay);
    const double sr = median_v_over_float64(Moments::bf16_sr, decay);
    std::printf("%s: median v / v(float64): fp32 %.4f, bf16 %.4f, bf16_sr %.4f\n", decay ? "decay" : "stationary",
                fp32, rne, sr);
    EXPECT_NEAR(fp32, 1.0, 1e-3);
    EXPECT_NEAR(sr, 1.0, 0.02);
    EXPECT_GT(rne, decay ? 3.0 : 1.2) << "rounding to nearest should not track the moment";
  }
}

// The moments' stream is not the weight's: over 2^16 elements of one step
// key, the two uniform numbers of an element are uncorrelated (|r| well
// under 4 / sqrt(n) = 0.016; one stream for both would give r = 1).
TEST(LeanMoments, TheMomentsAndTheWeightDrawFromIndependentStreams) {
  const std::uint64_t key = lean::rounding_key(42, 3, 1000);
  const std::uint64_t mkey = lean::moment_key(key);
  double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
  const int n = 1 << 16;
  for (int e = 0; e < n; ++e) {
    const double x = lean::rounding_bits(key, static_cast<std::uint64_t>(e)) * 0x1p-32;
    const double y = lean::rounding_bits(mkey, static_cast<std::uint64_t>(e)) * 0x1p-32;
    sx += x;
    sy += y;
    sxx += x * x;
    syy += y * y;
    sxy += x * y;
  }
  const double cov = sxy / n - sx / n * sy / n;
  const double r = cov / std::sqrt((sxx / n - sx / n * sx / n) * (syy / n - sy / n * sy / n));
  EXPECT_LT(std::fabs(r), 0.016) << r;
  // And the test's written-out counter is the library's.
  EXPECT_EQ(lean::rounding_bits(mkey, 77), moment_bits(42, 3, 1000, 77));
}

// With amsgrad, max_exp_avg_sq equals exp_avg_sq in fp32 whenever that rose;
// rounded with one shared number a step, the stored maximum is never below
// the stored moment (load_state would refuse the checkpoint otherwise).
TEST(LeanMoments, StochasticBf16KeepsTheRunningMaximumAboveItsMoment) {
  Model<bfloat16> m;
  StateLayout l;
  l.moments = Moments::bf16_sr;
  l.seed = 5;
  auto opt = make(Kind::adamw, m.params(), l, true);
  for (int s = 0; s < 20; ++s) {
    m.gradients(s);
    opt->step();
  }
  const optim::OptimizerState st = opt->save_state();
  std::size_t ties = 0;
  for (const optim::ParamState& p : st.params) {
    const std::vector<float>&v = *p.state[1], &mx = *p.state[2];
    for (std::size_t e = 0; e < v.size(); ++e) {
      ASSERT_GE(mx[e], v[e]) << e;
      ties += mx[e] == v[e] ? 1 : 0;
    }
  }
  EXPECT_GT(ties, 0u) << "no element whose maximum is its moment: the test checks nothing";
  opt->load_state(st);  // accepted
}

std::vector<StateLayout> all_lean_layouts() {
  std::vector<StateLayout> out;
  for (Moments mo : {Moments::fp32, Moments::bf16, Moments::bf16_sr, Moments::int8}) {
    for (Master ma : {Master::fp32, Master::remainder, Master::none}) {
      StateLayout l;
      l.moments = mo;
      l.master = ma;
      l.seed = 42;
      if (l.lean()) out.push_back(l);
    }
  }
  return out;
}

// A checkpoint (save_state / load_state) taken mid-run resumes every
// layout bit-exactly: weights, state and the stochastic rounding's numbers.
TEST(LeanState, CheckpointsResumeBitExactly) {
  for (const StateLayout& layout : all_lean_layouts()) {
    SCOPED_TRACE(std::string("moments ") + to_string(layout.moments) + ", master " + to_string(layout.master));
    Model<bfloat16> m1, m2;
    auto a = make(Kind::adamw, m1.params(), layout);
    for (int s = 0; s < 5; ++s) {
      m1.gradients(s);
      a->step();
    }
    const optim::OptimizerState saved = a->save_state();
    const std::vector<float> saved_weights = m1.weights();
    for (int s = 5; s < 10; ++s) {
      m1.gradients(s);
      a->step();
    }
    // A fresh model and optimizer: the checkpoint's weights, then its state.
    auto b = make(Kind::adamw, m2.params(), layout);
    std::vector<std::vector<float>> weights = {
        std::vector<float>(saved_weights.begin(), saved_weights.begin() + 1500),
        std::vector<float>(saved_weights.begin() + 1500, saved_weights.end())};
    b->load_weights(weights);
    b->load_state(saved);
    for (int s = 5; s < 10; ++s) {
      m2.gradients(s);
      b->step();
    }
    ASSERT_EQ(first_difference(m1.weights(), m2.weights()), -1);
    EXPECT_EQ(test::state_bits(*a), test::state_bits(*b));
  }
}

// An overflow skip leaves every bit alone in every layout.
TEST(LeanState, ASkippedStepChangesNothing) {
  for (const StateLayout& layout : all_lean_layouts()) {
    SCOPED_TRACE(std::string("moments ") + to_string(layout.moments) + ", master " + to_string(layout.master));
    Model<bfloat16> m;
    auto opt = make(Kind::adamw, m.params(), layout);
    amp::GradScaler scaler;
    for (int s = 0; s < 3; ++s) {
      m.gradients(s);
      scaler.step(*opt);
      scaler.update();
    }
    const auto before = test::state_bits(*opt);
    const std::vector<float> weights = m.weights();
    m.gradients(3);
    m.gb.at(5) = bfloat16(std::numeric_limits<float>::infinity());
    EXPECT_FALSE(scaler.step(*opt));
    scaler.update();
    EXPECT_EQ(test::state_bits(*opt), before);
    EXPECT_EQ(first_difference(m.weights(), weights), -1);
  }
}

// A skipped step draws no numbers: the stochastic layouts' counter is the
// parameter's step count, which only an applied step advances. A run with
// an overflow at step 3 (the scale then halves: its later gradients are
// given halved, exactly, so the unscaled ones are the same) has the bits of
// a run that never saw step 3.
TEST(LeanState, ASkippedStepDrawsNoNumbers) {
  for (const StateLayout& layout : all_lean_layouts()) {
    if (layout.master != Master::none && layout.moments != Moments::bf16_sr) continue;
    SCOPED_TRACE(std::string("moments ") + to_string(layout.moments) + ", master " + to_string(layout.master));
    Model<bfloat16> ma, mb;
    auto a = make(Kind::adamw, ma.params(), layout);
    auto b = make(Kind::adamw, mb.params(), layout);
    amp::GradScalerOptions so;
    so.init_scale = 1;
    amp::GradScaler scaler(so);
    for (int s = 0; s < 8; ++s) {
      ma.gradients(s);
      if (s == 3) ma.gb.at(5) = bfloat16(std::numeric_limits<float>::infinity());
      if (s > 3) {
        for (Tensor<bfloat16>* t : {&ma.ga, &ma.gb}) {
          for (std::int64_t e = 0; e < t->numel(); ++e) t->at(e) = bfloat16(to_float(t->at(e)) * 0.5f);
        }
      }
      EXPECT_EQ(scaler.step(*a), s != 3) << s;
      scaler.update();
      if (s == 3) continue;
      mb.gradients(s);
      b->step();
    }
    EXPECT_EQ(scaler.scale(), 0.5f);
    ASSERT_EQ(first_difference(ma.weights(), mb.weights()), -1);
    EXPECT_EQ(test::state_bits(*a), test::state_bits(*b));
  }
}

TEST(LeanState, BadLayoutsAreRefusedByName) {
  Model<half> m;
  optim::AdamWOptions o;
  o.layout.master = Master::remainder;
  expect_error([&] { optim::AdamW opt(m.params(), o); },
               {"parameter \"a\"", "master = remainder needs bfloat16 weights", "float16"});
  o.layout.master = static_cast<Master>(7);
  expect_error([&] { optim::AdamW opt(m.params(), o); }, {"StateLayout::master = 7"});
  // Fixed once the group exists; nothing changes.
  Model<bfloat16> b;
  optim::AdamWOptions ok;
  ok.layout.moments = Moments::bf16;
  optim::AdamW opt(b.params(), ok);
  optim::AdamWOptions other = ok;
  other.layout.moments = Moments::int8;
  other.lr = 0.5;
  expect_error([&] { opt.set_options(0, other); }, {"StateLayout (moments bf16", "asked: moments 8bit", "fixed"});
  EXPECT_EQ(opt.options(0).lr, ok.lr);
  // No fp32 master to hand out; master_values reconstructs it.
  Model<bfloat16> c;
  optim::AdamWOptions none;
  none.layout.master = Master::none;
  optim::AdamW n(c.params(), none);
  expect_error([&] { (void)n.master(0); }, {"parameter \"a\"", "keeps no fp32 master", "none", "master_values"});
  EXPECT_EQ(n.master_values(0).size(), 1500u);
  expect_error([&] { n.rebind(0, c.a, c.ga); }, {"rebind", "keeps no fp32 master"});
  EXPECT_EQ(optim::parse_moments("8bit"), Moments::int8);
  EXPECT_EQ(optim::parse_moments("bf16sr"), Moments::bf16_sr);
  EXPECT_STREQ(to_string(Moments::bf16_sr), "bf16sr");
  expect_error([] { (void)optim::parse_moments("bf16-sr"); }, {"moments = \"bf16-sr\"", "fp32, bf16, bf16sr or 8bit"});
  optim::AdamWOptions bad;
  bad.layout.moments = static_cast<Moments>(9);
  expect_error([&] { optim::AdamW opt9(b.params(), bad); }, {"StateLayout::moments = 9", "not a Moments value"});
  optim::AdamWOptions sr = ok;
  sr.layout.moments = Moments::bf16_sr;
  expect_error([&] { opt.set_options(0, sr); }, {"StateLayout (moments bf16", "asked: moments bf16sr", "fixed"});
  expect_error([] { (void)optim::parse_master("fp16"); }, {"master = \"fp16\"", "fp32, remainder or none"});
}

}  // namespace
}  // namespace mixprec
