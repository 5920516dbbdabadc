"""HTTP service for one model: `POST /predict`, `POST /explain`, `GET /healthz`, and a web page at `/`.

An optional extra: `pip install 'vitkit[serve]'` brings FastAPI, uvicorn and python-multipart.
The service talks to the model only through `vitkit.infer` (Predictor, Explainer).
"""

from __future__ import annotations

from typing import Any

MISSING_EXTRA = (
    "vitkit serve needs FastAPI, uvicorn and python-multipart, which are not installed; "
    "install them with: pip install 'vitkit[serve]'"
)


def require_serve_extra() -> None:
    """Raise ImportError with the install command when the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (form uploads)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{MISSING_EXTRA} (missing: {e.name})") from None


def create_app(*args: Any, **kwargs: Any):
    """See `vitkit.serve.app.create_app`."""
    require_serve_extra()
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app", "require_serve_extra", "MISSING_EXTRA"]
