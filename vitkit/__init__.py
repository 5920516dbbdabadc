"""vitkit: Vision Transformers that train, fine-tune, explain and serve, fast on the machine you have."""

from .config import PreprocessConfig, ViTConfig, config_from_name, list_models
from .interop import from_pretrained
from .model import VisionTransformer, create_model

__version__ = "0.1.0"

__all__ = [
    "ViTConfig",
    "PreprocessConfig",
    "VisionTransformer",
    "create_model",
    "from_pretrained",
    "config_from_name",
    "list_models",
    "__version__",
]
