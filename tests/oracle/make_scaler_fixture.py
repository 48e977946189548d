#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Scale/skip sequences of the real torch.amp.GradScaler, for grad_scaler_test.

torch 1.13 (Debian) has no CPU GradScaler, so this runs with PyTorch >= 2.3
(the lent GPU machine has 2.11) and its output is committed as
tests/oracle/fixtures/grad_scaler_sequences.txt:

    python3 make_scaler_fixture.py > fixtures/grad_scaler_sequences.txt

Each configuration drives a GradScaler("cpu") wrapping SGD over a found-inf
pattern (an inf written into the gradient at the marked steps) and records,
per step: found_inf, the scale before the step, whether the optimizer step
was applied, and the scale and growth tracker after update().
"""
import random

import torch

CONFIGS = [
    # name, GradScaler kwargs
    ("default_interval3", dict(init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)),
    ("odd_factors", dict(init_scale=1000.0, growth_factor=3.0, backoff_factor=0.3, growth_interval=2)),
    ("growth_to_inf_guard", dict(init_scale=65536.0, growth_factor=2.0 ** 20, backoff_factor=0.5, growth_interval=1)),
    ("small_scale", dict(init_scale=1.0, growth_factor=1.5, backoff_factor=0.125, growth_interval=4)),
    ("interval1", dict(init_scale=3.0, growth_factor=2.5, backoff_factor=0.9, growth_interval=1)),
]


def pattern(name, steps=240):
    rng = random.Random(name)
    if name == "growth_to_inf_guard":
        return [False] * 12 + [True] + [False] * 20
    out = []
    for _ in range(steps):
        if rng.random() < 0.05:
            out += [True] * rng.randint(1, 6)  # a burst of overflows
        else:
            out.append(rng.random() < 0.12)
    return out[:steps]


def main():
    print(f"# torch {torch.__version__} torch.amp.GradScaler('cpu')")
    print("# config NAME init_scale growth_factor backoff_factor growth_interval")
    print("# step found_inf scale_before applied scale_after growth_tracker_after")
    for name, kwargs in CONFIGS:
        scaler = torch.amp.GradScaler("cpu", **kwargs)
        p = torch.nn.Parameter(torch.zeros(4))
        opt = torch.optim.SGD([p], lr=0.1)
        # Count the optimizer steps GradScaler lets through (comparing the
        # parameter would miss updates that round away at large scales).
        calls = [0]
        real_step = opt.step

        def counted_step(*args, **kwargs):
            calls[0] += 1
            return real_step(*args, **kwargs)

        opt.step = counted_step
        print(f"config {name} {kwargs['init_scale']!r} {kwargs['growth_factor']!r} "
              f"{kwargs['backoff_factor']!r} {kwargs['growth_interval']}")
        for step, inf in enumerate(pattern(name)):
            scaler.scale(torch.ones(()))  # as a training loop scales its loss
            before = scaler.get_scale()
            p.grad = torch.full((4,), 1.0)
            if inf:
                p.grad[1] = float("inf")
            before_calls = calls[0]
            scaler.step(opt)
            applied = calls[0] > before_calls
            scaler.update()
            tracker = int(scaler._get_growth_tracker())
            print(f"{step} {int(inf)} {float(before).hex()} {int(applied)} "
                  f"{float(scaler.get_scale()).hex()} {tracker}")


if __name__ == "__main__":
    main()
