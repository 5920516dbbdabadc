"""vitkit runs on a machine with only the core stack (torch, torchvision, numpy, pillow, safetensors, pyyaml, tqdm).

Simulated in a subprocess: `sys.modules[name] = None` for each optional package makes `import name` raise
ImportError there, whatever is installed here. Training and the Python API must work; features that need a missing
package say which one to install, in one line, only when they are used; the evaluation's default plot is skipped.
"""

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import make_image_folder, run_python

OPTIONAL = [
    "matplotlib",
    "sklearn",
    "scipy",
    "tensorboard",
    "fastapi",
    "uvicorn",
    "starlette",
    "python_multipart",
    "onnx",
    "onnxruntime",
    "onnxscript",
]
BLOCK = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None  # `import name` now raises\n"


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where the optional packages cannot be imported."""
    env = {"OMP_NUM_THREADS": "1", "VITKIT_CACHE": str(cwd / "cache")}
    return run_python(["-c", BLOCK + code, *args], cwd=cwd, env=env)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder: 2 classes x 24 noisy 32x32 RGB PNGs (the size the CIFAR-10 recipe's model expects)."""
    root = tmp_path_factory.mktemp("optional")
    make_image_folder(root / "imgs", ("cat", "dog"), per_class=24, size=32)
    return root


def test_blocking_works(folder):
    proc = _python("import matplotlib", cwd=folder)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr  # else the tests below would prove nothing


def test_train_with_the_cifar_recipe_without_optional_packages(folder):
    run = folder / "run"
    args = ["train", "--data", str(folder / "imgs"), "--recipe", "cifar10_budget", "--batch-size", "8"]
    args += ["--stop-after-steps", "3", "--out", str(run), "--no-progress", "--threads", "1"]
    proc = _python("import runpy\nrunpy.run_module('vitkit', run_name='__main__', alter_sys=True)", *args, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped after step 3" in proc.stdout
    assert (run / "last.ckpt").is_file() and (run / "metrics.jsonl").is_file()


def test_api_and_cli_features_without_optional_packages(folder):
    code = """
import contextlib, io, json
import torch
import vitkit
from vitkit.cli import main

model = vitkit.create_model("S/16", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
model.labels = ["cat", "dog"]
assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
path = model.save("m.safetensors")
assert vitkit.Predictor(path).predict_one("imgs/cat/000.png").labels[0] in ("cat", "dog")

out = {}
for verb, args in {
    "evaluate": ["evaluate", str(path), "--data", "imgs"],
    "plot": ["plot", "."],
    "digits": ["train", "--data", "digits", "--epochs", "1", "--out", "r", "--no-progress"],
    "explain": ["explain", str(path), "imgs/cat/000.png", "--out", "x"],
}.items():
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(args)
    out[verb] = {"rc": rc, "out": o.getvalue(), "err": e.getvalue()}
print(json.dumps(out))
"""
    proc = _python(code, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])

    ev = res["evaluate"]  # the numbers are the result; the default plot is skipped with a note
    assert ev["rc"] == 0 and "top-1" in ev["out"], ev
    assert "confusion-matrix plot skipped: matplotlib is not installed" in ev["out"]
    assert not list(folder.glob("confusion_*.png"))
    needs = {"plot": "needs matplotlib", "digits": "needs scikit-learn", "explain": "needs matplotlib"}
    for verb, what in needs.items():
        r = res[verb]  # one line saying what to install, not a traceback
        assert r["rc"] == 1 and what in r["err"] and "pip install" in r["err"], (verb, r)
        assert "Traceback" not in r["err"], (verb, r)
