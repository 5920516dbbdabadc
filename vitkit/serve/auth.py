"""Who may call the server: one API key, sent as `Authorization: Bearer <key>`, and the rule for binding beyond
loopback.

The key comes from a file (`--api-key-file`) or the `VITKIT_API_KEY` environment variable, never from the command
line, where every user of the machine can read it in the process list. Every path but the open ones (`/healthz`
for health probes, and `/`, the static page: a browser's navigation cannot send the header, so the page has to load
to ask for the key) answers 401 without the right key. The presented token is compared with `hmac.compare_digest`,
whose time does not depend on where the bytes differ, so the key cannot be guessed byte by byte from response times.
A 401 never repeats the key or the token it was sent.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

API_KEY_ENV = "VITKIT_API_KEY"
OPEN_PATHS = frozenset({"/healthz", "/"})
MIN_KEY_CHARS = 16
# RFC 6750's b64token: what a Bearer credential may hold (base64, base64url and hex keys all fit)
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
KEY_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > KEY && chmod 600 KEY"
LOOPBACK_NAMES = ("localhost",)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_key_file(path: str | Path) -> str:
    """The key in `path` (surrounding whitespace removed). Missing or empty: an error; readable by every user of
    the machine: a warning, as anyone who can log in could then call the server."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"API key file {path} does not exist ({KEY_HINT})")
    if not path.is_file():
        raise ValueError(f"API key file {path} is not a file")
    key = path.read_text(encoding="utf-8", errors="replace").strip()
    if not key:
        raise ValueError(f"API key file {path} is empty ({KEY_HINT})")
    if path.stat().st_mode & stat.S_IROTH:
        warn(f"API key file {path} is readable by every user of this machine; restrict it with: chmod 600 {path}")
    return check_key(key, f"the key in {path}")


def check_key(key: str, source: str) -> str:
    """`key` if a Bearer header can carry it; a clear error (naming `source`, never the key) if not."""
    if not BEARER_TOKEN.fullmatch(key):
        raise ValueError(
            f"{source} holds characters an Authorization header cannot carry (spaces, quotes, non-ASCII, or more "
            f"than one line); use letters, digits and -._~+/ only ({KEY_HINT})"
        )
    if len(key) < MIN_KEY_CHARS:
        warn(f"{source} is {len(key)} characters long; a key under {MIN_KEY_CHARS} can be guessed ({KEY_HINT})")
    return key


def load_api_key(key_file: str | Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The server's key: from `key_file`, else from $VITKIT_API_KEY, else None (no authentication)."""
    if key_file is not None:
        if environ.get(API_KEY_ENV):
            warn(f"--api-key-file is given, so ${API_KEY_ENV} is ignored")
        return read_key_file(key_file)
    if API_KEY_ENV not in environ:
        return None
    key = environ[API_KEY_ENV].strip()
    if not key:
        raise ValueError(f"${API_KEY_ENV} is set but empty; set it to the key or unset it")
    return check_key(key, f"${API_KEY_ENV}")


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_bind(host: str, has_key: bool, insecure: bool) -> None:
    """Refuse to listen beyond loopback without a key, unless `insecure` (then warn)."""
    if is_loopback(host):
        return
    if not has_key and not insecure:
        raise ValueError(
            f"refusing to listen on {host} without an API key: any machine that can reach it could use the model. "
            f"Give --api-key-file FILE (or set ${API_KEY_ENV}), or --insecure to serve without authentication"
        )
    if not has_key:
        warn(f"listening on {host} without authentication (--insecure): any machine that can reach it may call it")
    else:
        warn(f"listening on {host} over plain HTTP: the key crosses the network readable; put a TLS proxy in front")


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, str | None]:
    """(token, None) from the first Authorization header, else (None, why it is unusable)."""
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return None, "this server needs an API key: send the header 'Authorization: Bearer <key>'"
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None, "the Authorization header must be 'Bearer <key>'"
    return token, None


class BearerAuthMiddleware:
    """Answer 401 (JSON reason, `WWW-Authenticate: Bearer`) to any request outside `open_paths` that does not carry
    the key. Websocket connections are held to the same rule, so a route added later cannot slip past it."""

    def __init__(self, app: Any, key: str, open_paths: frozenset[str] = OPEN_PATHS):
        if not BEARER_TOKEN.fullmatch(key):
            raise ValueError("the API key holds characters an Authorization header cannot carry")
        self.app = app
        self.key = key.encode("ascii")
        self.open_paths = open_paths

    def refusal(self, scope: dict) -> tuple[str, bytes] | None:
        """None for the right key, else (the reason, the WWW-Authenticate challenge)."""
        token, why = bearer_token(scope.get("headers") or [])
        if token is None:
            return why or "", b'Bearer realm="vitkit"'
        if not hmac.compare_digest(token, self.key):
            return "the API key is not valid", b'Bearer realm="vitkit", error="invalid_token"'
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": "API key required"})
        why, challenge = refused
        headers = [
            (b"content-type", b"application/json"),
            (b"www-authenticate", challenge),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"detail": why}).encode()})
