"""`vitkit serve` can say no: the API key (missing, wrong, right; a constant-time comparison; never echoed or logged),
the open /healthz, the per-client rate limit (429), the request timeout (504, the server goes on), the JSON access
log, the key's sources and their errors, and the refusal to listen beyond loopback without a key."""

import hmac
import importlib.util
import io
import json
import logging
import sys
import threading

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from vitkit.infer.predict import Predictor  # noqa: E402
from vitkit.serve import create_app  # noqa: E402
from vitkit.serve.accesslog import open_access_log  # noqa: E402
from vitkit.serve.auth import API_KEY_ENV, is_loopback, load_api_key  # noqa: E402
from vitkit.serve.limits import TokenBuckets, parse_rate  # noqa: E402

from .conftest import REPO, noise_png, run_python, tiny_model  # noqa: E402

KEY = "k3y-Of-The-Test-Server_0123456789"
WRONG = "guess-Not-The-Key_9876543210abcdef"
LOG_FIELDS = {"time", "client", "method", "endpoint", "status", "latency_ms"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model = tiny_model("vit_small_patch16_224", labels=["cat", "dog", "car", "ship", "frog"])
    return model.save(tmp_path_factory.mktemp("serve-auth") / "tiny.safetensors")


@pytest.fixture
def log_lines():
    """An access-log handler writing to memory, and a function returning what it holds so far, one dict a line."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler, lambda: [json.loads(line) for line in buf.getvalue().splitlines()], buf


@pytest.fixture
def keyed(model_path, log_lines):
    handler, _, _ = log_lines
    with TestClient(create_app(Predictor(model_path), api_key=KEY, access_log=handler)) as c:
        yield c


def predict(client, key=None, headers=None):
    headers = dict(headers or {}, **({"Authorization": f"Bearer {key}"} if key else {}))
    return client.post("/predict", files={"file": ("x.png", noise_png(), "image/png")}, headers=headers)


def test_missing_wrong_and_right_key(keyed):
    r = predict(keyed)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer") and r.headers["cache-control"] == "no-store"
    r = predict(keyed, headers={"Authorization": f"Basic {KEY}"})
    assert r.status_code == 401 and "must be 'Bearer <key>'" in r.json()["detail"]
    r = predict(keyed, WRONG)
    assert r.status_code == 401 and r.json()["detail"] == "the API key is not valid"
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert predict(keyed, KEY[:-1]).status_code == 401  # a prefix of the key is not the key
    assert predict(keyed, KEY).status_code == 200
    assert predict(keyed, headers={"Authorization": f"bearer   {KEY}"}).status_code == 200  # scheme: any case


def test_healthz_and_the_page_are_open_the_rest_is_not(keyed):
    assert keyed.get("/healthz").json()["status"] == "ok"
    assert keyed.get("/").status_code == 200  # the page must load to ask for the key
    for path in ("/openapi.json", "/docs", "/no-such-route"):
        assert keyed.get(path).status_code == 401, path
    assert keyed.post("/explain", files={"file": ("x.png", noise_png())}).status_code == 401
    with pytest.raises(WebSocketDisconnect) as closed, keyed.websocket_connect("/ws"):
        pass
    assert closed.value.code == 1008


def test_the_key_is_compared_by_hmac_compare_digest(keyed, monkeypatch):
    """The verdict is compare_digest's alone (no == beside it): told to say yes, a wrong key passes; told no, the
    right key fails; and it is handed the presented token and the key as bytes."""
    calls = []

    def spy(verdict):
        def compare(a, b):
            calls.append((a, b))
            return verdict

        return compare

    monkeypatch.setattr(hmac, "compare_digest", spy(True))
    assert predict(keyed, WRONG).status_code == 200
    monkeypatch.setattr(hmac, "compare_digest", spy(False))
    assert predict(keyed, KEY).status_code == 401
    assert calls == [(WRONG.encode(), KEY.encode()), (KEY.encode(), KEY.encode())]


def test_refusals_and_the_access_log_never_hold_the_key(keyed, log_lines):
    _, read_log, buf = log_lines
    answers = [
        predict(keyed, WRONG),
        predict(keyed),
        predict(keyed, headers={"Authorization": f"Token {KEY}"}),
        keyed.get(f"/predict/{KEY}"),  # a client that put the key in the path by mistake
        keyed.get(f"/predict?api_key={KEY}"),
        predict(keyed, KEY),
    ]
    assert [r.status_code for r in answers] == [401, 401, 401, 401, 401, 200]
    for r in answers[:-1]:
        shown = r.text + json.dumps(dict(r.headers))
        assert KEY not in shown and WRONG not in shown
    assert KEY not in buf.getvalue() and WRONG not in buf.getvalue()
    lines = read_log()
    assert [line["status"] for line in lines] == [401, 401, 401, 401, 401, 200]
    assert all(set(line) == LOG_FIELDS for line in lines)
    assert lines[3]["endpoint"] == "/predict/[redacted]" and lines[4]["endpoint"] == "/predict"
    assert lines[-1]["method"] == "POST" and lines[-1]["client"] == "testclient" and lines[-1]["latency_ms"] > 0


def test_access_log_file_has_one_json_line_per_request(model_path, tmp_path):
    path = tmp_path / "access.jsonl"
    handler = open_access_log(path)
    try:
        with TestClient(create_app(Predictor(model_path), access_log=handler)) as c:
            assert predict(c).status_code == 200 and c.get("/healthz").status_code == 200
            assert c.post("/predict").status_code == 422
    finally:
        handler.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["method"], x["endpoint"], x["status"]) for x in lines] == [
        ("POST", "/predict", 200),
        ("GET", "/healthz", 200),
        ("POST", "/predict", 422),
    ]
    assert lines[0]["time"].endswith("+00:00")


def test_rate_limit_answers_429_with_retry_after(model_path):
    with TestClient(create_app(Predictor(model_path), rate_limit=1 / 60)) as c:  # one request a minute, burst 1
        assert c.get("/").status_code == 200
        r = predict(c)
        assert r.status_code == 429 and "--rate-limit" in r.json()["detail"]
        assert 55 <= int(r.headers["retry-after"]) <= 60
        assert c.get("/healthz").status_code == 200  # health probes are never limited


def test_token_buckets_refill_per_client_and_forget_the_oldest():
    now = [0.0]
    buckets = TokenBuckets(rate=2, clock=lambda: now[0], max_clients=2)  # burst 2
    assert [buckets.take("a") for _ in range(2)] == [0, 0]
    assert buckets.take("a") == pytest.approx(0.5)  # empty: half a second to the next token
    assert buckets.take("b") == 0  # another client has its own bucket
    now[0] = 0.5
    assert buckets.take("a") == 0 and buckets.take("a") > 0  # one token came back
    buckets.take("c")
    assert list(buckets.buckets) == ["a", "c"]  # b, the least recently seen, was forgotten


@pytest.mark.parametrize("text,per_second", [("20/s", 20), ("2.5", 2.5), ("300/min", 5), (" 4 / sec ", 4)])
def test_parse_rate(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["fast", "0/s", "-3/s", "10/h", "", "1e3/s"])
def test_parse_rate_refuses_what_is_not_a_rate(text):
    with pytest.raises(ValueError, match="N/s"):
        parse_rate(text)


def test_a_request_over_the_timeout_gets_504_and_the_server_goes_on(model_path, monkeypatch):
    predictor = Predictor(model_path)
    release = threading.Event()
    real_logits = predictor.logits

    def stuck_logits(batch: torch.Tensor) -> torch.Tensor:
        release.wait(30)  # a model call that hangs until the test lets it go
        return real_logits(batch)

    with TestClient(create_app(predictor, request_timeout=0.3)) as c:
        monkeypatch.setattr(predictor, "logits", stuck_logits)
        r = predict(c)
        assert r.status_code == 504 and "--request-timeout" in r.json()["detail"]
        monkeypatch.setattr(predictor, "logits", real_logits)
        release.set()
        assert predict(c).status_code == 200
        assert c.get("/healthz").json()["status"] == "ok"


# ------------------------------------------------------------------------------------------ key sources, binding


def test_key_file_missing_empty_or_world_readable(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_api_key(tmp_path / "nope", environ={})
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_api_key(empty, environ={})
    good = tmp_path / "key"
    good.write_text(KEY + "\n")
    good.chmod(0o600)
    assert load_api_key(good, environ={}) == KEY and capsys.readouterr().err == ""
    good.chmod(0o644)
    assert load_api_key(good, environ={}) == KEY
    assert "readable by every user" in capsys.readouterr().err and "chmod 600" not in KEY


def test_key_from_the_environment_and_bad_keys(tmp_path, capsys):
    assert load_api_key(None, environ={}) is None
    assert load_api_key(None, environ={API_KEY_ENV: f" {KEY}\n"}) == KEY
    with pytest.raises(ValueError, match="set but empty"):
        load_api_key(None, environ={API_KEY_ENV: ""})
    with pytest.raises(ValueError, match="cannot carry") as bad:
        load_api_key(None, environ={API_KEY_ENV: "two words-in-a-key-1234"})
    assert "two words" not in str(bad.value)  # the error names the source, not the key
    assert load_api_key(None, environ={API_KEY_ENV: "short"}) == "short"
    assert "can be guessed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "host,loopback",
    [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("192.168.1.20", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.fixture
def fake_uvicorn(monkeypatch):
    """uvicorn.run replaced by a recorder: `vitkit serve` gets as far as listening, then returns."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return served


def test_beyond_loopback_without_a_key_refuses_to_start(model_path, fake_uvicorn, capsys):
    from vitkit.cli import main

    assert main(["serve", str(model_path), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in err and "--insecure" in err and not fake_uvicorn
    assert main(["serve", str(model_path), "--host", "0.0.0.0", "--insecure", "--no-access-log"]) == 0
    assert "without authentication (--insecure)" in capsys.readouterr().err and fake_uvicorn["host"] == "0.0.0.0"


def test_serve_with_a_key_file_requires_it_and_logs_json(model_path, fake_uvicorn, tmp_path, capsys):
    from vitkit.cli import main

    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    args = ["serve", str(model_path), "--host", "0.0.0.0", "--api-key-file", str(key_file), "--rate-limit", "50/s"]
    assert main(args + ["--request-timeout", "30"]) == 0
    assert fake_uvicorn["access_log"] is False  # our JSON lines replace uvicorn's
    with TestClient(fake_uvicorn["app"]) as c:
        assert predict(c).status_code == 401 and predict(c, KEY).status_code == 200
    err = capsys.readouterr().err
    assert "plain HTTP" in err and KEY not in err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [r["status"] for r in records] == [401, 200]


def test_serve_reads_the_key_from_the_environment(model_path, fake_uvicorn, monkeypatch):
    from vitkit.cli import main

    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert main(["serve", str(model_path), "--host", "0.0.0.0", "--no-access-log"]) == 0
    with TestClient(fake_uvicorn["app"]) as c:
        assert predict(c).status_code == 401 and predict(c, KEY).status_code == 200


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--api-key-file", "missing-key-file"], "does not exist"),
        (["--access-log", "a.log", "--no-access-log"], "contradict"),
    ],
)
def test_serve_option_errors_are_one_line(model_path, fake_uvicorn, capsys, extra, message):
    from vitkit.cli import main

    assert main(["serve", str(model_path), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not fake_uvicorn


@pytest.mark.parametrize("flag,value", [("--rate-limit", "lots"), ("--request-timeout", "-1")])
def test_bad_limits_are_refused_by_the_parser(model_path, capsys, flag, value):
    from vitkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(model_path), flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


# ------------------------------------------------------------------------------------- benchmarks/serve_load.py


def serve_load_module():
    bench = REPO / "benchmarks"
    sys.path.insert(0, str(bench))  # the script imports its sibling `machine`
    try:
        spec = importlib.util.spec_from_file_location("serve_load_under_test", bench / "serve_load.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(bench))


def test_key_verdict_compares_the_medians():
    verdict = serve_load_module().key_verdict
    loads = [("off", 100, 20), ("on", 99, 20.2), ("off", 104, 19), ("on", 97, 21), ("off", 98, 21), ("on", 99.5, 20)]
    runs = [{"key": k, "throughput": t, "p50_ms": p} for k, t, p in loads]
    assert "x0.990" in verdict(runs) and ": met" in verdict(runs)  # 99 / 100
    runs[1]["throughput"] = runs[5]["throughput"] = 90
    assert "x0.900" in verdict(runs) and "NOT met" in verdict(runs)


@pytest.mark.slow
def test_serve_load_api_key_mode_runs(tmp_path):
    """The key-on / key-off comparison end to end with the smallest load (two real servers on loopback)."""
    r = run_python(
        ["benchmarks/serve_load.py", "--api-key", "--requests", "6", "--concurrency", "2", "--rounds", "1"],
        cwd=REPO,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "api key: throughput x" in r.stdout and "errors: 0" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["off"], ["on"])]
    assert sorted(row[0] for row in rows) == ["off", "on"]
