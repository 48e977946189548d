// SPDX-License-Identifier: Apache-2.0
// mixprec::Error and the argument checks that every public entry point uses.
#pragma once

#include "mixprec/core/config.hpp"

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

MIXPREC_NAMESPACE_BEGIN

/// The one exception type mixprec throws. Messages name the operation, the
/// offending argument and its value, e.g.
/// "Tensor: shape[1] = -3, must be >= 0".
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}

template <class... Args>
[[noreturn]] void throw_error(Args&&... args) {
  throw Error(concat(std::forward<Args>(args)...));
}

}  // namespace detail
MIXPREC_NAMESPACE_END  // namespace mixprec

/// Throws mixprec::Error built from the remaining arguments when `cond` is
/// false. Always active: it does not vanish under NDEBUG.
#define MIXPREC_CHECK(cond, ...)                  \
  do {                                            \
    if (!(cond)) {                                \
      ::mixprec::detail::throw_error(__VA_ARGS__); \
    }                                             \
  } while (false)
