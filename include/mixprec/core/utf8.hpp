// SPDX-License-Identifier: Apache-2.0
// The library's one UTF-8 validator (RFC 3629), used by the JSONL log, the
// safetensors reader and writer, and through nlohmann-json's own by the report.
#pragma once

#include "mixprec/core/config.hpp"

#include <cstddef>
#include <string_view>

MIXPREC_NAMESPACE_BEGIN namespace detail {

/// The length in bytes (1 to 4) of the well-formed UTF-8 sequence that
/// starts at p[0], of the `n` >= 1 bytes available; 0 when none starts
/// there: a continuation byte, C0/C1, F5..FF, an overlong form, a UTF-16
/// surrogate, a code point above U+10FFFF, or a sequence cut short by n.
inline std::size_t utf8_sequence_length(const unsigned char* p, std::size_t n) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  std::size_t length = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the bounds of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    length = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    length = 3;
    if (c == 0xE0) lo = 0xA0;  // overlong below U+0800
    if (c == 0xED) hi = 0x9F;  // UTF-16 surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    length = 4;
    if (c == 0xF0) lo = 0x90;  // overlong below U+10000
    if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return 0;
  }
  if (n < length || p[1] < lo || p[1] > hi) return 0;
  for (std::size_t k = 2; k < length; ++k) {
    if (p[k] < 0x80 || p[k] > 0xBF) return 0;
  }
  return length;
}

/// The offset of the first byte of `text` that is not part of well-formed
/// UTF-8, or text.size() when all of it is.
inline std::size_t utf8_invalid_at(std::string_view text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  std::size_t i = 0;
  while (i < text.size()) {
    const std::size_t length = utf8_sequence_length(p + i, text.size() - i);
    if (length == 0) return i;
    i += length;
  }
  return text.size();
}

/// True when all of `text` is well-formed UTF-8.
inline bool is_utf8(std::string_view text) { return utf8_invalid_at(text) == text.size(); }

}  // namespace detail
MIXPREC_NAMESPACE_END
