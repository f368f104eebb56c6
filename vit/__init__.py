"""vit: a readable, timm-compatible Vision Transformer toolkit.

The names below are imported on first use (PEP 562), not by `import vit`: the `vit` command starts in `vit.cli` with
nothing of torch loaded yet, so that it can catch a Ctrl-C that comes while torch and timm import (seconds).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time, `__getattr__` below
    from vit.explain import explain, record_attention
    from vit.factory import create_model, list_models, model_config
    from vit.faithfulness import deletion_score, insertion_score
    from vit.model import VisionTransformer, ViTConfig
    from vit.predict import Predictor
    from vit.visualize import overlay
    from vit.weights import CheckpointError, load_model, load_pretrained, read_checkpoint, save_safetensors

_HOMES = {  # each public name: the module that defines it
    "explain": "explain",
    "record_attention": "explain",
    "create_model": "factory",
    "list_models": "factory",
    "model_config": "factory",
    "deletion_score": "faithfulness",
    "insertion_score": "faithfulness",
    "VisionTransformer": "model",
    "ViTConfig": "model",
    "Predictor": "predict",
    "overlay": "visualize",
    "CheckpointError": "weights",
    "load_model": "weights",
    "load_pretrained": "weights",
    "read_checkpoint": "weights",
    "save_safetensors": "weights",
}
__all__ = [
    "CheckpointError",
    "Predictor",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "deletion_score",
    "explain",
    "insertion_score",
    "list_models",
    "load_model",
    "load_pretrained",
    "model_config",
    "overlay",
    "read_checkpoint",
    "record_attention",
    "save_safetensors",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f"vit.{_HOMES[name]}"), name)
        globals()[name] = value  # once: later lookups find it without coming here
        return value
    try:  # `vit.data`, `vit.weights`, ...: a submodule, as an eager `import vit` would often have loaded it
        return importlib.import_module(f"vit.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"vit.{name}":  # the submodule exists but an import inside it failed: say that
            raise
    raise AttributeError(f"module 'vit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule vit.explain sets the package's `explain` to that module; the name is the function
        if name == "explain" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
