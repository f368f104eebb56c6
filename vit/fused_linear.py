"""The model's Linear layers, faster on CPU: oneDNN's fused linear wherever it gives bitwise aten's numbers.

aten's addmm first copies the broadcast bias into its output (about a tenth of a ViT's CPU time), and the exact GELU
costs another pass over memory; oneDNN's fused linear does both in the GEMM's epilogue. Its GEMM, though, may sum in
another order than aten's (MKL's): for rows longer than 384 on AVX-512 that moves the logits by ~1e-5. So the fused
op runs only at shapes where it has been seen to give bitwise the plain modules' numbers on this machine
(`_fuses_exactly`); the logits stay timm's, bit for bit. Without autograd it takes the bias and the GELU; with
autograd only the bias, through `_BiasInEpilogue`, whose backward is aten's. It runs only on plain float32 CPU
tensors, never under autocast, functorch or forward-mode AD, while scripting, tracing, compiling or exporting, or under
a dispatch mode (FLOP counters, fake tensors); elsewhere, and for hooked or replaced Linears, the modules run.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_HAS_FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")


@lru_cache(maxsize=256)
def _fuses_exactly(rows: int, k: int, n: int, bias: bool, gelu: bool, threads: int) -> bool:
    """Whether the fused op equals F.linear (then exact GELU) bit for bit at this shape, tried once on random data.
    `threads` only keys the cache: the GEMMs may split their sums differently on another number of threads."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    b = b if bias else None
    plain = F.linear(x, w, b)
    return torch.equal(_fused_linear(x, w, b, gelu), F.gelu(plain) if gelu else plain)


class _BiasInEpilogue(torch.autograd.Function):
    """F.linear(x, weight, bias) for training: the fused op forward, aten's addmm formulas backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _fused_linear(x, weight, bias, gelu=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (B*N, out)
        return grad @ weight, rows.t() @ x.reshape(-1, x.shape[-1]), rows.sum(0)


def linear(x: torch.Tensor, layer: nn.Module, act: nn.Module | None = None) -> torch.Tensor:
    """`act(layer(x))`: through oneDNN's fused linear where that is exact (see above), else through the modules."""
    grad = torch.is_grad_enabled()
    gelu = type(act) is nn.GELU and act.approximate == "none" and not grad
    if (
        _HAS_FUSED_LINEAR
        and type(layer) is nn.Linear
        and (layer.bias is not None if grad else act is None or gelu)
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and type(x) is torch.Tensor  # not a subclass: fake, meta, distributed...
        and x.device.type == "cpu"
        and x.dtype == layer.weight.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")  # autocast wants its own dtype for F.linear
        and not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling())
        and not is_in_torch_dispatch_mode()  # FlopCounterMode, FakeTensorMode... see the aten ops
        and not (grad and (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0))
        and _fuses_exactly(
            x.numel() // x.shape[-1], *layer.weight.shape[::-1], layer.bias is not None, gelu, torch.get_num_threads()
        )
    ):
        if not grad:
            return _fused_linear(x, layer.weight, layer.bias, gelu)
        y = _BiasInEpilogue.apply(x, layer.weight, layer.bias)
        return y if act is None else act(y)
    return layer(x) if act is None else act(layer(x))
