"""vit: a readable, timm-compatible Vision Transformer toolkit."""

from vit.explain import explain, record_attention
from vit.factory import create_model, list_models, model_config
from vit.faithfulness import deletion_score, insertion_score
from vit.model import VisionTransformer, ViTConfig
from vit.predict import Predictor
from vit.visualize import overlay
from vit.weights import CheckpointError, load_model, load_pretrained, read_checkpoint, save_safetensors

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
