"""Weights out: `model.save_pretrained(DIR, format="vitkit" | "hf" | "timm")`, each folder with its model card.

The model package owns the writer registry (vitkit.model.serialization.FOLDER_WRITERS) but cannot import this
package; importing vitkit.interop registers the writers here, the vitkit one included (it adds the card and a
config.json to the bare weights file the model package registers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..files import atomic_write_bytes
from ..model import VisionTransformer
from ..model.serialization import FORMAT, register_folder_writer, write_vitkit_folder
from ..version import __version__
from .card import README, model_card
from .hf import write_hf_folder
from .timm import write_timm_folder
from .writing import write_json

FORMATS = (FORMAT, "hf", "timm")


def write_vitkit_hub_folder(model: VisionTransformer, directory: Path, **metadata: str) -> Path:
    """model.safetensors (everything inside) and a config.json that names vitkit (the Hub reads it to count
    downloads and show the library; vitkit itself loads from the weights file alone)."""
    write_vitkit_folder(model, directory, **metadata)
    write_json(
        directory / "config.json",
        {
            "library_name": "vitkit",
            "format": FORMAT,
            "vitkit_version": __version__,
            "config": model.cfg.to_dict(),
            "preprocess": model.preprocess.to_dict(),
            "labels": model.labels,
        },
    )
    return directory


_WRITERS: dict[str, Callable[..., Path]] = {
    FORMAT: write_vitkit_hub_folder,
    "hf": write_hf_folder,
    "timm": write_timm_folder,
}


def save_pretrained(
    model: VisionTransformer,
    directory: str | Path,
    format: str = FORMAT,
    source: str | Path | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    card: bool = True,
    **metadata: str,
) -> Path:
    """Write `model` as a folder another library loads, and README.md (the model card) beside it.

    Args:
        model: the model to write.
        directory: the folder (created; files in it with the same names are replaced).
        format: "vitkit" (model.safetensors with everything inside), "hf" (transformers ViT) or "timm".
        source: the checkpoint the model came from: its metadata and its run folder's metrics.jsonl go into the
            card.
        repo_id: the Hub repo the folder is for (the card's loading examples use it instead of the path).
        license: the card's license field, when known.
        card: write README.md (an existing one is replaced).
        metadata: provenance (converted_from, steps, ...): in the vitkit weights file, and in every card.

    Raises:
        ExportError: the format cannot express the model (named in the message); nothing is written.
    """
    if format not in _WRITERS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    directory = Path(directory)
    if format == FORMAT:
        _WRITERS[format](model, directory, **metadata)
    else:
        _WRITERS[format](model, directory)
    if card:
        where = repo_id or str(directory)
        hub = repo_id is not None
        text = model_card(model, format, where, source=source, hub=hub, license=license, provenance=metadata)
        atomic_write_bytes(directory / README, text.encode("utf-8"))
    return directory


def _registered(fmt: str) -> Callable[..., Path]:
    def write(model: VisionTransformer, directory: Path, **options: str) -> Path:
        return save_pretrained(model, directory, fmt, **options)

    write.__doc__ = f"save_pretrained(..., format={fmt!r}): the {fmt} folder and its model card."
    return write


for _fmt in FORMATS:
    register_folder_writer(_fmt, _registered(_fmt))

__all__ = ["FORMATS", "save_pretrained", "write_vitkit_hub_folder"]
