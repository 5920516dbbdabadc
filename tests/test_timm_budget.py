"""benchmarks/cifar10_budget.py --peer timm: timm's own ViT with timm's defaults on the same data, split and clock
(the runs themselves are the lead's; these check that a tiny one completes, reports and saves what it trained)."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

import vitkit

from .conftest import make_image_folder, run_python

pytest.importorskip("timm")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _timm_budget():
    sys.path.insert(0, str(BENCH))  # the script imports its siblings
    try:
        spec = importlib.util.spec_from_file_location("timm_budget_under_test", BENCH / "timm_budget.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def folder(tmp_path):
    """150 images of 16 px (4 x 4 patches: a cheap step) in 3 classes: 135 train (one batch of 128), 15 held out."""
    return make_image_folder(tmp_path / "data", per_class=50, size=16)


def test_a_tiny_peer_run_trains_reports_top1_and_saves_a_folder_vitkit_loads(folder, tmp_path, capsys):
    peer = _timm_budget()
    saved = peer.run_timm_peer(str(folder), "test_vit", 0.01, tmp_path / "out", 0, 0.1, str(tmp_path / "cache"))
    printed = capsys.readouterr().out
    assert "peer: timm" in printed and "test_vit" in printed and "lr 0.000125" in printed
    assert re.search(r"trained [1-9]\d* steps = [\d.]+ epochs in \d+ s of training \(\d+ img/s\)", printed)
    assert re.search(r"held-out 10% \(stratified, seed 0, 15 images\): top-1 \d+\.\d\d%", printed)
    model = vitkit.from_pretrained(saved, num_heads=2)  # the timm Hub folder (test_vit: a width vitkit cannot name)
    assert model.labels == ["blue", "green", "red"] and model.cfg.img_size == (16, 16)
    assert model.cfg.patch_size == (4, 4) and model.preprocess.input_size == (16, 16)


def test_the_cosine_warms_up_five_epochs_or_a_quarter_of_the_steps_that_fit_whichever_is_less():
    peer = _timm_budget()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    assert peer.lay_schedule(optimizer, 1000, steps_per_epoch=10).warmup_t == 50  # timm's 5 epochs
    schedule = peer.lay_schedule(optimizer, 100, steps_per_epoch=10)  # 5 epochs would be half the run
    assert schedule.warmup_t == 25
    lrs = [schedule._get_lr(t)[0] for t in (0, 25, 100)]  # timm's cosine counts the warmup in (no warmup_prefix)
    assert lrs[0] == pytest.approx(peer.WARMUP_LR) and lrs[1] == pytest.approx(1e-3 * 0.5 * (1 + 0.7071), rel=1e-3)
    assert lrs[2] == pytest.approx(peer.MIN_LR)


def test_too_few_images_for_one_batch_is_a_clear_error(tmp_path):
    peer = _timm_budget()
    small = make_image_folder(tmp_path / "small", per_class=10, size=16)
    with pytest.raises(ValueError, match="no full batch of 128"):
        peer.run_timm_peer(str(small), "test_vit", 0.01, tmp_path / "out", 0, 0.1, str(tmp_path / "cache"))


@pytest.mark.slow
def test_the_budget_script_runs_the_peer_arm(folder, tmp_path):
    args = ["--minutes", "0.05", "--peer", "timm", "--peer-model", "test_vit", "--data", str(folder)]
    args += ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    done = run_python([str(BENCH / "cifar10_budget.py"), *args])
    assert done.returncode == 0, done.stderr
    assert "held-out 10% (stratified, seed 0, 15 images): top-1" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "out" / "timm_model")


def test_the_budget_script_refuses_patch_dropout_for_the_peer(tmp_path):
    done = run_python([str(BENCH / "cifar10_budget.py"), "--peer", "timm", "--patch-drop", "0.25"])
    assert done.returncode == 2 and "--patch-drop" in done.stderr
