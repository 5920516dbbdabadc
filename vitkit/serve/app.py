"""The FastAPI app: one Predictor in memory, a micro-batching worker, and hardened upload handling.

Endpoints: `POST /predict` (multipart field `file` -> JSON in the model's task format: top-k for a classifier,
the labels above the threshold (and the top-k) for a multi-label model), `POST /explain` (field `file` -> PNG overlay),
`POST /segment` (segmentation models: field `file` -> the mask as a palette PNG, the overlay PNG, or JSON),
`GET /healthz` (model and queue state), `GET /` (the web page). Bad input never takes the server down:
too large -> 413, not an image -> 415, undecodable -> 400, too many pixels (decompression bomb) -> 413,
missing field or bad option -> 422, queue full -> 503. A server can also say no: no or a wrong API key -> 401
(auth.py), over the client's rate -> 429, over the request timeout -> 504 (limits.py); every request is logged
as one JSON line (accesslog.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from collections.abc import Hashable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..data.decode import ImageDecodeError
from ..infer.explain import Explainer, Explanation, figure_png, overlay_png, parse_class, parse_head
from ..infer.predict import Predictor
from ..infer.segment import Segmenter, mask_png, segment_overlay_png
from .accesslog import AccessLogMiddleware, open_access_log
from .auth import BearerAuthMiddleware, check_bind
from .batcher import Batcher, QueueFull
from .limits import BodyLimitMiddleware, RateLimitMiddleware, TimeoutMiddleware

MiB = 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # refuse images over 40 MP before decoding them (decompression bombs)
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'"
)

CLASS_HELP = "grad-rollout: the class the map explains, by name or index (default: the top class)"
# A JSON mask is a list of rows of ints: ~4 bytes a pixel on the wire and ~30 in Python objects while it is built,
# so larger pictures are refused in JSON (the PNG mask holds the same indices in a fraction of that)
MAX_JSON_MASK_PIXELS = 4_000_000
SEGMENT_FORMAT_HELP = (
    "png: the mask as a palette PNG of class indices; overlay: the class colours over the image (PNG); json: the "
    "mask as rows of class indices and each class's share. PNG answers list the classes in X-Vitkit-Classes"
)
THRESHOLD_HELP = "multi-label models: return the labels above this probability (default: the checkpoint's)"


def decode_error_status(error: ImageDecodeError) -> int:
    """HTTP status for a refused image: 413 too many pixels, 415 not an image, 400 broken or empty."""
    text = str(error)
    if "decompression bomb" in text or "over the limit" in text:
        return 413
    if "not an image" in text:
        return 415
    return 400


def upload_name(file: UploadFile) -> str:
    """The client's file name, reduced to a safe short label for messages."""
    name = Path(file.filename or "upload").name
    return re.sub(r"[^\w.\- ]", "_", name)[:80] or "upload"


class ServeState:
    """What every route shares: the Predictor, the micro-batching worker, cached explainers, the segmenter."""

    def __init__(self, predictor: Predictor, max_batch: int, max_queue: int):
        self.predictor = predictor
        self.explainers: dict[tuple, Explainer] = {}
        self.figure_lock = threading.Lock()  # matplotlib is not thread-safe; the plain PIL overlays need no lock
        self.batcher = Batcher(self.handler_for, max_batch=max_batch, max_queue=max_queue)
        self.segmenter = Segmenter(predictor) if predictor.task.name == "segment" else None  # POST /segment

    def render_figure(self, expl: Explanation, size: int) -> bytes:
        with self.figure_lock:
            return figure_png(expl, size)

    def explainer_for(self, method: str, layer: int, head: str, discard: float, target: int | None) -> Explainer:
        key = (method, layer, head, discard, target)
        if key not in self.explainers:
            self.explainers[key] = Explainer(self.predictor, method, layer, parse_head(head), discard, target=target)
        return self.explainers[key]

    def handler_for(self, kind: Hashable):
        """The batch function for one kind of request: "predict", or ("explain", explainer key)."""
        if kind == "predict":
            return lambda items: list(self.predictor.logits(torch.stack(items)))  # (B, classes) -> B rows
        explainer = self.explainers[kind[1]]

        def explain_batch(items: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            logits, heat = explainer.maps(torch.stack(items))  # (B, classes), (B, [heads,] gh, gw)
            return list(zip(logits, heat))

        return explain_batch

    async def decode(self, file: UploadFile, prepare) -> tuple[str, Any]:
        """Upload -> (name, prepare(decoded RGB)); decoding runs off the event loop, a bad image is 400/413/415."""
        name = upload_name(file)
        data = await file.read()
        try:
            return name, await run_in_threadpool(lambda: prepare(self.predictor.decode(data, name)))
        except ImageDecodeError as e:
            raise HTTPException(decode_error_status(e), str(e)) from None

    async def load(self, file: UploadFile, with_crop: bool = False) -> tuple[str, torch.Tensor, Any]:
        """Upload -> (name, model input (C, h, w), display crop or None)."""
        p = self.predictor
        name, (x, crop) = await self.decode(file, lambda rgb: (p.prepare(rgb), p.crop(rgb) if with_crop else None))
        return name, x, crop

    async def submit(self, kind: Hashable, x: torch.Tensor) -> Any:
        try:
            return await self.batcher.submit(kind, x)
        except QueueFull as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        except (ValueError, RuntimeError) as e:
            raise HTTPException(500, f"the model failed on this request: {e}") from None


def create_app(
    predictor: Predictor,
    max_upload_bytes: int = 20 * MiB,
    max_batch: int = 8,
    topk: int = 5,
    max_queue: int = 256,
    *,
    api_key: str | None = None,
    rate_limit: float | None = None,
    request_timeout: float | None = None,
    access_log: logging.Handler | None = None,
) -> FastAPI:
    """Build the ASGI app around an already loaded Predictor (one model in memory).

    `api_key`: every path but /healthz and the page needs `Authorization: Bearer <key>`; `rate_limit`: requests a
    second per client address; `request_timeout`: seconds; `access_log`: where the JSON request lines go.
    """
    state = ServeState(predictor, max_batch, max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.batcher.start()
        yield
        await state.batcher.stop()

    app = FastAPI(title="vitkit", summary="Vision Transformer predictions and attention maps", lifespan=lifespan)
    add_guards(app, max_upload_bytes, api_key, rate_limit, request_timeout, access_log)
    app.state.predictor = predictor
    app.state.batcher = state.batcher
    add_predict_route(app, state, topk)
    add_explain_route(app, state)
    add_segment_route(app, state)
    page = resources.files("vitkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.describe(), "labels": predictor.labels, **state.batcher.stats()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
        return HTMLResponse(page, headers=headers)

    return app


def add_guards(
    app: FastAPI,
    max_upload_bytes: int,
    api_key: str | None,
    rate_limit: float | None,
    request_timeout: float | None,
    access_log: logging.Handler | None,
) -> None:
    """The middleware every request passes, outermost first: access log (sees every answer, the refusals too),
    rate limit (before the key check, so guessing keys is throttled as well), key check, timeout, body limit."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes)  # each one added wraps those before it
    if request_timeout is not None:
        app.add_middleware(TimeoutMiddleware, seconds=request_timeout)
    if api_key is not None:
        app.add_middleware(BearerAuthMiddleware, key=api_key)
    if rate_limit is not None:
        app.add_middleware(RateLimitMiddleware, rate=rate_limit)
    if access_log is not None:
        app.add_middleware(AccessLogMiddleware, handler=access_log, redact=[api_key] if api_key else [])


def add_predict_route(app: FastAPI, state: ServeState, default_topk: int) -> None:
    predictor = state.predictor

    @app.post("/predict")
    async def predict(
        file: UploadFile = File(..., description="an image file"),
        topk: int = Query(default_topk, ge=1, le=1000, description="how many classes to return"),
        threshold: float | None = Query(None, gt=0, lt=1, description=THRESHOLD_HELP),
    ) -> dict[str, Any]:
        task = predictor.task
        if threshold is not None:
            if not hasattr(task, "threshold"):
                raise HTTPException(422, f"threshold applies to multi-label models; this is a '{task.name}' model")
            task = dataclasses.replace(task, threshold=threshold)
        name, x, _ = await state.load(file)
        logits = await state.submit("predict", x)
        return task.predictions(logits[None], [name], predictor.labels, topk)[0].to_dict()


def add_explain_route(app: FastAPI, state: ServeState) -> None:
    predictor = state.predictor

    @app.post("/explain", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(
        file: UploadFile = File(..., description="an image file"),
        method: str = Query("attention", pattern="^(attention|rollout|grad-rollout)$"),
        layer: int = Query(-1),
        head: str = Query("mean", pattern=r"^(mean|max|min|all|-?\d+)$"),
        discard: float = Query(0.0, ge=0.0, lt=1.0),
        target: str | None = Query(None, alias="class", max_length=200, description=CLASS_HELP),
        figure: bool = Query(False, description="a titled figure instead of the plain overlay"),
        size: int = Query(320, ge=32, le=1024),
    ) -> Response:
        try:
            index = parse_class(target, predictor.labels)
            explainer = state.explainer_for(method, layer, head, discard, index)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        name, x, crop = await state.load(file, with_crop=True)
        logits, heat = await state.submit(("explain", (method, layer, head, discard, index)), x)
        pred = predictor.top_k(logits[None], [name], 5)[0]
        expl = Explanation(name, crop, heat.numpy(), explainer.description, pred)
        png = await run_in_threadpool(state.render_figure if figure else overlay_png, expl, size)
        headers = {
            "X-Vitkit-Map": quote(explainer.description, safe=" ,;:()-"),
            "X-Vitkit-Top": quote(f"{pred.labels[0]} {pred.probs[0]:.4f}", safe=" "),
            "Cache-Control": "no-store",
        }
        return Response(png, media_type="image/png", headers=headers)


def add_segment_route(app: FastAPI, state: ServeState) -> None:
    predictor, segmenter = state.predictor, state.segmenter

    @app.post(
        "/segment",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def segment(
        file: UploadFile = File(..., description="an image file"),
        format: str = Query("png", pattern="^(png|overlay|json)$", description=SEGMENT_FORMAT_HELP),
    ) -> Response:
        if segmenter is None:
            raise HTTPException(422, f"/segment needs a segmentation model; this is a '{predictor.task.name}' model")
        name, (rgb, x) = await state.decode(file, lambda rgb: (rgb, segmenter.prepare(rgb)))
        if format == "json" and rgb.shape[0] * rgb.shape[1] > MAX_JSON_MASK_PIXELS:
            raise HTTPException(
                413,
                f"'{name}' is {rgb.shape[1]}x{rgb.shape[0]}: over {MAX_JSON_MASK_PIXELS:,} pixels, its mask is too "
                "large for JSON; ask for format=png (the same class indices as a palette PNG)",
            )
        logits = await state.submit("predict", x)  # (K, h, w): batched with /predict's requests

        def render() -> tuple[Any, bytes | None]:
            pred = segmenter.predictions(logits[None], [name], [rgb.shape[:2]])[0]  # the mask at the upload's size
            if format == "json":
                return pred, None
            return pred, (segment_overlay_png(rgb, pred.mask) if format == "overlay" else mask_png(pred.mask))

        pred, png = await run_in_threadpool(render)
        if png is None:
            return JSONResponse(pred.to_dict(with_mask=True), headers={"Cache-Control": "no-store"})
        classes = json.dumps(pred.coverage(), separators=(",", ":"))
        headers = {"X-Vitkit-Classes": quote(classes, safe=""), "Cache-Control": "no-store"}
        return Response(png, media_type="image/png", headers=headers)


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 20,
    max_batch: int = 8,
    topk: int = 5,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    log_level: str = "info",
    access_log: bool = True,
    backend: str = "torch",
    *,
    api_key: str | None = None,
    insecure: bool = False,
    rate_limit: float | None = None,
    request_timeout: float | None = None,
    access_log_path: str | Path | None = None,
    precision: str = "bf16",
) -> None:
    """Load the checkpoint once and serve it with uvicorn until interrupted.

    Beyond loopback without `api_key` it refuses to start (ValueError) unless `insecure`. `access_log`: one JSON
    line per request to `access_log_path`, else stderr (uvicorn's own access lines are off either way).
    `precision`: the torch backend's ("bf16", "fp32", "int8": vitkit/infer/precision.py).
    """
    import uvicorn

    check_bind(host, api_key is not None, insecure)  # before the model loads: a refusal costs nothing
    log = open_access_log(access_log_path) if access_log else None
    predictor = Predictor(checkpoint, backend=backend, max_pixels=max_pixels, precision=precision)
    if backend == "torch-compile":  # compile before the first request: batch 1 (specialised) and a dynamic batch
        print("vitkit serve: compiling the model (batch 1 and a dynamic batch) before listening ...")
        h, w = predictor.preprocess.input_size
        for n in (1, 2):
            predictor.run(torch.zeros(n, predictor.model.cfg.in_chans, h, w))
    app = create_app(
        predictor,
        int(max_upload_mb * MiB),
        max_batch,
        topk,
        api_key=api_key,
        rate_limit=rate_limit,
        request_timeout=request_timeout,
        access_log=log,
    )
    guards = ", API key required" if api_key else ""
    guards += f", {rate_limit:g} requests/s per client" if rate_limit else ""
    guards += f", timeout {request_timeout:g} s" if request_timeout else ""
    print(f"vitkit serve: {checkpoint} on http://{host}:{port}/ (max upload {max_upload_mb} MiB, batch {max_batch}"
          f"{guards})")  # fmt: skip
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,  # the JSON lines of AccessLogMiddleware replace uvicorn's
            limit_concurrency=128,  # beyond this uvicorn answers 503 instead of piling up connections
            timeout_keep_alive=5,
        )
    finally:
        if log is not None:
            log.close()
