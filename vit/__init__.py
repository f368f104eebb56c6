"""vit: a readable, timm-compatible Vision Transformer toolkit."""

from vit.factory import create_model, list_models, model_config
from vit.model import VisionTransformer, ViTConfig
from vit.predict import Predictor
from vit.weights import CheckpointError, load_model, load_pretrained, read_checkpoint, save_safetensors

__all__ = [
    "CheckpointError",
    "Predictor",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "list_models",
    "load_model",
    "load_pretrained",
    "model_config",
    "read_checkpoint",
    "save_safetensors",
]
__version__ = "0.1.0"
