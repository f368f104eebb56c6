"""The optimiser of `vit fit`: any of timm's, by the names of timm's train.py `--opt` (`timm.optim.list_optimizers()`,
and `lookahead_<name>`), over timm's parameter groups: no weight decay on norms, biases, position embeddings and
tokens, and layer-wise LR decay. Each group's LR scale is baked into its lr, for the LambdaLR schedule."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from collections.abc import Sequence

import torch
from timm.optim import OptimInfo, create_optimizer_v2, get_optimizer_info, list_optimizers

DEFAULT_OPTIMIZER = "adamw"
LOOKAHEAD = "lookahead_"  # timm's prefix that wraps an optimiser in Lookahead
# torch's optimisers with a fused kernel for CPU and CUDA (one kernel for all parameters: several times faster);
# timm passes `fused` through to the optimiser, which every other one refuses
FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def optimizer_info(name: str) -> OptimInfo:
    """timm's registry entry for `name` (a `lookahead_` prefix is left out), checked for `vit fit`: an unknown
    name, a second-order optimiser, or one from a package that is not installed is a one-line ValueError."""
    base = name.lower().removeprefix(LOOKAHEAD)
    known = list_optimizers()
    if base not in known:
        prefix = name.lower()[: len(name) - len(base)]
        close = [prefix + c for c in difflib.get_close_matches(base, known, n=3, cutoff=0.6)]
        hint = f"did you mean {', '.join(close)}?" if close else "timm.optim.list_optimizers() names them"
        raise ValueError(f"--model.optimizer {name}: not one of timm's optimisers; {hint}")
    info = get_optimizer_info(base)
    if info.second_order:  # Hessian products through the attention: its CPU kernel has no second derivative
        raise ValueError(f"--model.optimizer {name}: a second-order optimiser, which vit fit does not train with")
    if isinstance(info.opt_class, str):  # apex or bitsandbytes, imported by timm when the optimiser is made
        package = info.opt_class.split(".")[0]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"--model.optimizer {name} needs {package}, which is not installed")
    return info


def check_optimizer_settings(name: str, betas: Sequence[float] | None) -> OptimInfo:
    """Refuse, in one line, an optimiser `build_optimizer` cannot make, and betas it does not take; else its
    registry entry."""
    info = optimizer_info(name)
    if betas is None:
        return info
    if not info.has_betas:
        takes = "; it takes --model.momentum" if info.has_momentum else ""
        raise ValueError(f"--model.betas {list(betas)}: {name} takes no betas{takes}")
    if len(betas) != info.num_betas:
        raise ValueError(f"--model.betas {list(betas)}: {name} takes {info.num_betas} betas")
    return info


def effective_betas(name: str, betas: Sequence[float] | None) -> tuple[float, ...] | None:
    """The betas `name` trains with: `betas`, or the optimiser's own when None (AdamW's (0.9, 0.999), Lion's
    (0.9, 0.99) ...); None for an optimiser without betas."""
    info = optimizer_info(name)
    if not info.has_betas:
        return None
    if betas is not None:
        return tuple(betas)
    if (info.defaults or {}).get("betas") is not None:
        return tuple(info.defaults["betas"])
    own = None if isinstance(info.opt_class, str) else inspect.signature(info.opt_class).parameters.get("betas")
    return tuple(own.default) if own is not None and own.default not in (None, inspect.Parameter.empty) else None


def build_optimizer(
    model: torch.nn.Module,
    name: str = DEFAULT_OPTIMIZER,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    betas: Sequence[float] | None = None,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """timm's optimiser `name` over `model`'s trainable parameters, in timm's groups: no weight decay on norms,
    biases and `model.no_weight_decay()` (position embeddings, tokens), and with `layer_decay` an LR scale per
    layer from `model.group_matcher()`, baked into each group's lr.

    `betas` go only to optimisers that take them (None: the optimiser's own), `momentum` only to those that take
    momentum (timm's `OptimInfo.has_momentum`), and torch's Adam, AdamW and SGD get their fused kernel on CPU and
    CUDA parameters. Raises ValueError (one line) for a name timm does not know, or settings it does not take.
    """
    info = check_optimizer_settings(name, betas)
    device = next(model.parameters()).device.type
    if isinstance(info.opt_class, str) and device != "cuda":  # else timm asserts, with a traceback
        raise ValueError(f"--model.optimizer {name} ({info.opt_class}) trains on a CUDA GPU only, not on {device}")
    options = {}
    if betas is not None:
        options["betas"] = tuple(betas)
    if info.has_momentum:
        options["momentum"] = momentum
    if info.opt_class in FUSED and device in ("cpu", "cuda"):
        options["fused"] = True
    optimizer = create_optimizer_v2(
        model, opt=name.lower(), lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **options
    )
    for group in optimizer.param_groups:  # timm's schedulers apply lr_scale; with LambdaLR we bake it in
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return optimizer
