#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Reference trajectories from PyTorch's own optimizers, for optim_oracle_test.

Every case: a few parameters (fp16, bf16 or fp32 model weights, fp32 masters),
seeded random gradients stored in the model dtype after multiplying by the
loss scale, non-finite values injected at some steps, and >= 50 steps of
torch.optim on the fp32 masters. The loss-scaling logic around the optimizer
follows torch.amp.GradScaler (unscale by a float32 inverse scale, skip the
step when any stored gradient is not finite, grow/back off); torch 1.13's
GradScaler itself needs CUDA, so it is written out here, and the scale
sequence is checked against the real GradScaler separately
(make_scaler_fixture.py).

Writes <out>/<case>.txt (configuration and an index of arrays) and
<out>/<case>.bin (the arrays, little-endian). Runs with torch 1.13 (Debian)
and torch 2.x.

    python3 make_trajectories.py OUT_DIR
"""
import math
import os
import sys

import numpy as np
import torch

STEPS = 60
SHAPES = {"p0": (7, 5), "p1": (5,), "p2": (3, 700), "p3": (0,)}
SIGMA = {"p0": 1e-2, "p1": 2.0, "p2": 1e-3, "p3": 1.0}  # p1 overflows fp16 at scale 2^15
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Non-finite values injected into the stored gradients: (step, param, where, value).
INJECT = [(5, "p0", "first", math.inf), (17, "p2", "middle", math.nan), (33, "p2", "last", -math.inf)]

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 1e-2}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
}

# One entry per option of each optimizer, set away from its default.
VARIANTS = {
    "sgd": [{}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.3},
            {"momentum": 0.9, "nesterov": True}, {"weight_decay": 0.1, "momentum": 0.5},
            {"maximize": True, "momentum": 0.9}],
    "adam": [{}, {"weight_decay": 0.1}, {"amsgrad": True}, {"maximize": True},
             {"betas": (0.8, 0.99), "eps": 1e-6}],
    "adamw": [{}, {"weight_decay": 0.3}, {"amsgrad": True}, {"maximize": True},
              {"betas": (0.5, 0.9)}],
    "rmsprop": [{}, {"centered": True}, {"momentum": 0.9}, {"weight_decay": 0.1},
                {"maximize": True}, {"alpha": 0.9, "eps": 1e-6, "centered": True, "momentum": 0.5}],
}


def option_text(options):
    parts = []
    for key, value in options.items():
        if key == "betas":
            parts += [f"beta1={value[0]!r}", f"beta2={value[1]!r}"]
        elif isinstance(value, bool):
            parts.append(f"{key}={int(value)}")
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


class Writer:
    def __init__(self, out, name):
        self.lines = [f"case {name}"]
        self.blob = bytearray()
        self.path = os.path.join(out, name)

    def config(self, line):
        self.lines.append(line)

    def array(self, name, tensor):
        t = tensor.detach().contiguous()
        if t.dtype in (torch.float16, torch.bfloat16):
            data = t.view(torch.int16).numpy().astype("<i2").tobytes()
            dtype = "float16" if t.dtype == torch.float16 else "bfloat16"
        elif t.dtype == torch.float32:
            data, dtype = t.numpy().astype("<f4").tobytes(), "float32"
        elif t.dtype == torch.float64:
            data, dtype = t.numpy().astype("<f8").tobytes(), "float64"
        else:
            data, dtype = t.to(torch.uint8).numpy().tobytes(), "uint8"
        self.lines.append(f"array {name} {dtype} {t.numel()} {len(self.blob)}")
        self.blob += data

    def close(self):
        with open(self.path + ".bin", "wb") as f:
            f.write(self.blob)
        with open(self.path + ".txt", "w") as f:
            f.write("\n".join(self.lines) + "\n")


def update_scale(scale, tracker, found_inf, growth, backoff, interval):
    """torch._amp_update_scale_ (CPU kernel): float scale, double factors."""
    if found_inf:
        return float(np.float32(scale * backoff)), 0
    tracker += 1
    if tracker == interval:
        grown = np.float32(scale * growth)
        return (float(grown) if np.isfinite(grown) else scale), 0
    return scale, tracker


def run_case(out, name, dtype_name, optimizers, scaler, clip=None, accumulate=1, schedule=None,
             seed=0):
    """optimizers: list of (kind, [groups]) with groups = [(param names, options)]."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    w = Writer(out, name)
    w.config(f"run dtype={dtype_name} steps={STEPS} accumulate={accumulate}"
             + (f" clip={clip!r}" if clip else "") + (f" schedule={schedule}" if schedule else ""))
    w.config("scaler " + " ".join(f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}"
                                   for k, v in scaler.items()))
    model, master = {}, {}
    for p, shape in SHAPES.items():
        model[p] = torch.randn(shape, generator=gen).to(dtype)
        master[p] = model[p].float().clone().requires_grad_(False)
        w.array(f"init/{p}", model[p])
    torch_opts, scheds = [], []
    for k, (kind, groups) in enumerate(optimizers):
        cls, defaults = OPTIMIZERS[kind]
        param_groups = []
        for g, (names, options) in enumerate(groups):
            opts = dict(defaults, **options)
            w.config(f"{'optimizer' if g == 0 else 'group'} {k} {kind} params={','.join(names)} "
                     + option_text(opts))
            param_groups.append(dict(params=[master[n] for n in names], **opts))
        opt = cls(param_groups)
        torch_opts.append((opt, [n for names, _ in groups for n in names]))
        if schedule:
            kind_s, a, b = schedule.split(":")
            if kind_s == "linear_warmup":
                scheds.append(torch.optim.lr_scheduler.LinearLR(opt, start_factor=float(b),
                                                                total_iters=int(a)))
            elif kind_s == "cosine":
                # eta_min is absolute in torch; mixprec's min_factor scales each group's lr.
                assert len(groups) == 1
                scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(
                    opt, T_max=int(a), eta_min=float(b) * groups[0][1].get("lr", defaults["lr"])))
            elif kind_s == "step_decay":
                scheds.append(torch.optim.lr_scheduler.StepLR(opt, step_size=int(a), gamma=float(b)))
    mode = scaler["mode"]
    scale = float(scaler.get("init_scale", 65536.0)) if mode != "disabled" else 1.0
    tracker = 0
    scales, lrs = [], []
    masters = {p: [] for p in SHAPES}
    applied = [[] for _ in torch_opts]
    for step in range(STEPS):
        stored = {p: torch.zeros(SHAPES[p], dtype=dtype) for p in SHAPES}
        for j in range(accumulate):
            for p in SHAPES:
                micro = (torch.randn(SHAPES[p], generator=gen) * SIGMA[p] * scale).to(dtype)
                for s, q, where, value in INJECT:
                    if s == step and q == p and j == accumulate - 1 and micro.numel():
                        flat = micro.view(-1)
                        index = {"first": 0, "middle": flat.numel() // 2, "last": flat.numel() - 1}[where]
                        flat[index] = value
                w.array(f"grad/{step}/{j}/{p}", micro)
                stored[p] = (stored[p].float() + micro.float()).to(dtype)  # a backward's accumulation
        scales.append(scale)
        lrs.append(torch_opts[0][0].param_groups[0]["lr"])
        inv_scale = torch.tensor(1.0 / scale, dtype=torch.float64).float()
        found_any = False
        for k, (opt, names) in enumerate(torch_opts):
            found = any(not torch.isfinite(stored[n]).all() for n in names)
            found_any = found_any or found
            applied[k].append(not found)
            if found:
                continue
            for n in names:
                master[n].grad = stored[n].float() * inv_scale
            if clip:
                torch.nn.utils.clip_grad_norm_([master[n] for n in names], clip)
            opt.step()
            if scheds:
                scheds[k].step()
        for p in SHAPES:
            masters[p].append(master[p].detach().clone().view(-1))
        if mode == "dynamic":
            scale, tracker = update_scale(scale, tracker, found_any, scaler.get("growth_factor", 2.0),
                                          scaler.get("backoff_factor", 0.5),
                                          scaler.get("growth_interval", 2000))
    w.array("scale", torch.tensor(scales, dtype=torch.float32))
    w.array("lr", torch.tensor(lrs, dtype=torch.float64))
    for k in range(len(torch_opts)):
        w.array(f"applied/{k}", torch.tensor(applied[k], dtype=torch.uint8))
    for p in SHAPES:
        w.array(f"master/{p}", torch.stack(masters[p]) if masters[p][0].numel() else torch.zeros(0))
    w.close()
    return sum(not a for a in applied[0])


def scaler_for(dtype_name):
    # fp16: dynamic, started low with a short interval so it grows into real
    # overflows; bf16/fp32: scaling disabled, non-finite steps still skipped.
    if dtype_name == "float16":
        return {"mode": "dynamic", "init_scale": 8192.0, "growth_interval": 6}
    return {"mode": "disabled"}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    all_params = list(SHAPES)
    names = []
    seed = 0
    for dtype_name in DTYPES:
        for kind, variants in VARIANTS.items():
            for v, options in enumerate(variants):
                seed += 1
                name = f"{kind}{v}_{dtype_name}"
                run_case(out, name, dtype_name, [(kind, [(all_params, options)])],
                         scaler_for(dtype_name), seed=seed)
                names.append(name)
        seed += 1
        extra = [
            (f"clip_adamw_{dtype_name}", dict(optimizers=[("adamw", [(all_params, {})])], clip=0.5)),
            (f"clip_sgd_{dtype_name}", dict(optimizers=[("sgd", [(all_params, {"momentum": 0.9})])], clip=0.01)),
            (f"accumulate_adam_{dtype_name}", dict(optimizers=[("adam", [(all_params, {})])], accumulate=3)),
            (f"shared_scaler_{dtype_name}", dict(optimizers=[("sgd", [(["p0", "p1"], {"momentum": 0.9})]),
                                                            ("adam", [(["p2", "p3"], {})])])),
            (f"groups_adam_{dtype_name}", dict(optimizers=[("adam", [(["p0", "p1"], {"lr": 1e-3}),
                                                                     (["p2", "p3"], {"lr": 3e-3, "weight_decay": 0.1})])])),
            (f"warmup_sgd_{dtype_name}", dict(optimizers=[("sgd", [(all_params, {"momentum": 0.9})])],
                                              schedule="linear_warmup:10:0.1")),
            (f"cosine_adamw_{dtype_name}", dict(optimizers=[("adamw", [(all_params, {})])],
                                                schedule="cosine:40:0.1")),
            (f"step_rmsprop_{dtype_name}", dict(optimizers=[("rmsprop", [(all_params, {})])],
                                                schedule="step_decay:7:0.5")),
        ]
        if dtype_name == "float16":
            extra.append(("static_adam_float16", dict(optimizers=[("adam", [(all_params, {})])],
                                                      scaler={"mode": "static_scale", "init_scale": 4096.0})))
        for name, kwargs in extra:
            seed += 1
            kwargs.setdefault("scaler", scaler_for(dtype_name))
            run_case(out, name, dtype_name, seed=seed, **kwargs)
            names.append(name)
    with open(os.path.join(out, "cases.txt"), "w") as f:
        f.write(f"# torch {torch.__version__}\n" + "\n".join(names) + "\n")
    print(f"{len(names)} cases written to {out} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
