// SPDX-License-Identifier: Apache-2.0
// What docs/monitor.md's CUDA-graph example takes as given: the monitor of
// the first example, a stream, the step body and the two graphs.
#include <mixprec/mixprec.hpp>

using mixprec::Graph;
extern mixprec::monitor::Monitor monitor;
mixprec::stream_t stream = nullptr;
void step();         // one training step: forward, backward, monitor.step(loss)
extern Graph graphs[2];  // [false]: a step that is not logged; [true]: a logged one
