"""Structured access log: one JSON object per request, on one line (time, client, method, endpoint, status,
latency_ms), to stderr or a file.

JSON lines rather than uvicorn's text lines, so a log shipper or `jq` reads the fields without a parser of its
own. The line holds the path alone: no query string and no header, so neither the API key nor anything a client
put beside it reaches the log; the key is also blanked out of a path that carries it by mistake. The lines go
through a `logging` handler: a file is reopened after logrotate moves it (WatchedFileHandler), and a failed write
(a full disk) is reported on stderr instead of failing the request.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MAX_PATH_CHARS = 200  # scanners send long junk paths; the log keeps their start


def open_access_log(path: str | Path | None) -> logging.Handler:
    """A handler writing bare lines to `path` (appended), or to stderr when `path` is None."""
    if path is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def access_record(scope: dict, status: int | None, seconds: float, redact: Iterable[str] = ()) -> dict[str, Any]:
    """The logged fields of one request; `redact` strings (the key) are blanked out of the path."""
    path = scope.get("path", "")
    for secret in redact:
        path = path.replace(secret, "[redacted]")
    client = scope.get("client")
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "client": client[0] if client else None,
        "method": scope.get("method", "WS" if scope.get("type") == "websocket" else None),
        "endpoint": path[:MAX_PATH_CHARS],
        "status": status,
        "latency_ms": round(seconds * 1e3, 2),
    }


class AccessLogMiddleware:
    """Log every HTTP request once it is answered, whatever answered it (the app, a limit, the key check).

    A request the app failed on is logged as 500 (what the client is sent) before the error goes on up; one whose
    client left before any answer is logged with status null.
    """

    def __init__(self, app: Any, handler: logging.Handler, redact: Iterable[str] = ()):
        self.app = app
        self.handler = handler
        self.redact = tuple(s for s in redact if s)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
        self.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status: int | None = None

        async def recording_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            status = status or 500
            raise
        finally:
            self.write(access_record(scope, status, time.perf_counter() - t0, self.redact))
