"""vitkit serve: an HTTP service and web page for one checkpoint (predictions and attention maps)."""

from __future__ import annotations

import argparse

from . import CHECKPOINT_HELP

HELP = "serve a checkpoint over HTTP: POST /predict, POST /explain, GET /healthz, and a web page at /"


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
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")


def run(args: argparse.Namespace) -> int:
    from ..serve import require_serve_extra

    require_serve_extra()
    from ..serve.app import serve

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
    )
    return 0
