"""`vitkit pretrain` under torchrun (2 CPU processes, gloo): DDP trains encoder + decoder, rank 0 writes the files."""

import json

import torch

import vitkit
from vitkit.train.checkpoint import load_checkpoint

from .conftest import REPO, run_python


def test_torchrun_pretrain_digits_then_load_in_one_process(tmp_path):
    out = tmp_path / "run"
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitkit", "pretrain"]
    cmd += ["--data", "digits", "--epochs", "1", "--out", str(out), "--no-progress", "--batch-size", "128"]
    cmd += ["--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2", "--cache-dir", str(tmp_path / "c")]
    proc = run_python(cmd, cwd=REPO, env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("encoder: ") == 1  # rank 0 alone reports

    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["rng"]["world_size"] == 2 and ckpt["step"] == 1707 // 256  # 128 images per rank and step
    assert any(k.startswith("decoder.") for k in ckpt["model"])
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["val_loss"] > 0  # the held-out loss, summed over both ranks' shares
    encoder = vitkit.from_pretrained(out / "model.safetensors")  # one process, no process group
    with torch.no_grad():
        assert encoder(torch.zeros(2, 1, 8, 8)).shape == (2, 64)  # headless: the pooled features
    assert (out / "reconstruction.png").is_file()
