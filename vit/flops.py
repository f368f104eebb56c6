"""FLOPs of attention on CPU for torch's FLOP counter, which has formulas for the GPU SDPA kernels only: the op that
SDPA runs on CPU, `_scaled_dot_product_flash_attention_for_cpu`, counts as 0 FLOPs. We give it torch's own SDPA
formula (`sdpa_flop_count`: the two batched products, 4·B·heads·N²·head_dim), which adds 12% to ViT-Ti/16's
count at 224 and 8% to ViT-S/16's. Imports torch only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def cpu_sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of CPU SDPA from the shapes of q, k and v, by torch's formula for the GPU kernels."""
    return sdpa_flop_count(q, k, v)


CPU_ATTENTION = {CPU_SDPA: cpu_sdpa_flops}  # a `custom_mapping` for FlopCounterMode


@contextlib.contextmanager
def counting_cpu_attention() -> Iterator[None]:
    """While open, a FlopCounterMode created without our mapping (such as Lightning's model summary) counts CPU
    SDPA too; torch's registry is as it was afterwards. A formula torch has of its own is left alone."""
    added = CPU_SDPA not in flop_registry
    if added:
        flop_registry[CPU_SDPA] = shape_wrapper(cpu_sdpa_flops)
    try:
        yield
    finally:
        if added:
            flop_registry.pop(CPU_SDPA, None)
