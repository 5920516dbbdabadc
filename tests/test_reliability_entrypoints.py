"""The bad-input corpus through every entry point: `vitkit predict`, `vitkit explain`, the dataset loader,
`vitkit train` on a folder full of bad files, and the HTTP server.

Good files give a result; bad ones a clear message naming the file and the reason; the batch, the epoch and the
server carry on. The CLI runs as a real subprocess with a strict UTF-8 stdout (as on an en_US.UTF-8 terminal), so a
file name that is not UTF-8 must not crash the printing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vitkit.data.decode import display_name
from vitkit.data.loader import BatchLoader
from vitkit.data.sources import load_source

from .badinput import NON_UTF8_NAME, make_cases, write_corpus
from .conftest import run_vitkit, tiny_model

CASES = make_cases()
GOOD = [c for c in CASES if c.ok]
BAD = [c for c in CASES if not c.ok]
LABELS = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_model(num_classes=3, labels=LABELS).save(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def good_paths(corpus: Path) -> list[Path]:
    return [corpus / "good" / c.name for c in GOOD] + [corpus / "good" / NON_UTF8_NAME]


def bad_paths(corpus: Path) -> list[tuple[Path, str]]:
    """(path, reason regex) for each file that must be refused, links and directories included."""
    return [(corpus / "bad" / c.name, c.reason) for c in BAD] + [
        (corpus / "bad" / "loop.jpg", "symbolic links"),
        (corpus / "bad" / "dir.jpg", "directory"),
        (corpus / "missing.jpg", "does not exist"),
    ]


def vitkit_cli(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI with a strict UTF-8 stdout (printing a surrogate would raise); bytes arguments: any name survives."""
    env = {"PYTHONIOENCODING": "utf-8:strict"}
    return run_vitkit([os.fsencode(a) for a in args], cwd=cwd, env=env, timeout=timeout, text=False)


def text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def assert_each_bad_file_named(stderr: str, root: Path, verb: str) -> None:
    for path, reason in bad_paths(root):
        line = next((ln for ln in stderr.splitlines() if f"'{path}'" in ln), None)
        assert line is not None, f"{path.name} is not named in:\n{stderr}"
        assert line.startswith(f"vitkit {verb}: image"), line
        assert re.search(reason, line, re.IGNORECASE), f"{line!r} does not give the reason /{reason}/"


@pytest.mark.timeout(120)
def test_predict_cli_on_the_corpus(corpus, checkpoint):
    args = ["predict", checkpoint, *good_paths(corpus), *[p for p, _ in bad_paths(corpus)], "--topk", "2"]
    r = vitkit_cli(args, corpus)
    out, err = text(r.stdout), text(r.stderr)
    assert r.returncode == 1, err  # 1: some images failed, the rest were predicted
    assert "Traceback" not in err, err
    for path in good_paths(corpus):
        shown = display_name(str(path))
        line = next((ln for ln in out.splitlines() if ln.startswith(shown + ":")), None)
        assert line is not None and re.search(r": (cat|dog|ship) \d+\.\d%, (cat|dog|ship) \d+\.\d%$", line), out
    assert_each_bad_file_named(err, corpus, "predict")
    total = len(good_paths(corpus)) + len(bad_paths(corpus))
    assert f"{len(bad_paths(corpus))} of {total} image(s) failed" in err


@pytest.mark.timeout(120)
def test_explain_cli_on_the_corpus(corpus, checkpoint, tmp_path):
    images = good_paths(corpus) + [p for p, _ in bad_paths(corpus)]
    r = vitkit_cli(["explain", checkpoint, *images, "-o", tmp_path / "maps", "--size", "48"], corpus)
    err = text(r.stderr)
    assert r.returncode == 1 and "Traceback" not in err, err
    assert_each_bad_file_named(err, corpus, "explain")
    assert len(list((tmp_path / "maps").glob("*.png"))) == len(good_paths(corpus))


@pytest.mark.timeout(60)
def test_dataset_loader_skips_and_names_bad_files_and_the_epoch_goes_on(corpus, tmp_path):
    os.mkfifo(corpus / "bad" / "fifo.png")  # would block a plain open() forever
    try:
        for attempt in ("decoded", "from cache"):
            ds = load_source(str(corpus), cache_dir=tmp_path, image_size=16, progress=False)
            assert len(ds) == len(good_paths(corpus)), attempt
            assert ds.images.shape[1:] == (16, 16, 3)
            skipped = {name: reason for name, reason in ds.skipped}
            expected = {f"bad/{c.name}" for c in BAD} | {"bad/loop.jpg", "bad/fifo.png"}
            assert set(skipped) == expected, attempt
            for c in BAD:
                assert re.search(c.reason, skipped[f"bad/{c.name}"], re.IGNORECASE), skipped[f"bad/{c.name}"]
            assert "not a regular file" in skipped["bad/fifo.png"]
        seen = [y for _, y in BatchLoader(ds, None, batch_size=4, shuffle=True, drop_last=False)]
        assert sum(len(y) for y in seen) == len(ds)  # a whole epoch over what was readable
    finally:
        (corpus / "bad" / "fifo.png").unlink()


@pytest.mark.timeout(120)
def test_train_cli_on_a_folder_with_bad_files(corpus, tmp_path):
    data = tmp_path / "data"
    for cls in ("a", "b"):  # both classes get every good and every bad file
        shutil.copytree(corpus / "good", data / cls, symlinks=True)
        for c in BAD:
            (data / cls / c.name).write_bytes(c.data)
    args = ["train", "--data", data, "--epochs", "1", "--image-size", "16", "--batch-size", "8", "--val-split", "0.2"]
    args += ["--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", "--no-progress", "--threads", "1"]
    r = vitkit_cli(args, tmp_path)
    out, err = text(r.stdout), text(r.stderr)
    assert r.returncode == 0 and "Traceback" not in err, out + err
    assert f"skipped {2 * len(BAD)} unreadable file(s)" in out, out
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def client(checkpoint):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from vitkit.infer.predict import Predictor
    from vitkit.serve import create_app

    with TestClient(create_app(Predictor(checkpoint))) as c:
        yield c


def post(client, route: str, case_name: str, data: bytes):
    return client.post(route, files={"file": (case_name, data, "application/octet-stream")})


@pytest.mark.timeout(120)
def test_server_answers_every_corpus_file_and_stays_up(client):
    for case in CASES:
        for route in ("/predict", "/explain"):
            r = post(client, route, case.name, case.data)
            if case.ok:
                assert r.status_code == 200, (case.name, route, r.text)
                if route == "/predict":
                    assert r.json()["top"][0]["label"] in LABELS
                else:
                    assert r.headers["content-type"] == "image/png"
            else:
                assert r.status_code in (400, 413, 415), (case.name, route, r.status_code, r.text)
                detail = r.json()["detail"]
                assert case.name in detail and re.search(case.reason, detail, re.IGNORECASE), detail
            assert client.get("/healthz").json()["status"] == "ok"
    weird = post(client, "/predict", "caf\u00e9 \u2603 ../../etc/passwd", GOOD[0].data)
    assert weird.status_code == 200 and "/" not in weird.json()["image"]
    empty = client.post("/predict", files={})
    assert empty.status_code == 422
    assert np.isfinite([t["prob"] for t in post(client, "/predict", "x.png", GOOD[1].data).json()["top"]]).all()
