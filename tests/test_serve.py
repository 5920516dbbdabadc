"""`vitkit serve` API: predictions, overlays, health, the page, and every kind of bad input answered cleanly
(413 / 415 / 400 / 422) with the server still working afterwards; micro-batching; the missing-extra message."""

import asyncio
import io
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from vitkit.infer.predict import Predictor  # noqa: E402
from vitkit.serve import create_app  # noqa: E402
from vitkit.serve.batcher import Batcher  # noqa: E402

from .badinput import png_bomb  # noqa: E402
from .conftest import noise_png, png_bytes, tiny_model  # noqa: E402

LABELS = ["cat", "dog", "car", "ship", "frog"]
LIMIT = 200_000  # bytes per request body in these tests


def blocks_png(seed: int) -> bytes:
    """A flat colour with one block of another colour: images this tiny model tells apart clearly."""
    r = np.random.RandomState(seed)
    a = np.zeros((40, 56, 3), np.uint8)
    a[:] = r.randint(0, 256, 3)
    y, x = r.randint(0, 30, 2)
    a[y : y + 12, x : x + 20] = r.randint(0, 256, 3)
    return png_bytes(a)


def real_bomb() -> bytes:
    """A genuinely valid 3000 x 3000 PNG (9 MP) that compresses to a few KB: over the 2 MP limit used here."""
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = tiny_model("vit_small_patch16_224", reg_tokens=1, labels=LABELS)
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident, distinct predictions (a fresh head gives ~uniform ones)
    return model.save(tmp_path_factory.mktemp("serve") / "tiny.safetensors")


@pytest.fixture(scope="module")
def client(model_path):
    app = create_app(Predictor(model_path, max_pixels=2_000_000), max_upload_bytes=LIMIT, max_batch=4)
    with TestClient(app) as c:
        yield c


def post(client, path, data, name="x.png", ctype="image/png", **params):
    return client.post(path, files={"file": (name, data, ctype)}, params=params)


def assert_still_works(client):
    r = post(client, "/predict", noise_png(seed=7))
    assert r.status_code == 200, r.text


def test_predict_returns_topk_labels_and_probabilities(client):
    r = post(client, "/predict", noise_png(), name="photo.png", topk=3)
    assert r.status_code == 200
    body = r.json()
    assert body["image"] == "photo.png"
    assert [t["label"] for t in body["top"]] == [LABELS[t["index"]] for t in body["top"]]
    probs = [t["prob"] for t in body["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    full = post(client, "/predict", noise_png(), topk=5).json()
    assert sum(t["prob"] for t in full["top"]) == pytest.approx(1.0, abs=1e-4)


def by_index(top):
    return np.array([t["prob"] for t in sorted(top, key=lambda t: t["index"])])


def test_predict_matches_the_python_api(client, model_path):
    data = noise_png(seed=3)
    served = post(client, "/predict", data).json()["top"]
    local = Predictor(model_path).predict_one(data, topk=5)
    assert np.allclose(by_index(served), by_index(local.to_dict()["top"]), atol=1e-3)


@pytest.mark.parametrize(
    "params",
    [{}, {"method": "rollout", "discard": 0.9}, {"head": "all"}, {"head": "2", "layer": "0"}, {"figure": "true"}],
)
def test_explain_returns_a_png(client, params):
    r = post(client, "/explain", noise_png(), **params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and min(img.size) >= 100
    raw = r.headers["x-vitkit-map"]
    assert re.fullmatch(r"(?:[^%]|%[0-9A-F]{2})*", raw)  # valid for the page's decodeURIComponent
    caption = unquote(raw)
    assert "register token left out" in caption
    assert ("lowest 90% discarded" in caption) == ("discard" in params)
    assert unquote(r.headers["x-vitkit-top"]).split(" ")[0] in LABELS


def test_healthz_and_page(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["labels"] == LABELS
    assert h["model"]["input_size"] == [32, 32] and h["max_batch"] == 4
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needed in ('id="file"', 'id="bars"', 'id="overlay"', "/predict", "/explain"):
        assert needed in html
    assert "http://" not in html and "https://" not in html  # self-contained: no CDN, works offline
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_body_over_the_limit_is_413_by_header(client):
    r = post(client, "/predict", b"\0" * (LIMIT + 1))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert_still_works(client)


def test_body_over_the_limit_is_413_while_streaming(client):
    def chunks():  # chunked transfer: no Content-Length to check, the counted bytes must trip the limit
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for _ in range(50):
            yield b"\0" * 10_000

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert_still_works(client)


@pytest.mark.parametrize(
    "name,data,status,phrase",
    [
        ("notes.txt", b"hello, I am text\n" * 20, 415, "not an image"),
        ("page.jpg", b"<!doctype html><html><body>hi</body></html>", 415, "not an image"),
        ("empty.png", b"", 400, "empty"),
        ("truncated.png", noise_png()[:300], 400, "truncated"),
        ("bomb.png", png_bomb(), 413, "decompression bomb"),  # ~100 bytes declaring 100,000 x 100,000 pixels
        ("zeros.png", real_bomb(), 413, "decompression bomb"),
    ],
)
def test_bad_images_are_refused_with_a_message(client, name, data, status, phrase):
    r = post(client, "/predict", data, name=name)
    assert r.status_code == status, r.text
    assert name in r.json()["detail"] and phrase in r.json()["detail"]
    r = post(client, "/explain", data, name=name)
    assert r.status_code == status
    assert_still_works(client)


def test_missing_field_and_bad_options_are_422(client):
    assert client.post("/predict").status_code == 422
    assert client.post("/predict", data={"other": "x"}).status_code == 422
    assert client.post("/predict", files={"image": ("x.png", noise_png(), "image/png")}).status_code == 422
    assert post(client, "/predict", noise_png(), topk=0).status_code == 422
    r = post(client, "/explain", noise_png(), layer=9)
    assert r.status_code == 422 and "layer 9 does not exist" in r.json()["detail"]
    assert post(client, "/explain", noise_png(), method="gradcam").status_code == 422
    assert post(client, "/explain", noise_png(), head="all", method="rollout").status_code == 422
    assert_still_works(client)


def test_upload_file_name_is_sanitised(client):
    r = post(client, "/predict", b"junk", name="../../etc/<script>.png")
    assert r.status_code == 415
    assert "<script>" not in r.json()["detail"] and "_script_.png" in r.json()["detail"]


def test_concurrent_requests_all_answered_correctly(client, model_path):
    images = [blocks_png(s) for s in range(12)]
    local = [by_index(p.to_dict()["top"]) for p in Predictor(model_path).predict(images, topk=5)]
    gaps = [np.abs(a - b).max() for i, a in enumerate(local) for b in local[i + 1 :]]
    assert min(gaps) > 0.01  # the images are told apart, so a mixed-up answer would show
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda im: post(client, "/predict", im).json()["top"], images))
    for s, p in zip(served, local):  # each answer belongs to its own image
        assert np.allclose(by_index(s), p, atol=1e-3)
    stats = client.get("/healthz").json()
    assert stats["requests_run"] >= 12 and stats["waiting"] == 0


def test_batcher_groups_waiting_requests_and_survives_errors():
    calls = []

    def handler_for(kind):
        def run(items):
            calls.append((kind, list(items)))
            if kind == "boom":
                raise RuntimeError("model exploded")
            return [x * 10 for x in items]

        return run

    async def scenario():
        b = Batcher(handler_for, max_batch=4)
        await b.start()
        out = await asyncio.gather(*(b.submit("predict", i) for i in range(6)))
        with pytest.raises(RuntimeError, match="exploded"):
            await b.submit("boom", 1)
        after = await b.submit("predict", 7)
        await b.stop()
        return out, after

    out, after = asyncio.run(scenario())
    assert out == [0, 10, 20, 30, 40, 50] and after == 70
    assert calls[0] == ("predict", [0, 1, 2, 3]) and calls[1] == ("predict", [4, 5])  # batches up to max_batch


def test_missing_extra_names_the_install_command(monkeypatch):
    import builtins

    from vitkit.serve import require_serve_extra

    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("No module named 'uvicorn'", name="uvicorn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    with pytest.raises(ImportError, match=r"pip install 'vitkit\[serve\]'.*uvicorn"):
        require_serve_extra()


def test_serve_with_the_compiled_backend_compiles_before_listening(model_path, monkeypatch, capsys):
    """`vitkit serve --backend torch-compile` runs batch 1 and 2 through the compiled model before uvicorn starts,
    so no request waits for the compiler; the app it hands to uvicorn answers like the eager one."""
    import uvicorn

    from vitkit.cli import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve", str(model_path), "--backend", "torch-compile", "--port", "8123"]) == 0
    assert "compiling the model" in capsys.readouterr().out and served["port"] == 8123
    with TestClient(served["app"]) as client:
        r = client.post("/predict", files={"file": ("a.png", noise_png(), "image/png")})
    assert r.status_code == 200 and r.json()["top"][0]["label"] in LABELS
