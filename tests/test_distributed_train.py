"""`vitkit train` under torchrun (2 CPU processes, gloo): the issue's command end to end, and exact resume."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vitkit
from vitkit.train import TrainConfig, fit
from vitkit.train import distributed as D
from vitkit.train.checkpoint import load_checkpoint

from .conftest import REPO, free_port, run_python, tiny_digits_config


def test_torchrun_train_digits_then_load_in_one_process(tmp_path):
    out = tmp_path / "run"
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "vitkit", "train", "--data", "digits", "--epochs", "1", "--out", str(out), "--no-progress"]
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--batch-size", "128"]
    proc = run_python(cmd, cwd=REPO, env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 2  # rank 0 alone reports: the model line and the saved file's line

    model = vitkit.from_pretrained(out / "model.safetensors")  # one process, no process group
    assert model.labels == [str(i) for i in range(10)]
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["rng"]["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # 1618 training images, 128 per rank x 2 ranks -> 6 steps cover 1536 images: 0.95 epochs counted over both ranks
    assert ckpt["step"] == 6
    assert final["kind"] == "final" and final["epoch"] == pytest.approx(1536 / 1618)


def _run(out, **kw) -> TrainConfig:
    augment = dict(random_crop_pad=1, mixup_alpha=0.2, label_smoothing=0.1)
    base = dict(epochs=1, batch_size=32, warmup_epochs=0.3, augment=augment)  # batch_size: per rank
    return tiny_digits_config(out, **{**base, **kw})


def _resume_worker(rank: int, port: int, out: str, kw: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    try:
        fit(_run(Path(out) / "straight", **kw))
        half = fit(_run(Path(out) / "resumed", stop_after_steps=9, **kw))  # stops mid-epoch, writes last.ckpt
        assert not half.finished and half.steps == 9
        fit(_run(Path(out) / "resumed", **kw))  # fresh model, optimizer, loaders, RNG: all from the checkpoint
    finally:
        D.teardown(D.DistEnv(rank=rank, world_size=2))


@pytest.mark.parametrize(
    "kw",
    [dict(ema_decay=0.9), pytest.param(dict(fsdp=True, grad_checkpointing=True), marks=pytest.mark.slow)],
    ids=["ddp-ema", "fsdp2-grad-checkpointing"],
)
def test_resume_under_two_ranks_is_bit_identical(tmp_path, kw):
    mp.spawn(_resume_worker, args=(free_port(), str(tmp_path), kw), nprocs=2, join=True)
    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert a["step"] == b["step"] == 1618 // 64
    for part in ("model", "ema") if kw.get("ema_decay") else ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume under 2 ranks"
    for r in range(2):  # every rank's RNG stream continued exactly
        assert torch.equal(a["rng"]["ranks"][r]["torch_rng"], b["rng"]["ranks"][r]["torch_rng"])
    straight = vitkit.from_pretrained(tmp_path / "straight" / "model.safetensors").state_dict()
    resumed = vitkit.from_pretrained(tmp_path / "resumed" / "model.safetensors").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
