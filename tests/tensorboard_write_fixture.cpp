// SPDX-License-Identifier: Apache-2.0
// Writes a TensorBoard event file with known contents into argv[1] (emptied
// first), for
// tensorboard_read.py, which reads it back with TensorBoard's own reader:
// "loss" = 1 / (s + 1) at steps 0..299, "a/b" = -3.25 at step 2^40, and the
// histogram "h" (min -3, max 5, num 7, sum 11, sum_squares 29, limits
// {-3, 0, 5}, counts {2, 4, 1}) at step 12.
#include <cstdio>
#include <filesystem>

#include "mixprec/monitor/tensorboard.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: tensorboard_write_fixture DIR\n");
    return 2;
  }
  std::filesystem::remove_all(argv[1]);  // one event file: the reader reads every file there
  mixprec::monitor::TensorBoardWriter w(argv[1]);
  for (int s = 0; s < 300; ++s) w.add_scalar("loss", 1.0 / (s + 1), s);
  w.add_scalar("a/b", -3.25, 1LL << 40);
  mixprec::monitor::TensorBoardHistogram h;
  h.min = -3;
  h.max = 5;
  h.num = 7;
  h.sum = 11;
  h.sum_squares = 29;
  h.limits = {-3, 0, 5};
  h.counts = {2, 4, 1};
  w.add_histogram("h", h, 12);
  std::printf("%s\n", w.path().c_str());
  return 0;
}
