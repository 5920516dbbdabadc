"""What one request may take, as plain ASGI middleware: its body size (413), its client's rate (429), its time
(504).

Body: checking the header alone is not enough (chunked uploads have none, and headers can lie), so the bytes that
actually arrive are counted too; the moment they pass the limit the app's reading stops and the client gets 413.

Rate: a token bucket per client address. Each client's bucket refills at N tokens a second up to N (one second's
burst) and a request takes one; an empty bucket is 429 with Retry-After. A dict of (tokens, time) per address is all
it needs, so no rate-limiting package (their stores and window algorithms) is pulled into the serve extra.

Time: a request still running after --request-timeout seconds is cancelled and answered 504; a batch already on
the model finishes in its thread and its result is dropped, so the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
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


async def _send_json(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    head = [(b"content-type", b"application/json"), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*(s|sec|second|min|minute))?\s*")


def parse_rate(text: str) -> float:
    """'20/s', '20' or '300/min' -> requests a second (> 0); anything else is a ValueError saying how to write it."""
    m = RATE.fullmatch(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"rate limit {text!r} is not a positive rate: write N/s (e.g. 20/s) or N/min (e.g. 300/min)")
    per_second = float(m.group(1))
    return per_second / 60 if (m.group(2) or "s").startswith("min") else per_second


class TokenBuckets:
    """One token bucket per client: `rate` tokens a second, at most `burst`; each request takes one.

    The least recently seen clients are forgotten past `max_clients` (their buckets are the fullest anyway), so a
    flood of addresses cannot grow the table without bound.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        max_clients: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ):
        if rate <= 0:
            raise ValueError(f"rate must be > 0 requests a second, got {rate}")
        self.rate = rate
        self.burst = max(1.0, rate) if burst is None else burst
        self.max_clients = max_clients
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when counted)

    def take(self, client: str) -> float:
        """0 if `client` may go ahead (a token is taken), else the seconds until its next token."""
        now = self.clock()
        tokens, then = self.buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if wait == 0 else tokens, now)  # now the most recently seen
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return wait


class RateLimitMiddleware:
    """429 (JSON reason, Retry-After) for a client whose bucket is empty. `exempt` paths (health probes) are never
    limited, so a probe polling a busy server does not mark it down."""

    def __init__(self, app: Any, rate: float, exempt: frozenset[str] = frozenset({"/healthz"})):
        self.app = app
        self.buckets = TokenBuckets(rate)
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.buckets.take(client)
        if wait == 0:
            return await self.app(scope, receive, send)
        rate = self.buckets.rate
        detail = f"too many requests: this server takes {rate:g} a second from each client (--rate-limit)"
        retry = str(max(1, math.ceil(wait))).encode()
        await _send_json(send, 429, detail, [(b"retry-after", retry)])


class TimeoutMiddleware:
    """504 (JSON reason) for a request still running after `seconds`; the request's work is cancelled."""

    def __init__(self, app: Any, seconds: float):
        if seconds <= 0:
            raise ValueError(f"the request timeout must be > 0 seconds, got {seconds}")
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:  # wait_for, not asyncio.timeout: the package still runs on Python 3.10
            await asyncio.wait_for(self.app(scope, receive, watched_send), self.seconds)
        except asyncio.TimeoutError:
            if started:  # half an answer is out: nothing to do but let the server drop the connection
                raise
            detail = f"the request took longer than {self.seconds:g} s (--request-timeout) and was stopped"
            await _send_json(send, 504, detail)
