"""Optional dependencies, imported only where a feature needs them, with one clear message when missing.

The core (create_model, from_pretrained, train, predict, evaluate) needs only torch, torchvision, numpy, pillow,
safetensors, pyyaml and tqdm. Plots and attention heatmaps need matplotlib, the built-in `digits` set needs
scikit-learn, approximate search over large indexes needs faiss; `serve` and ONNX export have their own extras
(vitkit.serve, vitkit.infer.export).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> what to `pip install`
PIP_NAMES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "faiss": "faiss-cpu"}
EXTRAS = {"matplotlib": "plot", "sklearn": "digits", "faiss": "retrieval"}  # import name -> the extra that brings it
EXTRAS.update(datasets="stream", braceexpand="stream")


def require(module: str, feature: str) -> ModuleType:
    """`import module` for `feature`, or ImportError saying what to install (the CLI prints it as one line)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pkg = PIP_NAMES.get(top, top)
        extra = f" (or pip install 'vitkit[{EXTRAS[top]}]')" if top in EXTRAS else ""
        raise ImportError(
            f"{feature} needs {pkg}, which could not be imported ({e}); pip install {pkg}{extra}"
        ) from None


def available(module: str) -> bool:
    """Whether `module` imports (a feature that is a nicety, e.g. a plot after a run, is skipped when not)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def pyplot(feature: str) -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (no display needed), for `feature`."""
    require("matplotlib", feature).use("Agg")
    return importlib.import_module("matplotlib.pyplot")


__all__ = ["require", "available", "pyplot", "PIP_NAMES"]
