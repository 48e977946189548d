// SPDX-License-Identifier: Apache-2.0
// state_bits and first_difference: every bit of an optimizer's training state (masters, state
// tensors and which exist, step counts, lrs, applied steps), for tests that
// compare states before and after a call, or between two runs.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "mixprec/optim/optimizer.hpp"

namespace mixprec::test {

/// Index of the first element whose bits differ (or, when the sizes differ,
/// the shorter size), -1 if none.
inline std::int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  const std::size_t n = a.size() < b.size() ? a.size() : b.size();
  for (std::size_t e = 0; e < n; ++e) {
    if (std::memcmp(&a[e], &b[e], sizeof(float)) != 0) return static_cast<std::int64_t>(e);
  }
  return a.size() == b.size() ? -1 : static_cast<std::int64_t>(n);
}

// Every bit of an optimizer's state, model weights excluded.
inline std::vector<std::uint32_t> state_bits(const optim::Optimizer& opt) {
  const optim::OptimizerState st = opt.save_state();
  std::vector<std::uint32_t> out;
  auto add = [&](const std::vector<float>& v) {
    for (float x : v) {
      std::uint32_t u;
      std::memcpy(&u, &x, 4);
      out.push_back(u);
    }
  };
  for (const optim::ParamState& p : st.params) {
    add(p.master);
    out.push_back(0xabcd0000u + static_cast<std::uint32_t>(p.state.size()));
    for (const auto& s : p.state) {
      out.push_back(s ? 1u : 0u);
      if (s) add(*s);
    }
    out.push_back(static_cast<std::uint32_t>(p.step));
    out.push_back(static_cast<std::uint32_t>(p.step >> 32));
  }
  for (double lr : st.lrs) {
    std::uint64_t u;
    std::memcpy(&u, &lr, 8);
    out.push_back(static_cast<std::uint32_t>(u));
    out.push_back(static_cast<std::uint32_t>(u >> 32));
  }
  out.push_back(static_cast<std::uint32_t>(st.applied_steps));
  return out;
}

}  // namespace mixprec::test
