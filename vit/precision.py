"""Whether half precision pays off on this machine's CPU, measured rather than read from its feature flags.

bfloat16 is fast on a CPU only with AMX. Without it, oneDNN emulates bfloat16 (AVX-512 BF16, AVX-512) or torch
falls back to scalar code (AVX2), and a run asked to go faster goes slower. Imports torch only, so `vit predict`
can ask without loading Lightning.
"""

from __future__ import annotations

import time

import torch

MATRIX_UNITS = {torch.bfloat16: "AMX", torch.float16: "AMX-FP16"}  # Intel's; Sapphire Rapids has AMX only


def matmul_speedup(dtype: torch.dtype, size: int = 256, repeats: int = 3) -> float:
    """How many times as fast a `size`² matrix product runs on this CPU in `dtype` as in float32 (best of
    `repeats`, after a warm-up). Measured here, with oneDNN capped by ONEDNN_MAX_CPU_ISA, for bfloat16: 1.8 with
    AMX, 0.6 with AVX-512 BF16 only, 0.18 with AVX-512 only, 0.013 with AVX2 (a scalar fallback); on a later
    machine of this project 2.0, 2.0-2.4, 0.46 and 0.03."""
    a = torch.randn(size, size)

    def best(x: torch.Tensor) -> float:
        x @ x  # oneDNN builds its kernel on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    # On one thread: where other processes keep the cores busy (loader workers, a second run), a float32 product of
    # a fraction of a millisecond waits on its threads' barrier for longer than it computes, and bfloat16 looked
    # faster than float32 on a CPU that emulates it (1.56 instead of 0.02, measured under pytest -n 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best(a) / best(a.to(dtype))
    finally:
        torch.set_num_threads(threads)


def slow_on_this_cpu(dtype: torch.dtype) -> str | None:
    """None when `dtype` multiplies matrices at least as fast as float32 on this CPU, else a clause saying how
    much slower it was ("a bfloat16 matrix product ran 5.0 times slower than a float32 one ...")."""
    speedup = matmul_speedup(dtype)
    if speedup >= 1:
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"a {name} matrix product ran {1 / speedup:.1f} times slower than a float32 one on this CPU "
        f"({name} is fast only on CPUs with {MATRIX_UNITS.get(dtype, 'matrix units for it')})"
    )
