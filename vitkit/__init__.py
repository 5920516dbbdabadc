"""vitkit: Vision Transformers that train, fine-tune, explain and serve, fast on the machine you have."""

from . import quant  # noqa: F401  (registers the int8 structure with the checkpoint loader)
from .config import PreprocessConfig, ViTConfig, config_from_name, list_models
from .interop import create_model, from_pretrained  # create_model with pretrained=True loads weights by name
from .model import VisionTransformer
from .version import __version__


def __getattr__(name: str):
    # Predictor pulls in the inference stack (PIL, torchvision transforms); import it only when asked for.
    if name == "Predictor":
        from .infer.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")


__all__ = [
    "ViTConfig",
    "PreprocessConfig",
    "VisionTransformer",
    "create_model",
    "from_pretrained",
    "config_from_name",
    "list_models",
    "Predictor",
    "__version__",
]
