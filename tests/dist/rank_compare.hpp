// SPDX-License-Identifier: Apache-2.0
// Comparing state across MPI ranks in the distributed tests: a byte
// fingerprint (FNV-1a) and a check that every rank holds the same one.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mixprec::test {

/// FNV-1a over n bytes at p, continuing from h: a fingerprint to compare across ranks.
inline std::uint64_t fnv(const void* p, std::size_t n, std::uint64_t h = 1469598103934665603ull) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

/// True when every rank of comm passed the same value (collective: all ranks call it).
inline bool same_on_every_rank(std::uint64_t v, MPI_Comm comm) {
  int size = 0;
  EXPECT_EQ(MPI_Comm_size(comm, &size), MPI_SUCCESS);
  std::vector<std::uint64_t> all(static_cast<std::size_t>(size));
  EXPECT_EQ(MPI_Allgather(&v, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm), MPI_SUCCESS);
  for (std::uint64_t x : all) {
    if (x != all[0]) return false;
  }
  return true;
}

}  // namespace mixprec::test
