"""Helpers shared by the test files: tiny models, images and image folders, free ports, subprocess runners.

One copy here rather than one per file, so a change to how a tiny model or a test folder is made reaches every
test that uses it.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from tests.hub_server import hub  # noqa: F401  (the `hub` fixture: a Hugging Face Hub stand-in on 127.0.0.1)

REPO = Path(__file__).resolve().parent.parent

# A distinct colour per class (red, green, blue, yellow, cyan, magenta): make_image_folder's classes tell apart at a
# glance, so a model that trained at all separates them.
PALETTE = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch random state, whatever ran before it."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """torch on one thread for the test: a tiny model's training steps run faster, and steadier beside other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ models


def tiny_kwargs(**kw):
    """create_model overrides for a ViT small enough for tests that take milliseconds."""
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    base.update(kw)
    return base


def tiny_model(
    arch: str = "vit_tiny_patch16_224", *, seed: int | None = 0, labels: Sequence[str] | None = None, **kw
) -> vitkit.VisionTransformer:
    """`arch` built with `tiny_kwargs(**kw)`, from `torch.manual_seed(seed)` (None: the current random state).

    A fixed seed gives a module-scoped fixture the same weights whichever test asks for it first.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = vitkit.create_model(arch, **tiny_kwargs(**kw))
    if labels is not None:
        model.labels = list(labels)
    return model


def tiny_digits_config(out: str | Path, **overrides):
    """A TrainConfig for a seconds-long run on scikit-learn's digits with a 2-block ViT; `overrides` replace fields.

    Without overrides it trains with the default recipe (augmentation, schedule); tests set what they exercise.
    """
    from vitkit.train import TrainConfig

    base = dict(
        data="digits",
        val_split=0.1,
        out=str(out),
        model="vit_digits_patch2_8",
        model_kwargs=dict(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1),
        lr=2e-3,
        progress=False,
        threads=1,
    )
    return TrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------------ images


def noise_rgb(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    """A uint8 (h, w, 3) image of uniform noise, the same for the same seed."""
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """A uint8 (h, w, 3) array encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def noise_png(h: int = 40, w: int = 56, seed: int = 0) -> bytes:
    """`noise_rgb(h, w, seed)` encoded as PNG."""
    return png_bytes(noise_rgb(h, w, seed))


def write_png(path: str | Path, rgb: np.ndarray) -> str:
    """Save a uint8 (h, w, 3) array as a PNG file; returns the path as a string."""
    Image.fromarray(rgb).save(path)
    return str(path)


def make_image_folder(
    root: Path,
    classes: Sequence[str] = ("red", "green", "blue"),
    per_class: int = 24,
    size: int | tuple[int, int] = 16,
    seed: int = 0,
) -> Path:
    """root/<class>/<i>.png: noisy squares in one colour per class (PALETTE, in class order); returns root.

    `size` is (h, w) or one side. The noise (±40 per channel) keeps images of a class different from each other;
    the colours keep the classes apart, so a trainer that learns anything reaches near 100 % on them.
    """
    if len(classes) > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} classes, got {len(classes)}")
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    for name, colour in zip(classes, PALETTE):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------- processes, ports


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(
    args: Sequence[str | bytes],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process of this interpreter, output captured; `env` adds to this environment.

    The child imports vitkit from this checkout whatever its working directory (PYTHONPATH names the repo).
    """
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=text, timeout=timeout
    )


def run_vitkit(args: Sequence[str | bytes], **kw) -> subprocess.CompletedProcess:
    """`python -m vitkit ARGS` as a user would run the console script; keyword arguments as for run_python."""
    return run_python(["-m", "vitkit", *args], **kw)
