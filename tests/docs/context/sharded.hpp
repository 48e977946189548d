// SPDX-License-Identifier: Apache-2.0
// What docs/distributed.md's ZeRO-1 fragment takes as given: a communicator
// (MPI's, or any dist::Communicator), the parameters and options an
// ordinary optimizer would get, and the clipping threshold.
#include <vector>

#include <mixprec/mixprec.hpp>
#include <mixprec/dist/sharded.hpp>

namespace amp = mixprec::amp;
namespace dist = mixprec::dist;
namespace optim = mixprec::optim;
extern dist::Communicator& comm;
std::vector<optim::Param> params;
optim::AdamWOptions options;
const double max_norm = 1.0;
