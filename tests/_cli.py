"""`vit fit` arguments the subprocess tests share: the digits config with a one-block, 16-wide model and no bar."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_DIGITS = [
    "--config",
    str(ROOT / "configs" / "digits.yaml"),
    "--model.model_overrides",
    json.dumps({"in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2}),
    "--trainer.enable_progress_bar",
    "false",
]
