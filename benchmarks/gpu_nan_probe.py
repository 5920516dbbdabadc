"""Which part makes bf16 CIFAR-10 training on a GPU produce non-finite steps? The cifar10_gpu recipe at lr 2e-3 for
600 steps, five ways: as is, explicit (math) attention, SDPA without flash, qk-norm, fp32. Results in
benchmarks/README.md "GPU".

    PYTHONPATH=. python3 benchmarks/gpu_nan_probe.py   # on a GPU machine

Environment: CIFAR (the CIFAR-10 train archive; default runs/gpu_data/cifar10-train.tar.gz, where gpu.sh's runs put
it), OUT (where probe.jsonl is appended; default runs/gpu_nan_probe).
"""

import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, ".")
from vitkit.train import build_config, fit  # noqa: E402

DATA = os.environ.get("CIFAR", "runs/gpu_data/cifar10-train.tar.gz")
variants = {
    "default": ({}, {}),
    "math_attn": ({"attn_backend": "math"}, {}),
    "no_flash": ({}, {"flash": False}),
    "qk_norm": ({"qk_norm": True}, {}),
    "fp32": ({}, {"precision": "fp32"}),
}
out = os.environ.get("OUT", "runs/gpu_nan_probe")
os.makedirs(out, exist_ok=True)
for name, (mk, extra) in variants.items():
    torch.backends.cuda.enable_flash_sdp(extra.get("flash", True))
    cfg = build_config(
        "cifar10_gpu",
        data=DATA,
        minutes=2.5,
        out=f"runs/probe_{name}",
        progress=False,
        lr=0.002,
        warmup_epochs=2,
        stop_after_steps=600,
        eval_every=100,
    )
    cfg.model_kwargs = {**cfg.model_kwargs, **mk}
    if "precision" in extra:
        cfg.precision = extra["precision"]
    t = time.time()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            res = fit(cfg, resume=False)
            status = f"steps {res.steps}"
        except Exception as e:  # TrainingDiverged
            status = f"{type(e).__name__}: {str(e)[:120]}"
    bad = [str(x.message)[:60] for x in w if "non-finite" in str(x.message)]
    line = dict(variant=name, skipped=len(bad), first=bad[:3], status=status, seconds=round(time.time() - t, 1))
    print(json.dumps(line), flush=True)
    with open(f"{out}/probe.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
