// SPDX-License-Identifier: Apache-2.0
// What docs/distributed.md's ZeRO-1-on-GPUs fragment takes as given: a
// device communicator (NCCL's, or any dist::Communicator on a GPU), the
// step's stream, the parameters (on that GPU) and options an ordinary
// optimizer would get, and the clipping threshold.
#include <vector>

#include <mixprec/mixprec.hpp>
#include <mixprec/dist/sharded.hpp>

namespace amp = mixprec::amp;
namespace dist = mixprec::dist;
namespace optim = mixprec::optim;
extern dist::Communicator& nccl;
extern mixprec::stream_t stream;
std::vector<optim::Param> params;
optim::AdamWOptions options;
const double max_norm = 1.0;
