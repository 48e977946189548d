// SPDX-License-Identifier: Apache-2.0
// A data-parallel job in which one rank fails mid-step (tests/dist/abort_test.sh
// runs it under mpirun): `throw` on rank 1 after the first all-reduce, caught
// by dist::run_or_abort, or `exit`: rank 1 leaves without a word, or `hang`:
// rank 1 stops calling collectives (a loop, a deadlock) and every rank has a
// 2 s time-out (Communicator::set_timeout). Rank 0 is then waiting in the
// next all-reduce; the job must end, not hang.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "mixprec/dist/mpi.hpp"
#include "mixprec/mixprec.hpp"

int main(int argc, char** argv) {
  const bool exits = argc > 1 && std::strcmp(argv[1], "exit") == 0;
  const bool hangs = argc > 1 && std::strcmp(argv[1], "hang") == 0;
  mixprec::dist::MpiCommunicator world;
  if (hangs) world.set_timeout(std::chrono::seconds(2));
  return mixprec::dist::run_or_abort(world, [&] {
    mixprec::Tensor<float> t({1000});
    mixprec::fill(t, 1.0f);
    world.all_reduce_sum(t);
    if (world.rank() == 1) {
      if (exits) std::_Exit(3);
      if (hangs) std::this_thread::sleep_for(std::chrono::seconds(120));  // mpirun ends it first
      throw std::runtime_error("planted failure in step 2 (abort_probe)");
    }
    for (int step = 0; step < 3; ++step) world.all_reduce_sum(t);  // rank 0 waits here
  });
}
