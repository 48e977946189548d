// SPDX-License-Identifier: Apache-2.0
// data::Batches and nn::count_correct on the host: the batches follow the
// order (with wrap-around), carry their labels, and bad input is refused
// before anything changes; count_correct against a hand-made argmax.
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

// n rows of 3 values; row r holds (r, r + 0.5, -r), label r % 7.
template <class T>
Tensor<T> make_rows(std::int64_t n, std::vector<std::int32_t>& labels) {
  Tensor<T> rows({n, 3});
  labels.resize(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < n; ++r) {
    rows.at(3 * r) = from_float<T>(static_cast<float>(r));
    rows.at(3 * r + 1) = from_float<T>(static_cast<float>(r) + 0.5f);
    rows.at(3 * r + 2) = from_float<T>(-static_cast<float>(r));
    labels[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r % 7);
  }
  return rows;
}

TEST(Batches, ServesRowsInTheOrderAndWrapsAround) {
  std::vector<std::int32_t> labels;
  const Tensor<float> rows = make_rows<float>(10, labels);
  data::Batches<float> b(rows.view(), labels, 4);
  EXPECT_EQ(b.size(), 10);
  EXPECT_EQ(b.full_batches(), 2);
  const std::vector<std::int32_t> order = {9, 3, 0, 7, 1, 8, 2, 6, 5, 4};
  b.set_order(order);
  // Three calls: positions 0..11, the last two wrap to order[0], order[1].
  for (int k = 0; k < 3; ++k) {
    b.next();
    ASSERT_EQ(b.x().shape(), Shape({4, 3}));
    for (int i = 0; i < 4; ++i) {
      const std::int32_t r = order[static_cast<std::size_t>((k * 4 + i) % 10)];
      EXPECT_EQ(b.x().data()[3 * i], static_cast<float>(r)) << "call " << k << " row " << i;
      EXPECT_EQ(b.x().data()[3 * i + 1], static_cast<float>(r) + 0.5f);
      EXPECT_EQ(b.x().data()[3 * i + 2], -static_cast<float>(r));
      EXPECT_EQ(b.labels()[i], r % 7);
    }
  }
  // set_order rewinds.
  b.set_order(order);
  b.next();
  EXPECT_EQ(b.x().data()[0], 9.0f);
}

TEST(Batches, ShuffleIsAPermutationFromTheRng) {
  std::vector<std::int32_t> labels;
  const Tensor<half> rows = make_rows<half>(12, labels);
  data::Batches<half> b(rows.view(), labels, 3);
  std::mt19937_64 rng(5), same(5);
  b.shuffle(rng);
  std::vector<std::int32_t> expected(12);
  std::iota(expected.begin(), expected.end(), 0);
  std::shuffle(expected.begin(), expected.end(), same);
  std::vector<int> seen(12, 0);
  for (int k = 0; k < 4; ++k) {
    b.next();
    for (int i = 0; i < 3; ++i) {
      const int r = static_cast<int>(to_float(b.x().data()[3 * i]));
      EXPECT_EQ(r, expected[static_cast<std::size_t>(3 * k + i)]);
      ++seen[static_cast<std::size_t>(r)];
    }
  }
  for (int r = 0; r < 12; ++r) EXPECT_EQ(seen[static_cast<std::size_t>(r)], 1) << r;
}

TEST(Batches, BadInputIsRefusedAndChangesNothing) {
  std::vector<std::int32_t> labels;
  const Tensor<float> rows = make_rows<float>(6, labels);
  EXPECT_THROW(data::Batches<float>(rows.view(), labels, 0), Error);
  std::vector<std::int32_t> short_labels(5);
  EXPECT_THROW(data::Batches<float>(rows.view(), short_labels, 2), Error);
  const Tensor<float> flat({6});
  EXPECT_THROW(data::Batches<float>(flat.view(), labels, 2), Error);
  data::Batches<float> b(rows.view(), labels, 2);
  b.set_order({5, 4, 3, 2, 1, 0});
  b.next();
  try {
    b.set_order({0, 1, 2, 6, 4, 5});
    FAIL() << "an index out of range was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("order[3] = 6"), std::string::npos) << e.what();
  }
  EXPECT_THROW(b.set_order({0, 1}), Error);
  b.next();  // still the first order, second batch: rows 3, 2
  EXPECT_EQ(b.x().data()[0], 3.0f);
  EXPECT_EQ(b.x().data()[3], 2.0f);
}

TEST(CountCorrect, CountsTheFirstLargestEntryAtTheLabel) {
  Tensor<float> logits({5, 4});
  const float v[5][4] = {{0, 3, 1, 2},            // argmax 1
                         {5, 5, 1, 0},            // tie: the first, 0
                         {NAN, 1, 2, -1},         // NaN never wins: 2
                         {-INFINITY, -INFINITY, -INFINITY, -INFINITY},  // no prediction
                         {1, 2, 3, 4}};           // 3
  for (int r = 0; r < 5; ++r) {
    for (int c = 0; c < 4; ++c) logits.at(r * 4 + c) = v[r][c];
  }
  const std::int32_t right[5] = {1, 0, 2, 0, 3};
  EXPECT_EQ(nn::count_correct<float>(logits.view(), right, 5), 4);  // all but the row with no prediction
  const std::int32_t wrong[5] = {2, 1, 0, 3, 0};
  EXPECT_EQ(nn::count_correct<float>(logits.view(), wrong, 5), 0);
  EXPECT_EQ(nn::count_correct<float>(logits.view(), right, 2), 2);
  EXPECT_THROW(nn::count_correct<float>(logits.view(), right, 6), Error);
}

}  // namespace
}  // namespace mixprec
