#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Fashion-MNIST's MLP and CNN trained by PyTorch and by mixprec's examples, same runs.

Models: the MLP 784-H-H-10 (ReLU) of examples/fashion_mnist_mlp, and the CNN
of examples/fashion_mnist_cnn: [1, 28, 28] -> Conv 3x3 32 (padding 1) -> ReLU
-> MaxPool 2 -> Conv 3x3 64 (padding 1) -> ReLU -> MaxPool 2 -> Flatten 3136
-> Linear 128 + ReLU -> Linear 10. AdamW (torch's defaults but lr: the
example's, 1e-3 for the MLP, 2e-3 for the CNN) with the same schedule
(cosine to 0 per step by default, as the examples; --schedule constant),
batch B, the same number of epochs, the same normalisation; each side
shuffles with its own generator.

PyTorch, without input-pipeline overhead: the data sets on the device, a
shuffled permutation per epoch, fp32 parameters, AdamW(fused=True), and
either fp16 autocast + torch.amp.GradScaler or bf16 autocast (no scaler);
the loss is summed on the device (no .item() inside an epoch);
cudnn.benchmark on. Three modes:
  eager    AMP as people write it (a float lr set per step);
  graphed  the whole training step (the batch gathered from a static slice
           of the epoch's permutation by a device step counter, the lr of the
           cosine schedule computed on the device into a tensor lr, forward
           under autocast, loss, backward, scaler.step + scaler.update)
           captured in one torch.cuda.CUDAGraph after warm-up steps on a side
           stream, with AdamW(fused=True, capturable=True): an epoch is one
           host copy of the permutation and then replays only;
  compiled torch.compile(mode="max-autotune") of model + loss, the rest eager
           (only with --compile; "compile: unavailable (reason)" when it fails).
mixprec: examples/fashion_mnist_mlp and examples/fashion_mnist_cnn at their
defaults (data on the device, the step in a CUDA graph, the monitor on);
mixprec with --graph off is the eager counterpart (docs/performance.md).
Throughput: images/s of the training steps only (evaluation excluded), the
median over epochs 2..N (epoch 1 holds warm-up and graph capture); accuracy:
the test set after the last epoch.

    python3 benchmarks/compare_pytorch_mlp.py --example build/examples/fashion_mnist_mlp \
        [--cnn-example build/examples/fashion_mnist_cnn] [--models mlp,cnn] [--data DIR] [--epochs 10] \
        [--configs 1024:256,4096:1024] [--cnn-configs 256] [--precisions fp16,bf16] [--compile] [--modes graphed]
    python3 benchmarks/compare_pytorch_mlp.py --device cpu ...   # one core each, eager only, see --cpu-*
"""
import argparse
import contextlib
import gzip
import math
import os
import shlex
import statistics
import subprocess
import time

import numpy as np
import torch

from epoch_lines import parse_epoch_lines

# The examples' default learning rates (examples/fashion_mnist_*.cpp).
LR = {"mlp": 1e-3, "cnn": 2e-3}


def load(data, split):
    with gzip.open(os.path.join(data, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(os.path.join(data, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (images.astype(np.float32) / 255.0 - 0.2860) / 0.3530
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def autocast(device, dtype, cache=True):
    # A captured step needs cache_enabled=False (torch.cuda.graph's docs):
    # the cast weights would be cached from the capture's memory pool.
    return (torch.autocast(device, dtype=dtype, cache_enabled=cache) if dtype is not None
            else contextlib.nullcontext())


def make_model(model, hidden):
    nn = torch.nn
    if model == "mlp":
        return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))
    # examples/fashion_mnist_cnn.cpp: Conv2d(in, out, kernel 3, stride 1,
    # padding 1, bias), MaxPool2d(2) (stride 2, no padding), NCHW flattened.
    return nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))


def cosine_lr(base, done, total):  # CosineAnnealingLR(T_max=total, eta_min=0), per step
    return base * (1 + math.cos(math.pi * done / total)) / 2


def torch_run(data, device, precision, model_name, hidden, batch, epochs, seed, schedule, mode):
    """Trains one model with PyTorch in `mode` (eager, graphed or compiled);
    returns (images/s per epoch, test accuracy)."""
    torch.manual_seed(seed)
    shape = (-1, 784) if model_name == "mlp" else (-1, 1, 28, 28)
    xtr, ytr = (t.to(device) for t in load(data, "train"))
    xte, yte = (t.to(device) for t in load(data, "t10k"))
    xtr, xte = xtr.view(shape), xte.view(shape)
    model = make_model(model_name, hidden).to(device)
    cuda = device == "cuda"
    base_lr = LR[model_name]
    graphed = mode == "graphed"
    # fused=True on the GPU (PyTorch's fastest AdamW); Debian's older CPU
    # torch has no such argument and no CPU GradScaler (nor needs one).
    # Graphed: capturable, and the lr a float32 device tensor that the
    # captured step rewrites (the fused kernel reads it from the device).
    if graphed:
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(base_lr, dtype=torch.float32, device=device),
                                fused=True, capturable=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=base_lr, **({"fused": True} if cuda else {}))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device) if cuda and precision == "fp16" else None
    loss_fn = torch.nn.CrossEntropyLoss()
    forward = lambda x, y: loss_fn(model(x), y)  # noqa: E731
    if mode == "compiled":
        forward = torch.compile(forward, mode="max-autotune")
    n = xtr.shape[0]
    steps = n // batch
    total = epochs * steps
    rates = []
    if graphed:
        rates = graphed_epochs(model, forward, opt, scaler, dtype, xtr, ytr, batch, epochs, steps, base_lr,
                               schedule)
    else:
        done = 0
        for _ in range(epochs):
            perm = torch.randperm(n, device=device)
            loss_sum = torch.zeros((), device=device)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for s in range(steps):
                if schedule == "cosine":  # a float: no kernel
                    opt.param_groups[0]["lr"] = cosine_lr(base_lr, done, total)
                idx = perm[s * batch:(s + 1) * batch]
                with autocast(device, dtype):
                    loss = forward(xtr[idx], ytr[idx])
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                loss_sum += loss.detach()
                done += 1
            if cuda:
                torch.cuda.synchronize()
            rates.append(steps * batch / (time.perf_counter() - start))
    with torch.no_grad(), autocast(device, dtype):
        correct = sum(int((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum()) for i in range(0, 10000, 1000))
    return rates, correct / 10000


def graphed_epochs(model, forward, opt, scaler, dtype, xtr, ytr, batch, epochs, steps, base_lr, schedule,
                   warmup=3):
    """The whole step in one CUDA graph. Device state the step reads and
    advances: `order` (the epoch's permutation as [steps, batch]), `pos`
    (the step within the epoch), `done` (steps of the run, float64, for the
    lr) and the optimizer's tensor lr. The first `warmup` steps of the run
    are executed eagerly on a side stream (the same function, so they
    advance the same counters and train like any other step); capture runs
    nothing, then every further step is a replay. Gradients are set to None
    before the capture, so the captured backward writes them afresh in the
    graph's pool each replay (torch.cuda.graph's whole-network example)."""
    device = xtr.device
    n = xtr.shape[0]
    total = epochs * steps
    order = torch.empty(steps, batch, dtype=torch.int64, device=device)
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    done = torch.zeros((), dtype=torch.float64, device=device)
    lr = opt.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.is_cuda, "AdamW kept a tensor lr on the device"
    loss_sum = torch.zeros((), device=device)

    def step():
        idx = order.index_select(0, pos).view(-1)
        pos.add_(1)
        if schedule == "cosine":
            lr.copy_(base_lr * (1 + torch.cos(done * (math.pi / total))) / 2)
            done.add_(1)
        with autocast("cuda", dtype, cache=False):
            loss = forward(xtr.index_select(0, idx), ytr.index_select(0, idx))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)  # fused + capturable: unscale and skip in the kernel, no sync
            scaler.update()
        else:
            loss.backward()
            opt.step()
        loss_sum.add_(loss.detach())

    graph = None
    rates = []
    for _ in range(epochs):
        order.copy_(torch.randperm(n, device=device)[:steps * batch].view(steps, batch))
        pos.zero_()
        loss_sum.zero_()
        torch.cuda.synchronize()
        start = time.perf_counter()
        s = 0
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for s in range(1, min(warmup, steps) + 1):
                    opt.zero_grad(set_to_none=True)
                    step()
            torch.cuda.current_stream().wait_stream(side)
            if s < steps:
                opt.zero_grad(set_to_none=True)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
        for _ in range(steps - s):
            graph.replay()
        torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates


def mixprec_run(example, data, device, precision, hidden, batch, epochs, seed, schedule, lr, prefix, extra):
    cmd = prefix + [example, "--device", device, "--precision", precision]
    if hidden is not None:
        cmd += ["--hidden", str(hidden)]
    cmd += ["--batch", str(batch), "--epochs", str(epochs), "--seed", str(seed), "--schedule", schedule, "--lr",
            repr(lr), "--data", data] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    lines = parse_epoch_lines(out)
    if len(lines) != epochs:
        raise SystemExit(f"could not read {epochs} epoch lines from: {' '.join(cmd)}\n{out}")
    return [e.images_per_s for e in lines], lines[-1].accuracy


def typical(rates):
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="mlp,cnn", help="mlp, cnn or both")
    p.add_argument("--example", default="build/examples/fashion_mnist_mlp")
    p.add_argument("--cnn-example", help="default: fashion_mnist_cnn beside --example")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--configs", default="1024:256,4096:1024", help="the MLP's hidden:batch,...")
    p.add_argument("--cnn-configs", default="256", help="the CNN's batch,...")
    p.add_argument("--precisions", help="default: fp16,bf16 on cuda, fp32,bf16 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--compile", action="store_true", help="also torch.compile(mode='max-autotune'), eager step")
    p.add_argument("--modes", help="PyTorch modes to run: eager, graphed, compiled (default: eager and, on cuda, "
                   "graphed; compiled with --compile)")
    p.add_argument("--mixprec-args", default="", help="more flags for both examples, e.g. '--monitor off'")
    p.add_argument("--cpu-core", type=int, default=0, help="--device cpu: the core both sides run on")
    a = p.parse_args()
    a.precisions = a.precisions or ("fp16,bf16" if a.device == "cuda" else "fp32,bf16")
    a.cnn_example = a.cnn_example or os.path.join(os.path.dirname(a.example), "fashion_mnist_cnn")
    models = a.models.split(",")
    if not models or any(m not in LR for m in models):
        p.error(f"--models {a.models}: a list of mlp, cnn")
    cuda = a.device == "cuda"
    prefix = []
    if not cuda:
        torch.set_num_threads(1)
        os.sched_setaffinity(0, {a.cpu_core})
        prefix = ["taskset", "-c", str(a.cpu_core)]
    else:
        torch.backends.cudnn.benchmark = True
    where = (f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}"
             if cuda else "CPU, one core")
    print(f"torch {torch.__version__}, {where}; {a.epochs} epochs, AdamW lr {LR['mlp']:g} (MLP) / {LR['cnn']:g} "
          f"(CNN) {a.schedule}")
    modes = ["eager"] + (["graphed"] if cuda else []) + (["compiled"] if a.compile else [])
    if a.modes:
        modes = a.modes.split(",")
        if not modes or any(m not in ("eager", "graphed", "compiled") for m in modes) or (
                "graphed" in modes and not cuda):
            p.error(f"--modes {a.modes}: a list of eager, graphed (cuda only), compiled")
    runs = []  # (model, label, hidden, batch, example)
    for model in models:
        if model == "mlp":
            for config in a.configs.split(","):
                hidden, batch = (int(v) for v in config.split(":"))
                runs.append((model, f"MLP {hidden}, batch {batch}", hidden, batch, a.example))
        else:
            for batch in a.cnn_configs.split(","):
                runs.append((model, f"CNN, batch {int(batch)}", None, int(batch), a.cnn_example))
    rows = []
    for model, label, hidden, batch, example in runs:
        for precision in a.precisions.split(","):
            typ, acc = {}, {}
            for mode in modes:
                try:
                    rates, acc[mode] = torch_run(a.data, a.device, precision, model, hidden or 0, batch, a.epochs,
                                                 a.seed, a.schedule, mode)
                    typ[mode] = typical(rates)
                except Exception as e:  # noqa: BLE001 (compile: whatever the machine lacks)
                    if mode != "compiled":
                        raise
                    print(f"  compile: unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          flush=True)
                finally:
                    if mode == "compiled" and hasattr(torch, "_dynamo"):
                        torch._dynamo.reset()  # each model and precision compiles afresh
            m_rates, m_acc = mixprec_run(example, a.data, a.device, precision, hidden, batch, a.epochs, a.seed,
                                         a.schedule, LR[model], prefix, shlex.split(a.mixprec_args))
            rows.append((label, precision, typ, acc, typical(m_rates), m_acc))
            # Each row as it is measured: a run cut short keeps what it measured.
            print(f"  done: {label} {precision}: " + ", ".join(f"PyTorch {m} {typ[m]:,.0f}" for m in typ) +
                  f", mixprec {typical(m_rates):,.0f} images/s", flush=True)

    def rate(typ, mode):
        return f"{typ[mode]:,.0f}" if mode in typ else "–"

    def ratio(m, typ, mode):
        return f"{m / typ[mode]:.2f}x" if mode in typ else "–"

    def accs(acc, m_acc):
        return " / ".join(f"{acc[mode]:.4f}" if mode in acc else "–" for mode in modes) + f" / {m_acc:.4f}"

    label = "PyTorch AMP" if cuda else "PyTorch"
    extra = [mode for mode in modes if mode == "compiled"]  # a column only when it ran
    head = [f"{label} eager img/s", f"{label} graphed img/s"] + [f"{label} compiled img/s" for _ in extra]
    head += ["mixprec img/s", "vs eager", "vs graphed"] + ["vs compiled" for _ in extra]
    head += [f"accuracy ({', '.join(modes)}, mixprec)"]
    print(f"\n| model / config | precision | {' | '.join(head)} |")
    print("|---|---|" + "---:|" * len(head))
    for lbl, pr, typ, acc, m, m_acc in rows:
        cells = [rate(typ, "eager"), rate(typ, "graphed")] + [rate(typ, x) for x in extra]
        cells += [f"{m:,.0f}", ratio(m, typ, "eager"), ratio(m, typ, "graphed")] + [ratio(m, typ, x) for x in extra]
        cells += [accs(acc, m_acc)]
        print(f"| {lbl} | {pr} | {' | '.join(cells)} |")
    print("\nvs: mixprec images/s over PyTorch's (> 1: mixprec faster).")


if __name__ == "__main__":
    main()
