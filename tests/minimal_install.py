"""What a user with the core install alone can do: run by `make test-minimal` in a fresh venv holding torch,
torchvision and `pip install .` without extras (not collected by pytest: it needs that venv).

It imports the installed copy of vitkit (so missing package data shows), creates a tiny model, saves, loads and
predicts with it through the API and the `vitkit` command, and checks that verbs needing an extra fail with one
line naming that extra. tests/test_optional_deps.py covers more verbs, but by hiding modules inside the dev venv;
this script is the real install a user gets.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vitkit

EXTRA_MODULES = {  # import name -> the vitkit extra that brings it (pyproject.toml's optional-dependencies)
    "fastapi": "serve",
    "uvicorn": "serve",
    "python_multipart": "serve",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "matplotlib": "plot",
    "sklearn": "digits",
}
LABELS = ["cat", "dog", "bird"]
VITKIT = Path(sys.executable).parent / "vitkit"  # the console script `pip install` wrote


def check_the_install_is_minimal() -> None:
    present = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is not None]
    assert not present, f"{present} are installed: this venv is not an install without extras"
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert site_packages in Path(vitkit.__file__).resolve().parents, f"not the installed copy: {vitkit.__file__}"
    assert importlib.metadata.version("vitkit") == vitkit.__version__, "vitkit/version.py differs from pyproject.toml"


def save_and_load_a_tiny_model(folder: Path) -> Path:
    model = vitkit.create_model("S/16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    model.labels = LABELS
    path = model.save(folder / "tiny.safetensors")
    loaded = vitkit.from_pretrained(path)
    assert loaded.labels == LABELS and loaded.cfg == model.cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    return path


def predict_an_image(checkpoint: Path, folder: Path) -> None:
    image = folder / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    assert vitkit.Predictor(checkpoint).predict_one(image, topk=3).labels[0] in LABELS
    proc = subprocess.run([VITKIT, "predict", checkpoint, image, "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["top"][0]["label"] in LABELS, proc.stdout


def check_a_verb_names_its_extra(args: list[str], extra: str) -> None:
    proc = subprocess.run([VITKIT, *map(str, args)], capture_output=True, text=True)
    err = proc.stderr.strip()
    assert proc.returncode == 1, f"vitkit {args[0]}: exit {proc.returncode}, stderr {err!r}"
    assert len(err.splitlines()) == 1 and f"vitkit[{extra}]" in err, (
        f"vitkit {args[0]}: not one line naming the extra: {err!r}"
    )


def main() -> None:
    check_the_install_is_minimal()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = save_and_load_a_tiny_model(folder)
        predict_an_image(checkpoint, folder)
        check_a_verb_names_its_extra(["serve", checkpoint, "--port", "0"], "serve")
        check_a_verb_names_its_extra(["export", checkpoint, "--format", "onnx", "-o", folder / "m.onnx"], "onnx")
        check_a_verb_names_its_extra(["plot", folder], "plot")
    print(f"minimal install: vitkit {vitkit.__version__} (torch {torch.__version__}) imports, saves, loads, predicts")


if __name__ == "__main__":
    main()
