#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""How far a bf16 second moment drifts from an fp32 one: rounded to nearest, and stochastically.

Adam's v <- beta2 v + (1 - beta2) g^2 with beta2 = 0.999 moves v by at most
0.1% of itself downwards, less than half a bf16 ulp (2^-9 to 2^-8 of v), so
a bf16 v rounded to nearest never decays and rises only on large g^2.
Stochastic rounding (optim::Moments::bf16_sr: up with probability the
fraction of the ulp that the value is above the lower neighbour, decided by
24 random bits) keeps every update in expectation. This simulates the three
for `--elements` parameters over `--steps` steps of N(0, sigma_i^2 s(t)^2)
gradients (sigma_i log-normal per element; s(t) = 1, or halving every
`--half-life` steps with --decay) and prints the median of v-hat / E[g^2]
at the end for each, and of v / v(float64), the float64 moment of the same
gradients. numpy only.

    python3 benchmarks/bf16_moment_drift.py [--decay]
"""
import argparse

import numpy as np


def round_bf16(x):
    """float32 -> bfloat16 (round to nearest even) -> float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def round_bf16_stochastic(x, rng):
    """float32 -> bfloat16 with stochastic rounding -> float32: state_layout.hpp's
    stochastic_round<bfloat16> for finite values (away from zero with probability
    (|x| - |toward|) / ulp, compared on the top 24 bits of a random word)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    low = bits & 0xFFFF
    toward = bits - low  # truncation: toward zero (sign-magnitude)
    r24 = rng.integers(0, 1 << 24, bits.shape, dtype=np.uint64)
    up = r24 < (low << 8)  # u = r24 / 2^24 < p = low / 2^16
    return np.where(up, toward + 0x10000, toward).astype(np.uint32).view(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--elements", type=int, default=20000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--decay", action="store_true", help="the gradients' scale halves every --half-life steps")
    p.add_argument("--half-life", type=float, default=1000.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    sigma = np.exp(rng.normal(0.0, 1.0, a.elements)).astype(np.float32)
    v32 = np.zeros(a.elements, np.float32)
    v16 = np.zeros(a.elements, np.float32)
    vsr = np.zeros(a.elements, np.float32)
    v64 = np.zeros(a.elements, np.float64)
    sr_rng = np.random.default_rng(a.seed + 1)  # the rounding's own stream
    b2 = np.float32(a.beta2)
    for t in range(a.steps):
        scale = 0.5 ** (t / a.half_life) if a.decay else 1.0
        g = (rng.normal(0.0, 1.0, a.elements) * sigma * scale).astype(np.float32)
        v32 = (b2 * v32 + (1 - b2) * g * g).astype(np.float32)
        v16 = round_bf16(b2 * v16 + (1 - b2) * g * g)
        vsr = round_bf16_stochastic(b2 * vsr + (1 - b2) * g * g, sr_rng)
        v64 = a.beta2 * v64 + (1 - a.beta2) * g.astype(np.float64) ** 2
    expected = sigma.astype(np.float64) ** 2 * (0.5 ** (a.steps / a.half_life) if a.decay else 1.0) ** 2
    correction = 1.0 - a.beta2 ** a.steps
    for name, v in (("fp32", v32), ("bf16, round to nearest", v16), ("bf16, stochastic", vsr)):
        ratio = np.median(v / correction / expected)
        tracking = np.median(v / v64)
        print(f"{name:24s} median v-hat / E[g^2] after {a.steps} steps: {ratio:.3f}   v / v(float64): {tracking:.3f}")


if __name__ == "__main__":
    main()
