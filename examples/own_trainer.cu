// SPDX-License-Identifier: Apache-2.0
// The smallest program for a user who keeps their own model code: their own
// buffers (raw pointers from cudaMalloc, or host vectors), their own
// forward and backward (the kernels below), and mixprec only for what AMP
// does: fp32 master weights, AdamW, and dynamic loss scaling. The model is
// a linear regression y = W x + b in fp16, fitted to targets made by a known
// W*, b*; the program exits 1 unless it recovers them.
//
// On the GPU when one is usable, else the same steps on the CPU:
//   own_trainer [--device cpu|cuda]        (--help; --device=cpu works too)
//
// Data parallel on CPU ranks (built with MPI): each rank fits its share of
// the samples, and the trainer adds three calls (marked "data parallel"):
// a communicator, a GradientReducer over the optimizer's gradients with the
// scaler's divisor, and reduce() after the backward (docs/distributed.md):
//   mpirun -np 2 own_trainer --device cpu
//
// In your own CMake project (mixprec installed, or add_subdirectory):
//   find_package(mixprec REQUIRED)
//   add_executable(trainer trainer.cu)
//   target_link_libraries(trainer PRIVATE mixprec::cuda)   # mixprec::mixprec for CPU only
// One .cu file of the program includes <mixprec/cuda/backend.cuh> (here:
// this one), which links mixprec's kernels into it.
#include <mixprec/cuda/backend.cuh>
#include <mixprec/dist/reducer.hpp>
#include <mixprec/mixprec.hpp>
#if MIXPREC_EXAMPLES_WITH_MPI
#include <mixprec/dist/mpi.hpp>
#endif

#include "common/cli.hpp"  // CLI11, for the one flag

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using fp16 = mixprec::half;  // CUDA's headers define a global `half` too

constexpr int kIn = 64, kOut = 16, kBatch = 512, kSteps = 300;

// --- the user's own code: data, forward and backward ----------------------

// r[n, o] = (W x_n + b)[o] - t[n, o], then the loss-scaled gradients of
// mean((W x + b - t)^2): g = scale * 2 / (N * O) * r, dW = g^T x, db = sum g.
__global__ void residual_kernel(const fp16* w, const fp16* b, const float* x, const float* t, float* r) {
  const int n = blockIdx.x, o = threadIdx.x;
  float y = mixprec::to_float(b[o]);
  for (int i = 0; i < kIn; ++i) y += mixprec::to_float(w[o * kIn + i]) * x[n * kIn + i];
  r[n * kOut + o] = y - t[n * kOut + o];
}
__global__ void gradient_kernel(const float* x, const float* r, const float* scale, fp16* gw, fp16* gb) {
  const int o = blockIdx.x, i = threadIdx.x;  // i == kIn: the bias
  const float g = *scale * 2.0f / (kBatch * kOut);
  float s = 0;
  for (int n = 0; n < kBatch; ++n) s += r[n * kOut + o] * (i < kIn ? x[n * kIn + i] : 1.0f);
  if (i < kIn) {
    gw[o * kIn + i] = mixprec::from_float<fp16>(g * s);
  } else {
    gb[o] = mixprec::from_float<fp16>(g * s);
  }
}

// The CPU versions, over the samples [first, first + count) (a rank's share).
void residual_host(const fp16* w, const fp16* b, const float* x, const float* t, float* r, int first, int count) {
  for (int n = first; n < first + count; ++n) {
    for (int o = 0; o < kOut; ++o) {
      float y = mixprec::to_float(b[o]);
      for (int i = 0; i < kIn; ++i) y += mixprec::to_float(w[o * kIn + i]) * x[n * kIn + i];
      r[n * kOut + o] = y - t[n * kOut + o];
    }
  }
}
void gradient_host(const float* x, const float* r, float scale, fp16* gw, fp16* gb, int first, int count) {
  const float g = scale * 2.0f / (count * kOut);
  for (int o = 0; o < kOut; ++o) {
    for (int i = 0; i <= kIn; ++i) {
      float s = 0;
      for (int n = first; n < first + count; ++n) s += r[n * kOut + o] * (i < kIn ? x[n * kIn + i] : 1.0f);
      (i < kIn ? gw[o * kIn + i] : gb[o]) = mixprec::from_float<fp16>(g * s);
    }
  }
}

#define CHECK(call)                                                                       \
  do {                                                                                    \
    const cudaError_t s_ = (call);                                                        \
    if (s_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "own_trainer: %s: %s\n", #call, cudaGetErrorString(s_));      \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

}  // namespace

int main(int argc, char** argv) {
  namespace mp = mixprec;
  std::string device;
  CLI::App app("own_trainer: a linear regression in fp16, the user's own kernels, mixprec's AdamW and scaler",
               "own_trainer");
  app.add_option("--device", device, "where to train")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->default_str("cuda when usable, else cpu");
  if (const int rc = mixprec::examples::parse_flags(app, argc, argv); rc >= 0) return rc;  // --help: 0, bad: 2
  const bool gpu = device.empty() ? mp::cuda_available() : device == "cuda";
  // The data: x ~ N(0, 1), t = W* x + b*.
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(kBatch * kIn), t(kBatch * kOut), w_true(kOut * kIn), b_true(kOut);
  for (float& v : x) v = normal(rng);
  for (float& v : w_true) v = 0.3f * normal(rng);
  for (float& v : b_true) v = normal(rng);
  for (int n = 0; n < kBatch; ++n) {
    for (int o = 0; o < kOut; ++o) {
      float y = b_true[o];
      for (int i = 0; i < kIn; ++i) y += w_true[o * kIn + i] * x[n * kIn + i];
      t[n * kOut + o] = y;
    }
  }
  std::vector<fp16> w(kOut * kIn, mp::from_float<fp16>(0.0f)), b(kOut, mp::from_float<fp16>(0.0f));

  // The user's buffers: fp16 weights and gradients, fp32 data. On the GPU,
  // plain cudaMalloc; on the CPU, the vectors themselves.
  const mp::Device dev = gpu ? mp::Device::cuda(0) : mp::Device::cpu();
  fp16 *dw = w.data(), *db = b.data(), *dgw = nullptr, *dgb = nullptr;
  float *dx = x.data(), *dt = t.data(), *dr = nullptr;
  std::vector<fp16> gw(kOut * kIn), gb(kOut);
  std::vector<float> r(kBatch * kOut);
  if (gpu) {
    CHECK(cudaMalloc(&dw, w.size() * sizeof(fp16)));
    CHECK(cudaMalloc(&db, b.size() * sizeof(fp16)));
    CHECK(cudaMalloc(&dgw, gw.size() * sizeof(fp16)));
    CHECK(cudaMalloc(&dgb, gb.size() * sizeof(fp16)));
    CHECK(cudaMalloc(&dx, x.size() * sizeof(float)));
    CHECK(cudaMalloc(&dt, t.size() * sizeof(float)));
    CHECK(cudaMalloc(&dr, r.size() * sizeof(float)));
    CHECK(cudaMemcpy(dw, w.data(), w.size() * sizeof(fp16), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(db, b.data(), b.size() * sizeof(fp16), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dx, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dt, t.data(), t.size() * sizeof(float), cudaMemcpyHostToDevice));
  } else {
    dgw = gw.data();
    dgb = gb.data();
    dr = r.data();
  }

  try {
    // --- mixprec: views over the user's memory, AdamW with fp32 masters, and
    // a dynamic loss scaler. The optimizer writes the updated fp16 weights
    // back into dw and db after every applied step.
    std::vector<mp::optim::Param> params = {
        {"w", mp::TensorView<fp16>(dw, {kOut, kIn}, dev), mp::TensorView<fp16>(dgw, {kOut, kIn}, dev)},
        {"b", mp::TensorView<fp16>(db, {kOut}, dev), mp::TensorView<fp16>(dgb, {kOut}, dev)}};
    mp::optim::AdamWOptions o;
    o.lr = 5e-2;
    o.weight_decay = 0;
    mp::optim::AdamW opt(params, o);
    opt.set_schedule(mp::optim::LRSchedule::cosine(kSteps, 0.01));

    if (gpu) {
      mp::amp::DeviceGradScaler scaler;  // scale, counters and decisions stay on the device
      for (int step = 0; step < kSteps; ++step) {
        residual_kernel<<<kBatch, kOut>>>(dw, db, dx, dt, dr);
        gradient_kernel<<<kOut, kIn + 1>>>(dx, dr, scaler.scale_data(), dgw, dgb);
        scaler.step(opt);  // unscale + inf check + AdamW; a step with an inf/NaN gradient changes nothing
        scaler.update();
      }
      CHECK(cudaMemcpy(w.data(), dw, w.size() * sizeof(fp16), cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(b.data(), db, b.size() * sizeof(fp16), cudaMemcpyDeviceToHost));
      std::printf("own_trainer on %s: %lld steps applied, %lld skipped, final scale %g\n", dev.str().c_str(),
                  static_cast<long long>(scaler.applied_steps()), static_cast<long long>(scaler.skipped_steps()),
                  scaler.scale());
    } else {
      mp::amp::GradScaler scaler;
      // Data parallel (1 of 3): the ranks of this run (one without mpirun).
#if MIXPREC_EXAMPLES_WITH_MPI
      const bool under_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE");
      std::unique_ptr<mp::dist::Communicator> comm;
      if (under_mpirun) {
        comm = std::make_unique<mp::dist::MpiCommunicator>();
      } else {
        comm = std::make_unique<mp::dist::LocalCommunicator>();
      }
#else
      auto comm = std::make_unique<mp::dist::LocalCommunicator>();
#endif
      // Data parallel (2 of 3): the gradients are summed over the ranks; the
      // scaler divides by their number in the unscale.
      mp::dist::GradientReducer reducer(*comm, opt);
      scaler.set_grad_divisor(comm->size());
      const int count = kBatch / comm->size(), first = comm->rank() * count;
      for (int step = 0; step < kSteps; ++step) {
        residual_host(dw, db, dx, dt, dr, first, count);
        gradient_host(dx, dr, scaler.scale(), dgw, dgb, first, count);
        reducer.reduce();  // data parallel (3 of 3)
        scaler.step(opt);
        scaler.update();
      }
      if (comm->rank() == 0) {
        std::printf("own_trainer on cpu (%d rank%s): %lld steps applied, %lld skipped, final scale %g\n",
                    comm->size(), comm->size() == 1 ? "" : "s", static_cast<long long>(scaler.applied_steps()),
                    static_cast<long long>(scaler.skipped_steps()), scaler.scale());
      }
    }
  } catch (const mp::Error& e) {
    std::fprintf(stderr, "own_trainer: %s\n", e.what());
    return 1;
  }
  if (gpu) {
    for (void* p : {static_cast<void*>(dw), static_cast<void*>(db), static_cast<void*>(dgw),
                    static_cast<void*>(dgb), static_cast<void*>(dx), static_cast<void*>(dt),
                    static_cast<void*>(dr)}) {
      CHECK(cudaFree(p));
    }
  }
  // W and b must be W* and b* to fp16 precision.
  float worst = 0;
  for (int k = 0; k < kOut * kIn; ++k) worst = std::fmax(worst, std::fabs(mp::to_float(w[k]) - w_true[k]));
  for (int k = 0; k < kOut; ++k) worst = std::fmax(worst, std::fabs(mp::to_float(b[k]) - b_true[k]));
  std::printf("largest |W - W*|, |b - b*|: %.5f\n", worst);
  if (!(worst < 5e-3f)) {
    std::fprintf(stderr, "own_trainer: did not recover W* and b* (largest error %.5f >= 0.005)\n", worst);
    return 1;
  }
  return 0;
}
