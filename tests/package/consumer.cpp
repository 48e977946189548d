// SPDX-License-Identifier: Apache-2.0
// A downstream program: uses mixprec's host API the way a user's trainer would.
#include <mixprec/mixprec.hpp>

#include <cstdio>

int main() {
  mixprec::Tensor<mixprec::half> weights({4, 8});
  mixprec::fill_normal(weights, 0.0f, 1.0f, 1);
  mixprec::Tensor<float> master({4, 8});
  mixprec::convert(weights, master);
  for (std::int64_t i = 0; i < master.numel(); ++i) {
    if (master.at(i) != mixprec::to_float(weights.at(i))) return 1;
  }
  std::printf("mixprec %s: %lld elements converted\n", MIXPREC_VERSION_STRING,
              static_cast<long long>(master.numel()));
  return 0;
}
