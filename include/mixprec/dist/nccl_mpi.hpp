// SPDX-License-Identifier: Apache-2.0
// A NCCL communicator started through MPI: one mpirun starts one process
// per GPU, on one node or several; MPI hands out NCCL's unique id. Needs
// both mixprec::mpi and mixprec::nccl.
#pragma once

#include <memory>

#include "mixprec/dist/mpi.hpp"
#include "mixprec/dist/nccl.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace dist {

/// The NCCL communicator of the ranks of `mpi`: rank 0 makes the id, MPI
/// broadcasts it, and each rank takes the GPU local_rank() % (GPUs on its
/// node), or `device` when given.
inline std::unique_ptr<NcclCommunicator> nccl_over_mpi(MpiCommunicator& mpi, int device = -1) {
  ncclUniqueId id{};
  if (mpi.rank() == 0) id = NcclCommunicator::make_id();
  mpi.broadcast(&id, sizeof id, 0);
  if (device < 0) {
    int count = 0;
    MIXPREC_CUDA_CHECK(cudaGetDeviceCount(&count));
    MIXPREC_CHECK(count > 0, "nccl_over_mpi: rank ", mpi.rank(), " sees no CUDA device");
    device = mpi.local_rank() % count;
  }
  return std::make_unique<NcclCommunicator>(id, mpi.rank(), mpi.size(), Device::cuda(device), mpi.local_rank(),
                                            mpi.local_size());
}

}  // namespace dist
MIXPREC_NAMESPACE_END
