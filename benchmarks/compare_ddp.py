#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""PyTorch DDP + GradScaler on the Fashion-MNIST MLP: the torch side of the
data-parallel side-by-side with mixprec's example (examples/fashion_mnist_mlp
under mpirun).

The same model and run as the example's defaults: 784-H-H-10 with ReLU
(--hidden, 1024), --batch images PER RANK (256; the global batch is W x
batch), AdamW lr 1e-3 with a per-step cosine decay to 0 over the run
(--schedule constant for none), fp16 autocast with a dynamic loss scaler.
Each epoch every rank shuffles with the same generator and rank r takes
positions r, r + W, r + 2W, ... of the shuffle, as the example does.

PyTorch as people write it: fp32 parameters, torch.autocast, torch.amp.
GradScaler, AdamW(fused=True) on CUDA, DistributedDataParallel with its
defaults (fp32 gradients all-reduced in 25 MiB buckets, overlapped with the
backward; --grad-comm fp16 registers DDP's fp16_compress_hook, 2 bytes a
parameter on the wire as mixprec sends). The data set on the device, no
.item() inside a timed window.

Modes: "eager", and on CUDA "graph": the whole step (forward, backward with
DDP's all-reduce, scaler, fused AdamW) captured in one CUDA graph, as
torch.cuda.graphs documents for DDP: async NCCL error handling off, DDP
built with static_graph=True in a side-stream context, 11 eager warm-up
steps before the capture, capturable fused AdamW with a tensor lr (set
before each replay). If the capture fails, the reason is printed and only
eager is reported.

World: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or Open MPI's
OMPI_COMM_WORLD_* under mpirun (then MASTER_ADDR defaults to 127.0.0.1 and
MASTER_PORT to 29500: one node; set them for several), else one process.
Backend nccl on GPUs (GPU = local rank), gloo on the CPU.

Throughput: global images/s (W x batch x steps / seconds) of each timed
segment, the slowest rank's time (all_reduce MAX), the median over the
segments after the first: epochs 2..N, or with --steps N, windows of
N / --windows steps after --warmup steps. Rank 0 prints a line per mode and
then one JSON line with the configuration and the results.

    torchrun --nproc_per_node 8 benchmarks/compare_ddp.py [--data DIR] [--epochs 10]
    mpirun -np 8 python3 benchmarks/compare_ddp.py ...
    mpirun -np 2 --oversubscribe python3 benchmarks/compare_ddp.py --device cpu --steps 20   # smoke test
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

TRAIN_IMAGES = 60000
GRAPH_WARMUP = 11  # eager DDP steps torch.cuda.graphs asks for before a capture


def world_from_env():
    """(rank, world size, local rank, ranks on this node, launcher)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "torchrun")
    if "OMPI_COMM_WORLD_SIZE" in env:
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)), "mpirun")
    return 0, 1, 0, 1, "single process"


def autocast_works(device, dtype):
    """Whether torch.autocast(device, dtype) really turns on here (torch 1.13 disables fp16 on the CPU, warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device, dtype=dtype):
                try:
                    return bool(torch.is_autocast_enabled(device))
                except TypeError:  # torch < 2.4: no device argument
                    return bool(torch.is_autocast_enabled() if device == "cuda" else torch.is_autocast_cpu_enabled())
        except (RuntimeError, ValueError):
            return False


def choose_precision(requested, device):
    """(precision, autocast dtype or None, note)."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if requested == "fp32":
        return "fp32", None, ""
    if autocast_works(device, dtypes[requested]):
        return requested, dtypes[requested], ""
    note = f"{requested} autocast is not available on {device} in torch {torch.__version__}"
    for fallback in ("bf16", "fp16"):
        if fallback != requested and autocast_works(device, dtypes[fallback]):
            return fallback, dtypes[fallback], note + f"; ran {fallback}"
    return "fp32", None, note + "; ran fp32"


def make_scaler(device, enabled):
    """(GradScaler, its description). Disabled, it passes every call through, so the step's code is the same."""
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3, CUDA and CPU
        return torch.amp.GradScaler(device, enabled=enabled), ("torch.amp.GradScaler" if enabled else "none")
    if device == "cuda":
        return torch.cuda.amp.GradScaler(enabled=enabled), ("torch.cuda.amp.GradScaler" if enabled else "none")
    if enabled:
        raise SystemExit(f"torch {torch.__version__} has no CPU GradScaler; use --precision bf16 or fp32")
    return torch.cuda.amp.GradScaler(enabled=False), "none"


def autocast(device, dtype):
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def load_data(args, device):
    """(train images, train labels, test images or None, test labels or None) on the device."""
    if args.data:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from compare_pytorch_mlp import load  # the same files and normalisation as the single-process comparison
        xtr, ytr = load(args.data, "train")
        xte, yte = load(args.data, "t10k")
        return xtr.to(device), ytr.to(device), xte.to(device), yte.to(device)
    # Synthetic images of the data set's shape, the same on every rank.
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(TRAIN_IMAGES, 784, generator=g)
    y = torch.randint(0, 10, (TRAIN_IMAGES,), generator=g)
    return x.to(device), y.to(device), None, None


def make_model(hidden, seed, device):
    torch.manual_seed(seed)  # the same weights on every rank (DDP broadcasts rank 0's anyway)
    return torch.nn.Sequential(
        torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10)).to(device)


def make_optimizer(params, cuda, graph, lr):
    """(AdamW, description): fused on CUDA; for a capture also capturable, with a tensor lr."""
    kwargs = {}
    if cuda:
        kwargs["fused"] = True
    if graph:
        kwargs["capturable"] = True
        lr = torch.tensor(lr, device="cuda")
    try:
        opt = torch.optim.AdamW(params, lr=lr, **kwargs)
    except (TypeError, RuntimeError) as e:  # a torch without fused AdamW
        if graph:
            raise
        print(f"AdamW({kwargs}) refused ({e}); plain AdamW", file=sys.stderr)
        kwargs = {}
        opt = torch.optim.AdamW(params, lr=lr)
    return opt, "AdamW(" + ", ".join(f"{k}=True" for k in kwargs) + ")"


def shard_batches(ctx, n_images):
    """Yields this rank's indices of every step, epoch after epoch (the example's shard order)."""
    w, b = ctx["world"], ctx["batch"]
    steps = n_images // (w * b)
    epoch = 0
    while True:
        perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(ctx["seed"] * 1000 + epoch))
        shares = perm[:steps * w * b].view(steps, b, w)[:, :, ctx["rank"]].contiguous().to(ctx["device"])
        for s in range(steps):
            yield shares[s]
        epoch += 1


def run_mode(mode, ctx, data):
    """Trains one fresh model in `mode`; returns its results (dict)."""
    device, cuda, dtype = ctx["device"], ctx["device"] == "cuda", ctx["dtype"]
    xtr, ytr, xte, yte = data
    graph = mode == "graph"
    model = make_model(ctx["hidden"], ctx["seed"], device)
    side = torch.cuda.Stream() if graph else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        ddp = DDP(model, device_ids=[ctx["gpu"]] if cuda else None, static_graph=graph)
    if ctx["grad_comm"] == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    opt, opt_name = make_optimizer(ddp.parameters(), cuda, graph, ctx["lr"])
    scaler, _ = make_scaler(device, ctx["precision"] == "fp16")
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = shard_batches(ctx, xtr.shape[0])
    total, done = sum(ctx["segments"]) + (GRAPH_WARMUP if graph else 0), 0  # the cosine's span

    def lr_at(step):
        if ctx["schedule"] == "constant":
            return ctx["lr"]
        return ctx["lr"] * (1 + math.cos(math.pi * min(step, total) / total)) / 2

    def step(x, y, capture=False):
        with autocast(device, dtype):
            loss = loss_fn(ddp(x), y)
        if not capture:
            opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    if graph:
        static_x = torch.empty(ctx["batch"], 784, device=device)
        static_y = torch.empty(ctx["batch"], dtype=torch.long, device=device)
        lr_t = opt.param_groups[0]["lr"]
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                idx = next(batches)
                lr_t.fill_(lr_at(done))
                torch.index_select(xtr, 0, idx, out=static_x)
                torch.index_select(ytr, 0, idx, out=static_y)
                step(static_x, static_y)
                done += 1
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)  # the capture allocates the gradients in its pool; replays rewrite them
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_loss = step(static_x, static_y, capture=True)

        def one_step():
            nonlocal done
            idx = next(batches)
            lr_t.fill_(lr_at(done))
            torch.index_select(xtr, 0, idx, out=static_x)
            torch.index_select(ytr, 0, idx, out=static_y)
            g.replay()
            done += 1
            return static_loss
    else:
        def one_step():
            nonlocal done
            idx = next(batches)
            for group in opt.param_groups:
                group["lr"] = lr_at(done)  # a float: no kernel
            loss = step(xtr[idx], ytr[idx])
            done += 1
            return loss

    times, losses = [], []
    for steps in ctx["segments"]:
        loss_sum = torch.zeros((), device=device)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            loss_sum += one_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss_sum.item() / steps)
    slowest = torch.tensor(times, dtype=torch.float64, device=ctx["comm_device"])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    images = ctx["world"] * ctx["batch"]
    rates = [images * n / t for n, t in zip(ctx["segments"], slowest.tolist())]
    kept = rates[1:] if len(rates) > 1 else rates
    result = {"images_per_s": statistics.median(kept), "segment_images_per_s": [round(r, 1) for r in rates],
              "loss_last_segment_rank0": losses[-1], "optimizer": opt_name,
              "ddp": {"static_graph": graph, "grad_comm": ctx["grad_comm"], "bucket_cap_mb": 25}}
    if ctx["precision"] == "fp16":
        result["scale"] = float(scaler.get_scale())
    if xte is not None:
        with torch.no_grad(), autocast(device, dtype):
            correct = sum(int((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum())
                          for i in range(0, xte.shape[0], 1000))
        result["test_accuracy"] = correct / xte.shape[0]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="autocast type (fp16: with the GradScaler); where the device's autocast lacks it, "
                        "bf16, else fp32, is run and the JSON says so")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256, help="per rank")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, help="time this many steps in --windows windows instead of epochs")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the windows (with --steps)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="Fashion-MNIST's .gz files (default: synthetic data of that shape)")
    p.add_argument("--modes", default="eager,graph", help="eager, graph (CUDA only)")
    p.add_argument("--grad-comm", default="fp32", choices=["fp32", "fp16"],
                   help="fp16: DDP's fp16_compress_hook (2 bytes a parameter on the wire)")
    p.add_argument("--threads", type=int, help="CPU threads per rank (default: cores / ranks on the node)")
    p.add_argument("--json-out", help="also write rank 0's JSON line to this file")
    a = p.parse_args()

    rank, world, local_rank, local_size, launcher = world_from_env()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    modes = [m for m in a.modes.split(",") if m]
    skipped = {}
    if "graph" in modes and not cuda:
        modes.remove("graph")
        skipped["graph"] = "CUDA graphs need --device cuda"
    if cuda:
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        if "graph" in modes:
            # torch.cuda.graphs: DDP's capture needs NCCL's async error handling off, set before the
            # group (torchrun sets it to 1; the JSON records the value used).
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
            os.environ["NCCL_ASYNC_ERROR_HANDLING"] = "0"
    else:
        gpu = None
        torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // local_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)

    precision, dtype, note = choose_precision(a.precision, device)
    _, scaler_name = make_scaler(device, precision == "fp16")
    steps_per_epoch = TRAIN_IMAGES // (world * a.batch)
    if steps_per_epoch < 1:
        raise SystemExit(f"--batch {a.batch} x {world} ranks is more than {TRAIN_IMAGES} images")
    if a.steps:
        window = max(1, a.steps // a.windows)
        segments = [a.warmup] * (a.warmup > 0) + [window] * (a.steps // window)
        timing = f"median of {a.steps // window} windows of {window} steps after {a.warmup} warm-up steps"
    else:
        segments = [steps_per_epoch] * a.epochs
        timing = f"median of epochs 2..{a.epochs}" if a.epochs > 1 else "one epoch"
    ctx = {"rank": rank, "world": world, "device": device, "gpu": gpu, "batch": a.batch, "hidden": a.hidden,
           "seed": a.seed, "lr": a.lr, "schedule": a.schedule, "precision": precision, "dtype": dtype,
           "grad_comm": a.grad_comm, "segments": segments,
           "comm_device": torch.device("cuda", gpu) if cuda else torch.device("cpu")}
    data = load_data(a, device)

    say = print if rank == 0 else (lambda *args, **kwargs: None)
    where = torch.cuda.get_device_name(gpu) if cuda else f"cpu, {torch.get_num_threads()} thread(s) a rank"
    say(f"compare_ddp: world size {world} ({backend}, {launcher}), torch {torch.__version__}, {where}; "
        f"784-{a.hidden}-{a.hidden}-10, batch {a.batch} per rank, {precision}"
        f"{' autocast' if dtype is not None else ''}, scaler {scaler_name}; {timing}", flush=True)
    if note:
        say(f"note: {note}", flush=True)
    results = {}
    for mode in modes:
        try:
            results[mode] = run_mode(mode, ctx, data)
        except Exception as e:  # a capture DDP or this torch does not allow: say why, keep the others
            if mode != "graph":
                raise
            skipped[mode] = f"{type(e).__name__}: {e}".strip()
            say(f"graph: capture failed, eager only: {skipped[mode]}", flush=True)
            if cuda:
                torch.cuda.synchronize()
            continue
        r = results[mode]
        say(f"{mode}: {r['images_per_s']:,.0f} images/s (global; segments "
            f"{', '.join(f'{v:,.0f}' for v in r['segment_images_per_s'])}), loss {r['loss_last_segment_rank0']:.4f}"
            + (f", scale {r['scale']:g}" if "scale" in r else "")
            + (f", test accuracy {r['test_accuracy']:.4f}" if "test_accuracy" in r else ""), flush=True)

    if rank == 0:
        line = json.dumps({
            "benchmark": "compare_ddp", "framework": "pytorch", "torch": torch.__version__,
            "launcher": launcher, "backend": backend, "world_size": world, "device": device,
            "device_name": where, "model": f"784-{a.hidden}-{a.hidden}-10", "hidden": a.hidden,
            "batch_per_rank": a.batch, "global_batch": world * a.batch, "precision": precision,
            "precision_requested": a.precision, "scaler": scaler_name, "lr": a.lr, "schedule": a.schedule,
            "seed": a.seed, "data": a.data or "synthetic", "timing": timing, "segments": segments,
            "nccl_async_error_handling": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") if cuda else None,
            "note": note or None, "results": results, "skipped": skipped})
        print(line, flush=True)
        if a.json_out:
            with open(a.json_out, "w") as f:
                f.write(line + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
