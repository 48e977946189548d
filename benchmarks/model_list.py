# SPDX-License-Identifier: Apache-2.0
"""What the optimizer benchmarks' scripts share: the tensor list (same as
model_list.hpp) and the CUDA-event timing."""
import statistics


def tensor_list(n):
    """Sizes: 1M-element weights (2^20 - 1024) alternating with 1024-element biases, n in all."""
    sizes, left, k = [], n, 0
    while left > 0:
        size = min(left, 1024 if k % 2 else (1 << 20) - 1024)
        sizes.append(size)
        left -= size
        k += 1
    return sizes


def median_ms(torch, run, replays):
    """The median over `replays` of run()'s time on the current stream, after 3 warm-up calls."""
    for _ in range(3):
        run()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)
