// SPDX-License-Identifier: Apache-2.0
// Fashion-MNIST with an MLP (784-hidden-hidden-10, ReLU), trained in fp16,
// bf16 or fp32 with fp32 master weights and a loss scaler: GradScaler on
// the CPU, DeviceGradScaler on the GPU. Plain C++; in a CUDA build the
// kernels come from mixprec_kernels.cu, one line long. The training loop is
// common/classifier.hpp (shared with fashion_mnist_cnn).
//
//   fashion_mnist_mlp [--precision fp16|bf16|fp32] [--device cpu|cuda] [--epochs N]
//                     [--batch N] [--optimizer sgd|adam|adamw|rmsprop|lion|lamb] [--lr X]
//                     [--schedule constant|cosine] [--hidden N] [--seed N] [--data DIR]
//                     [--graph on|off] [--min-accuracy X]
//                     [--monitor on|off] [--monitor-every K] [--monitor-log FILE.jsonl]
//                     [--zero1 on|off] [--report FILE.html]
//                     [--precision-fallback off|suggest|act] [--spike-guard on|off]
//                     [--checkpoint PATH] [--checkpoint-every N] [--resume PATH] [--stop-at-step N]
//
// --help lists every flag with its default; a flag's value follows it or an
// "=" (--epochs 3, --epochs=3); a bad value exits 2 naming the choices or
// the range. Defaults: fp16, cuda when a device is usable (else cpu), 10
// epochs, batch 256, AdamW lr 1e-3 with a cosine decay over the run (torch's
// CosineAnnealingLR to 0, per step), hidden 1024, seed 0, data from
// $MIXPREC_FASHION_MNIST or else the Debian package's
// /usr/share/datasets/fashion-mnist, graph on, the instability monitor on
// (docs/monitor.md) with a logged step every 10 steps and no log file. With
// --min-accuracy the program exits 1 when the final test accuracy is below
// it. --report writes the monitor's HTML page at the end (its log beside
// it, FILE.jsonl, unless --monitor-log names one). Started by mpirun, it
// trains data-parallel on CPU ranks (docs/distributed.md); --zero1 on then
// shards the masters and moments over the ranks (ZeRO-1).
// --spike-guard on skips steps whose loss or gradient norm is a z-score
// outlier (docs/grad-scaler.md#spike-guard; under mpirun the norm only),
// counted apart from the overflow skips of each epoch's line.
// --precision-fallback act moves a layer the monitor finds overflowing (or
// underflowing) fp16 to fp32 while training goes on, on the CPU or the GPU
// (there the move drops the captured CUDA graphs; the next step runs
// eagerly and the one after is captured again); suggest only says so
// (docs/monitor.md#acting-per-layer-precision-fallback).
//
// Checkpoints (docs/checkpoints.md): --checkpoint saves the whole training
// state, the data position and the shuffling RNG at the end, and every N
// steps with --checkpoint-every; --resume loads such a file and goes on
// where it stopped, to the bits of the uninterrupted run; --stop-at-step
// ends a run early (saving), to be resumed by a later job:
//   fashion_mnist_mlp --epochs 10 --checkpoint run.safetensors --stop-at-step 1000
//   fashion_mnist_mlp --epochs 10 --checkpoint run.safetensors --resume run.safetensors
#include <string>

#include "classifier.hpp"

namespace {

using namespace mixprec;

template <class T>
struct Mlp {
  static void add(nn::Sequential<T>& net, const examples::Args& a, Device dev) {
    net.template emplace<nn::Linear<T>>(784, a.hidden, nn::Activation::relu, true, dev, a.seed * 3 + 1);
    net.template emplace<nn::Linear<T>>(a.hidden, a.hidden, nn::Activation::relu, true, dev, a.seed * 3 + 2);
    net.template emplace<nn::Linear<T>>(a.hidden, 10, nn::Activation::none, true, dev, a.seed * 3 + 3);
  }
};

}  // namespace

int main(int argc, char** argv) {
  examples::Args a;
  a.program = "fashion_mnist_mlp";
  a.description = "an MLP (784-hidden-hidden-10, ReLU) on Fashion-MNIST";
  if (const int rc = examples::parse(argc, argv, a, /*takes_hidden=*/true); rc >= 0) return rc;
  const std::string h = std::to_string(a.hidden);
  a.description = "784-" + h + "-" + h + "-10";
  return examples::train_classifier<Mlp>(a, {784});
}
