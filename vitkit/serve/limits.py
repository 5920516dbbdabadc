"""Request-body limit as a plain ASGI middleware: 413 before reading (Content-Length) or while streaming.

Checking the header alone is not enough (chunked uploads have none, and headers can lie), so the bytes that
actually arrive are counted too; the moment they pass the limit the app's reading stops and the client gets 413.
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]


class _BodyTooLarge(Exception):
    pass


async def _send_413(send: Any, limit: int) -> None:
    body = json.dumps({"detail": f"request body is larger than the limit of {limit:,} bytes (--max-upload-mb)"})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


class BodyLimitMiddleware:
    """Refuse HTTP request bodies over `max_bytes` with 413, whatever the app was doing with them."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_json(send, 400, "Content-Length is not a number")
            if int(declared) > self.max_bytes:
                return await _send_413(send, self.max_bytes)
        state = {"received": 0, "too_big": False, "started": False}

        async def counting_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["too_big"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: dict) -> None:
            if state["too_big"]:
                return  # the app's own answer (an error about a broken body) is replaced by our 413
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not state["too_big"]:
                raise
        if state["too_big"] and not state["started"]:
            await _send_413(send, self.max_bytes)


async def _send_json(send: Any, status: int, detail: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})
