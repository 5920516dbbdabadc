"""Upload a model to the Hugging Face Hub: the folder save_pretrained writes, through `huggingface_hub`.

`huggingface_hub` reads HF_ENDPOINT, HF_TOKEN (or the token `hf auth login` stored) and proxies itself. Every
failure (no token, a refused token, no write access, no network, offline mode) becomes one PushError line that
says what to do, never a traceback: the folder is written first, so a model the format cannot express fails
before anything is sent.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from ..model import VisionTransformer
from ..model.serialization import FORMAT
from ..optional import require
from ..version import __version__
from .card import README
from .folders import save_pretrained


class PushError(OSError):
    """An upload to the Hub failed; the message is one line naming the repo, the cause and the remedy."""


def push_to_hub(
    model: VisionTransformer,
    repo_id: str,
    format: str = FORMAT,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    source: str | Path | None = None,
    license: str | None = None,
) -> str:
    """Write `model` as a `format` folder with its model card and upload it to `repo_id`; returns the commit URL.

    The repo is created when missing (`private` applies then), the branch `revision` too. A README.md already
    in the repo is kept (it may have been edited on the Hub); a new repo gets the generated model card.

    Raises:
        ExportError: the format cannot express the model (nothing is uploaded).
        PushError: the Hub could not be reached or refused the upload.
    """
    hub = require("huggingface_hub", "vitkit push")
    if token is None and hub.get_token() is None:  # the Hub would answer a bare 401; say what is missing instead
        raise PushError(
            f"pushing to '{repo_id}' needs a Hugging Face token with write access: pass --token, set HF_TOKEN or "
            "run `hf auth login`"
        )
    api = hub.HfApi(token=token, library_name="vitkit", library_version=__version__)
    with TemporaryDirectory(prefix="vitkit-push-") as tmp:
        save_pretrained(model, tmp, format, source=source, repo_id=repo_id, license=license)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            keep_readme = api.file_exists(repo_id, README, revision=revision)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message or f"Upload {format} model with vitkit {__version__}",
                ignore_patterns=[README] if keep_readme else None,
            )
        except Exception as e:
            message = explain_hub_error(e, repo_id)
            if message is None:
                raise
            raise PushError(message) from e
    return str(info.commit_url)


def explain_hub_error(e: BaseException, repo_id: str) -> str | None:
    """One line for a failed Hub call, or None for an error that is not the Hub's (a bug should still show)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled  # 0.x to 2.x

    if isinstance(e, LocalTokenNotFoundError):
        return f"pushing to '{repo_id}' needs a Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
    if isinstance(e, OfflineModeIsEnabled):
        return f"pushing to '{repo_id}' needs the network, but HF_HUB_OFFLINE is set; unset it to upload"
    if isinstance(e, HfHubHTTPError):
        return _http_error(e, repo_id)
    if _is_network_error(e):
        detail = (str(e) or type(e).__name__).splitlines()[0]
        return (
            f"cannot reach the Hub at {constants.ENDPOINT} to push '{repo_id}' ({type(e).__name__}: {detail}); "
            "check the network, the proxy (HTTPS_PROXY) and HF_ENDPOINT"
        )
    return None


def _http_error(e: Any, repo_id: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return (
            f"the Hub refused the token for '{repo_id}' (401 Unauthorized): check --token / HF_TOKEN, or log in "
            "again with `hf auth login`"
        )
    if status == 403:
        return f"no write access to '{repo_id}' (403 Forbidden): use a token with write permission for its owner"
    detail = getattr(e, "server_message", None) or str(e)
    detail = detail.strip().splitlines()[0] if detail.strip() else type(e).__name__
    return f"the Hub answered {status or 'an error'} while pushing '{repo_id}': {detail}"


def _is_network_error(e: BaseException) -> bool:
    """Connection, proxy, TLS and timeout failures. By class name: huggingface_hub's HTTP client has been requests
    (whose errors are OSErrors), httpx and httpx2 (whose TransportError is not), depending on its version."""
    return isinstance(e, OSError) or any(cls.__name__ == "TransportError" for cls in type(e).__mro__)


__all__ = ["PushError", "push_to_hub", "explain_hub_error"]
