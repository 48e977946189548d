# SPDX-License-Identifier: Apache-2.0
"""The tensor list of the optimizer benchmarks (same as model_list.hpp)."""


def tensor_list(n):
    """Sizes: 1M-element weights (2^20 - 1024) alternating with 1024-element biases, n in all."""
    sizes, left, k = [], n, 0
    while left > 0:
        size = min(left, 1024 if k % 2 else (1 << 20) - 1024)
        sizes.append(size)
        left -= size
        k += 1
    return sizes
