// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the CPU tests.
#pragma once

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

#include "mixprec/core/error.hpp"

namespace mixprec::test {

/// Runs f and expects a mixprec::Error whose message contains every fragment.
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
    ADD_FAILURE() << "no mixprec::Error thrown";
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const char* fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message \"" << message << "\" lacks \"" << fragment << "\"";
    }
  }
}

}  // namespace mixprec::test
