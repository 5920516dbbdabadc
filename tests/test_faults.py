"""Faults in the middle of training, as real subprocesses of `vitkit train` on the built-in digits data (seconds).

- SIGKILL at a random moment, then rerun the command: the final weights equal those of an uninterrupted run.
- SIGKILL while the checkpoint is being written (paused just before its fsync): the previous checkpoint is intact,
  loads, and the resumed run still ends bit-identical.
- The disk fills up (ENOSPC) while writing a checkpoint (or the final model): the run stops with one clear line
  naming the file, exit code 1, no traceback, and the last good checkpoint is kept; rerunning resumes from it.
- NaN/Inf losses: each bad step is skipped with a warning; a run that keeps diverging stops with a clear error.

Faults are injected by a small driver (below) that patches `os.fsync` / the model's forward in the child process and
then calls `vitkit.cli.main`; vitkit itself carries no test hooks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitkit.train.checkpoint import load_checkpoint

DRIVER = textwrap.dedent(
    '''
    """Run `vitkit ARGS...` with the fault named in $VITKIT_FAULT injected into this process."""
    import errno, os, sys, time

    fault, _, arg = os.environ.get("VITKIT_FAULT", "").partition(":")
    marker = os.environ.get("VITKIT_FAULT_MARKER", "")
    target = os.environ.get("VITKIT_FAULT_FILE", "last.ckpt")
    real_fsync = os.fsync
    writes = 0

    def fsync(fd):
        global writes
        if f".{target}." in os.readlink(f"/proc/self/fd/{fd}"):  # the temp file of `target` being written
            writes += 1
            if fault.endswith("ckpt-write") and writes == int(arg):
                if fault == "pause-ckpt-write":  # the data is written but not yet synced or renamed: wait to die
                    open(marker, "w").close()
                    time.sleep(3600)
                if fault == "enospc-ckpt-write":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    os.fsync = fsync

    slow = float(os.environ.get("VITKIT_SLOW_STEP", "0"))  # seconds of sleep per training forward
    if fault == "nan-forward" or slow:
        from vitkit.model.vit import VisionTransformer

        bad_calls = {int(i) for i in arg.split(",")} if fault == "nan-forward" else set()
        real_forward = VisionTransformer.forward
        calls = 0

        def forward(self, *a, **kw):  # these training forward calls return NaN logits
            global calls
            out = real_forward(self, *a, **kw)
            if self.training:
                calls += 1
                time.sleep(slow)
                if calls in bad_calls:
                    return out * float("nan")
            return out

        VisionTransformer.forward = forward

    from vitkit.cli import main

    sys.exit(main(sys.argv[1:]))
    '''
)

STEPS_PER_EPOCH = 1618 // 64  # digits: 1618 training images after the 10 % validation split


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    (root / "driver.py").write_text(DRIVER)
    return root


def train_args(work: Path, out: Path, epochs: int = 2, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        "digits",
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--ema-decay",
        "0.9",
        "--checkpoint-every",
        "5",
        "--threads",
        "1",
        "--no-progress",
        "--cache-dir",
        str(work / "cache"),
        "--out",
        str(out),
        *extra,
    ]


def launch(work: Path, args: list[str], fault: str = "", marker: Path | None = None, **env_extra) -> subprocess.Popen:
    env = {**os.environ, "VITKIT_FAULT": fault, "VITKIT_FAULT_MARKER": str(marker or ""), "PYTHONUNBUFFERED": "1"}
    env.update(env_extra)
    env.pop("VITKIT_DECODE_WORKERS", None)
    return subprocess.Popen(
        [sys.executable, str(work / "driver.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="backslashreplace",
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(work: Path, args: list[str], fault: str = "", **env_extra) -> tuple[int, str, str]:
    return finish(launch(work, args, fault, **env_extra))


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the fault point:\n{out}\n{err}")
        assert time.monotonic() < deadline, "timed out waiting for the run to reach the fault point"
        time.sleep(0.02)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after the fault + resume: {different[:5]}"


@pytest.fixture(scope="module")
def baseline(work) -> dict[str, torch.Tensor]:
    """The uninterrupted run every faulted run is compared with."""
    rc, out, err = run(work, train_args(work, work / "baseline"))
    assert rc == 0, out + err
    return final_weights(work / "baseline")


def checkpoint_step(out: Path) -> int:
    return int(load_checkpoint(out / "last.ckpt")["step"])


@pytest.mark.timeout(180)
def test_sigkill_during_training_then_resume_gives_identical_weights(work, baseline):
    out = work / "killed"
    proc = launch(work, train_args(work, out), VITKIT_SLOW_STEP="0.03")  # >= 1.5 s from step 5 to the end
    wait_for(lambda: (out / "last.ckpt").exists(), proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # somewhere in the middle of the run
    kill(proc)
    assert not (out / "model.safetensors").exists(), "the run finished before the kill; the test proves nothing"
    step = checkpoint_step(out)  # the checkpoint on disk is whole
    assert 5 <= step < 2 * STEPS_PER_EPOCH
    rc, stdout, err = run(work, train_args(work, out))
    assert rc == 0, stdout + err
    assert "resum" in (stdout + err).lower()
    assert_same_weights(final_weights(out), baseline)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_stops_with_exit_130_and_a_whole_checkpoint(work):
    out = work / "interrupted"
    proc = launch(work, train_args(work, out), VITKIT_SLOW_STEP="0.03")
    wait_for(lambda: (out / "last.ckpt").exists(), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rc, stdout, err = finish(proc)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, stdout + err
    assert 5 <= checkpoint_step(out) < 2 * STEPS_PER_EPOCH


@pytest.mark.timeout(180)
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(work, baseline):
    out, marker = work / "killed_in_write", work / "in_write"
    proc = launch(work, train_args(work, out), fault="pause-ckpt-write:3", marker=marker)  # the write at step 15
    wait_for(marker.exists, proc)
    kill(proc)
    temps = [p.name for p in out.iterdir() if p.name.startswith(".last.ckpt.")]
    assert temps, "the kill did not land inside the checkpoint write"
    assert checkpoint_step(out) == 10, "the previous checkpoint (step 10) must be intact and load"
    rc, stdout, err = run(work, train_args(work, out))
    assert rc == 0, stdout + err
    assert_same_weights(final_weights(out), baseline)
    assert not list(out.glob(".last.ckpt.*")), "the killed writer's temp file was not cleaned up"


@pytest.mark.timeout(180)
def test_disk_full_during_a_checkpoint_write_stops_cleanly(work):
    out = work / "disk_full"
    rc, stdout, err = run(work, train_args(work, out), fault="enospc-ckpt-write:3")
    assert rc == 1, stdout + err
    assert "Traceback" not in err, err
    assert "No space left on device" in err and "could not write checkpoint" in err and "intact" in err, err
    assert str(out / "last.ckpt") in err
    assert not [p for p in out.iterdir() if p.name.startswith(".last.ckpt.")], "a temp file was left behind"
    assert checkpoint_step(out) == 10 and not (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_disk_full_at_the_final_model_save_names_the_file_and_a_rerun_finishes(work):
    out = work / "disk_full_at_save"
    args = train_args(work, out, 1)
    rc, stdout, err = run(work, args, fault="enospc-ckpt-write:1", VITKIT_FAULT_FILE="model.safetensors")
    assert rc == 1 and "Traceback" not in err, stdout + err
    assert f"No space left on device: '{out / 'model.safetensors'}'" in err, err
    assert not (out / "model.safetensors").exists() and not list(out.glob(".model.safetensors.*"))
    assert checkpoint_step(out) == STEPS_PER_EPOCH  # the finished run's checkpoint is whole
    rc, stdout, err = run(work, args)
    assert rc == 0 and (out / "model.safetensors").is_file(), stdout + err


@pytest.mark.timeout(120)
def test_nan_loss_steps_are_skipped_with_a_warning(work):
    out = work / "nan_skipped"
    rc, stdout, err = run(work, train_args(work, out, 1), fault="nan-forward:3,4,9")
    assert rc == 0, stdout + err
    assert err.count("non-finite loss or gradient; step skipped") == 3, err
    assert "(2/5 in a row)" in err  # calls 3 and 4 are consecutive steps
    assert "Traceback" not in err
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") is None or r["loss"] == r["loss"] for r in logged), "a NaN loss reached the log"
    weights = final_weights(out)
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.timeout(120)
def test_nan_loss_many_in_a_row_stops_the_run_with_a_clear_error(work):
    out = work / "nan_diverged"
    rc, stdout, err = run(work, train_args(work, out, 1), fault="nan-forward:" + ",".join(map(str, range(7, 20))))
    assert rc == 1, stdout + err
    assert "Traceback" not in err, err
    assert "vitkit train: error: the loss was NaN/Inf for 5 steps in a row at step 6" in err, err
    assert err.count("step skipped") == 5
    assert checkpoint_step(out) == 5  # the last good checkpoint is kept, with finite weights
    state = load_checkpoint(out / "last.ckpt")["model"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_real_divergence_from_a_huge_learning_rate_stops_the_run(work):
    out = work / "diverged"
    rc, stdout, err = run(work, train_args(work, out, 1, "--lr", "1e12", "--precision", "fp32"))
    assert rc == 1, stdout + err
    assert "Traceback" not in err, err
    assert "NaN/Inf for 5 steps in a row" in err and "lower --lr" in err, err
