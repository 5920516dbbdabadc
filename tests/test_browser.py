"""The web page in a real browser: Playwright drives Debian's Chromium against `vitkit serve` on loopback.

Uploads an image through the file input and checks that the top-k bars and the attention overlay appear, then
that a non-image gives a readable error and the page recovers; against a server with an API key, that the page asks
for the key on the first 401, asks again when it is refused, and keeps it for the tab. The screenshot goes to
runs/browser/ (printed).
Without /usr/bin/chromium the test is skipped with the install command, except in CI (CI=true), where it fails.
"""

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vitkit.infer.predict import Predictor

from .conftest import tiny_model

CHROMIUM = os.environ.get("VITKIT_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_DIR = Path(os.environ.get("VITKIT_SCREENSHOT_DIR", ROOT / "runs" / "browser"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run; .ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[dev]'")
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} not found; install it with: sudo apt-get install -y chromium")
    return sync_playwright


@contextmanager
def running_server(app):
    """uvicorn in a thread on a free loopback port (the socket is bound first, so no port race)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def scene(path: Path) -> Path:
    """A small picture with structure: sky, ground, a sun and a house."""
    img = Image.new("RGB", (320, 240), (120, 170, 230))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 170, 320, 240], fill=(70, 140, 60))
    d.ellipse([230, 25, 290, 85], fill=(250, 210, 60))
    d.rectangle([60, 110, 160, 180], fill=(180, 60, 50))
    d.polygon([(50, 112), (110, 60), (170, 112)], fill=(90, 50, 40))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
    from vitkit.serve import create_app

    labels = ["house", "tree", "sun", "lake", "mountain"]
    model = tiny_model("vit_small_patch16_224", img_size=64, reg_tokens=1, labels=labels)
    with torch.no_grad():
        model.head.weight.mul_(30)  # random weights, but confident enough that the bars differ
    path = model.save(tmp_path_factory.mktemp("browser") / "tiny.safetensors")
    with running_server(create_app(Predictor(path))) as url:
        yield url


def test_page_shows_bars_and_overlay(sync_playwright, server_url, tmp_path):
    image = scene(tmp_path / "house.png")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a picture\n" * 5)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server_url + "/")
            page.wait_for_function("() => document.getElementById('model').textContent.includes('classes')")

            page.set_input_files("#file", str(image))
            page.wait_for_selector("#bars .bar-row >> nth=4", timeout=30_000)
            page.wait_for_function(
                "() => { const o = document.getElementById('overlay'); return o.complete && o.naturalWidth > 0; }",
                timeout=30_000,
            )
            page.wait_for_function("() => document.getElementById('status').textContent === 'Done.'")
            labels = page.locator("#bars .bar-label").all_text_contents()
            assert len(labels) == 5 and set(labels) == {"house", "tree", "sun", "lake", "mountain"}
            pcts = [float(t.rstrip("%")) for t in page.locator("#bars .bar-pct").all_text_contents()]
            assert pcts == sorted(pcts, reverse=True) and abs(sum(pcts) - 100) < 1
            page.wait_for_timeout(500)  # let the bars finish growing before measuring and the screenshot
            width = page.eval_on_selector("#bars .bar", "b => b.getBoundingClientRect().width")
            assert width > 10
            assert page.eval_on_selector("#preview", "i => i.naturalWidth") == 320
            assert "register token left out" in page.text_content("#map-caption")
            assert page.is_visible("#overlay") and page.is_visible("#preview")
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOT_DIR / "screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nbrowser screenshot: {shot}")
            assert Image.open(shot).size[0] >= 1000

            # a non-image: a readable error, then the page still works
            page.set_input_files("#file", str(junk))
            page.wait_for_selector("#status.error")
            assert "not an image" in page.text_content("#status")
            page.set_input_files("#file", str(image))
            page.wait_for_function("() => document.getElementById('status').textContent === 'Done.'")
            assert page.locator("#bars .bar-row").count() == 5
            assert errors == [], errors
        finally:
            browser.close()


def test_scene_is_not_blank(tmp_path):
    """The test picture has structure (a flat image would make a useless screenshot)."""
    a = np.asarray(Image.open(scene(tmp_path / "s.png")))
    assert len(np.unique(a.reshape(-1, 3), axis=0)) >= 5


@pytest.fixture(scope="module")
def segment_server_url(tmp_path_factory):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
    from vitkit.serve import create_app
    from vitkit.tasks import SegmentTask

    model = tiny_model("vit_small_patch16_224", img_size=64, labels=["sky", "grass", "roof"], num_classes=3)
    SegmentTask(head="pyramid").attach(model)
    with torch.no_grad():
        model.head.classify.weight.mul_(50)  # random weights, but decisive: several classes show up
    path = model.save(tmp_path_factory.mktemp("browser-seg") / "seg.safetensors")
    with running_server(create_app(Predictor(path))) as url:
        yield url


def test_page_shows_the_segmentation_overlay(sync_playwright, segment_server_url, tmp_path):
    image = scene(tmp_path / "house.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(segment_server_url + "/")
            page.wait_for_function("() => document.getElementById('model').textContent.includes('segmentation')")
            assert not page.is_visible("#method") and not page.is_visible("#head")  # attention maps do not apply

            page.set_input_files("#file", str(image))
            page.wait_for_function("() => document.getElementById('status').textContent === 'Done.'", timeout=30_000)
            page.wait_for_function(
                "() => { const o = document.getElementById('overlay'); return o.complete && o.naturalWidth > 0; }"
            )
            assert page.eval_on_selector("#overlay", "i => [i.naturalWidth, i.naturalHeight]") == [320, 240]
            assert page.text_content("#results .card:nth-child(2) h2") == "What each pixel is"
            labels = page.locator("#bars .bar-label").all_text_contents()
            assert labels and set(labels) <= {"sky", "grass", "roof"}
            pcts = [float(t.rstrip("%")) for t in page.locator("#bars .bar-pct").all_text_contents()]
            assert pcts == sorted(pcts, reverse=True) and abs(sum(pcts) - 100) < 1  # shares of the whole image
            colours = page.eval_on_selector_all("#bars .bar", "bs => bs.map((b) => b.style.background)")
            voc = {"sky": "rgb(0, 0, 0)", "grass": "rgb(128, 0, 0)", "roof": "rgb(0, 128, 0)"}  # the mask's palette
            assert colours == [voc[name] for name in labels]
            page.wait_for_timeout(500)  # let the bars finish growing before the screenshot
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOT_DIR / "segmentation.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nbrowser screenshot: {shot}")
            assert errors == [], errors
        finally:
            browser.close()


API_KEY = "browser-test-key_0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_server_url(tmp_path_factory):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
    from vitkit.serve import create_app

    model = tiny_model("vit_small_patch16_224", labels=["house", "tree", "sun", "lake", "mountain"])
    path = model.save(tmp_path_factory.mktemp("browser-key") / "tiny.safetensors")
    with running_server(create_app(Predictor(path), api_key=API_KEY)) as url:
        yield url


def test_page_asks_for_the_key_once_and_keeps_it_for_the_tab(sync_playwright, keyed_server_url, tmp_path):
    image = scene(tmp_path / "house.png")
    done = "() => document.getElementById('status').textContent === 'Done.'"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            page.goto(keyed_server_url + "/")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#key-dialog[open]")  # /predict and /explain were refused: one dialog for both
            page.fill("#key", "not-the-key")
            page.click("#key-dialog button[value=ok]")
            page.wait_for_function("() => document.getElementById('key-note').textContent.includes('refused')")
            page.fill("#key", API_KEY)
            page.click("#key-dialog button[value=ok]")
            page.wait_for_function(done, timeout=30_000)
            assert page.locator("#bars .bar-row").count() == 5 and not page.is_visible("#key-dialog")
            assert page.evaluate("() => sessionStorage.getItem('vitkit-api-key')") == API_KEY

            page.reload()  # the same tab: the key is still there, no dialog
            page.set_input_files("#file", str(image))
            page.wait_for_function(done, timeout=30_000)
            assert not page.is_visible("#key-dialog") and page.locator("#bars .bar-row").count() == 5
        finally:
            browser.close()
