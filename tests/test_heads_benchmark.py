"""benchmarks/heads.py's multi-label mosaics, its classifier reuse and its options (the runs themselves are the
lead's: `benchmarks/heads.py --quick` checks them end to end)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vitkit.data.multilabel import load_multilabel

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
CLASSES = [f"class{i}" for i in range(10)]


def _heads():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `machine`
    try:
        spec = importlib.util.spec_from_file_location("heads_mosaics_under_test", BENCH / "heads.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _flat_photos(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(photos (n, 32, 32, 3), labels, colours): photo i is one flat colour of its own, its class i % 10."""
    colours = np.array([[7 + 11 * i, 250 - 9 * i, 3 + 5 * i] for i in range(n)], np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (n, 32, 32, 3)).copy(), np.arange(n) % 10, colours


def test_mosaics_are_labelled_with_exactly_the_photos_shown(tmp_path):
    heads = _heads()
    photos, labels, colours = _flat_photos(23)
    n = heads.write_mosaics(tmp_path / "m", photos, labels, CLASSES, seed=0)
    ds = load_multilabel(str(tmp_path / "m"), cache_dir=tmp_path / "cache", progress=False, classes=CLASSES)
    assert len(ds) == n and 23 / 4 <= n <= 23 and ds.images.shape[1:] == (heads.CANVAS, heads.CANVAS, 3)
    shown = []
    for image, target in zip(ds.images, ds.labels):
        cells = [image[r : r + 32, c : c + 32] for r in (0, 32) for c in (0, 32)]
        here = [i for cell in cells for i, colour in enumerate(colours) if (cell == colour).all()]
        assert 1 <= len(here) <= 4
        assert np.flatnonzero(target).tolist() == sorted({int(labels[i]) for i in here})  # no label without its photo
        shown += here
    assert sorted(shown) == list(range(23))  # every photo in exactly one mosaic


def test_a_mosaic_refuses_photos_that_do_not_fit_its_cells():
    heads = _heads()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at most 4"):
        heads.mosaic([np.zeros((32, 32, 3), np.uint8)] * 5, rng)
    with pytest.raises(ValueError, match="32 x 32"):
        heads.mosaic([np.zeros((30, 32, 3), np.uint8)], rng)


def test_task_sets_take_their_validation_photos_from_every_class_and_none_of_the_classifiers():
    heads = _heads()
    labels = np.repeat(np.arange(10), 50)  # stored class by class, as an ImageFolder archive is
    train, val = heads.task_photo_split(labels, photos_used=60, val_photos=20, seed=0)
    classifier = heads.archive_split(labels, seed=0)[0]
    assert len(train) == 40 and len(val) == 20
    assert not set(train) & set(val) and not (set(train) | set(val)) & set(classifier)
    assert len(set(labels[val])) >= 6 and len(set(labels[train])) >= 8  # not the archive's last classes only


def test_a_classifier_is_reused_only_with_the_same_settings_and_its_file(tmp_path):
    heads = _heads()
    settings = {"archive": "/a.tar.gz", "minutes": 10.0, "photos": 40_000, "seed": 0}
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    record = {"settings": settings, "path": str(model), "seconds": 612.0, "val_top1": 0.7}
    (tmp_path / "benchmark.json").write_text(json.dumps(record))
    assert heads.reusable_classifier(tmp_path, settings) == record
    assert heads.reusable_classifier(tmp_path, {**settings, "minutes": 5.0}) is None
    model.unlink()
    assert heads.reusable_classifier(tmp_path, settings) is None
    assert heads.reusable_classifier(tmp_path / "nothing-here", settings) is None


def test_quick_sizes_apply_where_no_flag_gives_one_and_bad_sizes_are_refused(capsys):
    heads = _heads()
    args = heads.parse_args(["--task", "all", "--quick", "--photos", "120"])
    assert args.tasks == ["segment", "multilabel"] and args.photos == 120
    assert args.minutes == heads.QUICK["minutes"] and args.work == "runs/bench-heads-quick"
    assert heads.parse_args([]).minutes == heads.FULL["minutes"]
    with pytest.raises(SystemExit):
        heads.parse_args(["--quick", "--photos", "50", "--val-photos", "50"])
    assert "--val-photos < --photos" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        heads.parse_args(["--heads", "linear,fpn"])
    assert "fpn" in capsys.readouterr().err
