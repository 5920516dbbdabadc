"""vitkit serve: an HTTP service and web page for one checkpoint (predictions and attention maps)."""

from __future__ import annotations

import argparse

from . import CHECKPOINT_HELP

HELP = "serve a checkpoint over HTTP: POST /predict, POST /explain, GET /healthz, and a web page at /"


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def rate(text: str) -> float:
    from ..serve.limits import parse_rate  # limits.py needs nothing from the serve extra

    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest request body in MiB (default: 20)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests run together in one batch (default: 8)")
    p.add_argument("--topk", type=int, default=5, help="classes returned by /predict by default (default: 5)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images (decompression bombs)")
    p.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "torch-compile"),
        help="torch (default) or torch-compile: compiled before listening (~15 s), faster at small batches",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32", "int8"),
        default="bf16",
        help="arithmetic (default bf16); int8: block linears in int8, quantized on load (dynamic activations; a "
        "`vitkit quantize` output is served in int8 with its calibrated grids whatever this says)",
    )
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require 'Authorization: Bearer <key>' on every endpoint but /healthz, the key read from FILE "
        "(chmod 600); without it, $VITKIT_API_KEY if set",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a --host beyond loopback without an API key (refused otherwise)",
    )
    p.add_argument(
        "--rate-limit",
        type=rate,
        metavar="N/s",
        help="requests a second each client address may make (e.g. 20/s, 300/min); beyond it 429 with Retry-After",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_seconds,
        metavar="S",
        help="answer 504 to a request still running after S seconds (the server goes on)",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument(
        "--access-log",
        metavar="FILE",
        help="append the access log (one JSON line per request) to FILE instead of stderr",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")


def run(args: argparse.Namespace) -> int:
    from ..serve import require_serve_extra

    require_serve_extra()
    from ..serve.app import serve
    from ..serve.auth import load_api_key

    if args.access_log and args.no_access_log:
        raise ValueError("--access-log FILE and --no-access-log contradict each other; give one")
    serve(
        args.checkpoint,
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        max_batch=args.max_batch,
        topk=args.topk,
        max_pixels=args.max_pixels,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        backend=args.backend,
        api_key=load_api_key(args.api_key_file),
        insecure=args.insecure,
        rate_limit=args.rate_limit,
        request_timeout=args.request_timeout,
        access_log_path=args.access_log,
        precision=args.precision,
    )
    return 0
