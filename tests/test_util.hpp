// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <string>
#include <system_error>

#include <unistd.h>

#include "mixprec/core/error.hpp"

namespace mixprec::test {

/// Distance in units in the last place between two floats (0: same bits,
/// or +0 and -0).
inline std::int64_t ulp_distance(float a, float b) {
  std::int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia < 0) ia = INT32_MIN - ia;
  if (ib < 0) ib = INT32_MIN - ib;
  return std::llabs(static_cast<long long>(ia) - ib);
}

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

/// A scratch file name in a directory of the test's temporary directory
/// that belongs to this process and is removed, with what is in it, when the
/// process exits. ctest runs tests in parallel, and a source built twice (the
/// *_portable_test twins) must not share, or delete, the other's file.
inline std::string temp_path(const std::string& name) {
  struct Scratch {
    pid_t owner = ::getpid();
    std::filesystem::path dir;
    Scratch() : dir(std::filesystem::path(::testing::TempDir()) / ("mixprec_" + std::to_string(owner))) {
      std::filesystem::create_directories(dir);
    }
    ~Scratch() {
      if (::getpid() != owner) return;  // a forked child that exits leaves its parent's files alone
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
    }
  };
  static const Scratch scratch;
  return (scratch.dir / name).string();
}

}  // namespace mixprec::test
