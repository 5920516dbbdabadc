"""Pretrained weights by name: a Hugging Face Hub repo, a timm name with its tag, or a local path.

A name becomes a local folder (or file) that the format loaders of this package read like any other, so a
download brings its preprocessing (timm `pretrained_cfg`, transformers `preprocessor_config.json`) and class
names along. Downloads go through `huggingface_hub` into its standard cache, which is shared with timm and
transformers and honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE; nothing here
overrides them. Only the files a loader reads are fetched: `config.json`, `preprocessor_config.json` and one
weights file, safetensors in preference to any pickle.

Offline (HF_HUB_OFFLINE=1 or `local_files_only=True`) the cache is read without any network call, as it is for a
cached revision given as a commit hash (its files cannot change). Online, a Hub that cannot be reached falls back
to the cache too. Every failure (not found, private or gated, no such
revision or file, proxy, TLS, timeout, an interrupted download) is one CheckpointError line that names the repo
and file and says how to get them. `huggingface_hub` downloads to a `.incomplete` file and renames it only once
the size matches, so a broken transfer never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import UnsupportedModelError, config_from_name
from ..model.serialization import CheckpointError, is_vitkit_checkpoint
from ..version import __version__
from .report import HubOrigin

log = logging.getLogger("vitkit.interop")

HUB_PREFIX = "hf-hub:"  # timm's spelling of a Hub repo
LOCAL_DIR_PREFIX = "local-dir:"  # timm's spelling of a local Hub-layout folder
METADATA_FILES = ("config.json", "preprocessor_config.json")
# the weights files the folder loaders (timm.py, hf.py) read, in the order they are preferred: safetensors first,
# so that a repo holding both never makes us download (and unpickle) the pickle
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# a repo without a loader's config.json may still hold one bare checkpoint; same preference, safetensors first
LONE_WEIGHTS_SUFFIXES = ((".safetensors",), (".pth", ".pt", ".bin"), (".npz",))
# what a local path looks like: a name with one of these suffixes is never taken for a Hub name
PATH_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar", ".npz", ".onnx", ".pt2", ".json")

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[^@\s]+))?$")
_COMMIT = re.compile(r"[0-9a-f]{40}")  # a full commit hash (what huggingface_hub's cache names snapshots by)
_BARE_NAME = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")  # timm's model names: lower case, underscores
_TIMM_TAGGED = re.compile(r"^(?P<arch>[a-z][a-z0-9_]*)\.(?P<tag>[a-z0-9][a-z0-9_]*)$")


# ------------------------------------------------------------------------------------------------ names
@dataclass(frozen=True)
class HubName:
    """A model repo on the Hub; `revision` (branch, tag or commit) None means the default branch."""

    repo_id: str
    revision: str | None = None


@dataclass(frozen=True)
class ArchitectureName:
    """A model name without weights (`vit_base_patch16_224`): create_model builds it with random weights."""

    name: str


def parse_name(source: str | Path) -> Path | HubName | ArchitectureName:
    """What `source` names: a local path, a Hub repo, or only an architecture.

    An existing path always wins. Then: `local-dir:PATH` is a path; `hf-hub:OWNER/NAME[@REV]` and `OWNER/NAME[@REV]`
    are repos; a timm name with a pretrained tag (`vit_small_patch16_224.augreg_in21k_ft_in1k`) is the repo timm
    resolves it to (`timm/` + the name); a name create_model or timm knows (`vit_base_patch16_224`, `S/16`,
    `deit_small_patch16_224`) is an architecture. Anything else, and anything that looks like a file (a checkpoint
    suffix, `./`, `~`, several folders), is a path, so that a mistyped file name is reported as a missing file
    rather than a missing repo.
    """
    if isinstance(source, Path):
        return source
    text = str(source).strip()
    if text.startswith(LOCAL_DIR_PREFIX):
        return Path(text[len(LOCAL_DIR_PREFIX) :]).expanduser()
    if text.startswith(HUB_PREFIX):
        return _hub_name(text[len(HUB_PREFIX) :], source)
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        return path
    if _is_architecture(text) or _timm_knows(text):
        return ArchitectureName(text)
    if m := _TIMM_TAGGED.match(text):
        return HubName(f"timm/{m['arch']}.{m['tag']}")
    if _REPO_ID.match(text):
        return _hub_name(text, source)
    return path


def _hub_name(text: str, source: str | Path) -> HubName:
    m = _REPO_ID.match(text)
    if m is None:
        raise CheckpointError(f"'{source}' is not a Hub repo id; expected OWNER/NAME, optionally @REVISION")
    return HubName(m["repo"], m["revision"])


def _looks_like_path(text: str) -> bool:
    return (
        text.lower().endswith(PATH_SUFFIXES)
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
    )


def _is_architecture(text: str) -> bool:
    if "." in text:  # a pretrained tag: weights, not just an architecture
        return False
    try:
        config_from_name(text)
    except UnsupportedModelError as e:  # a timm architecture vitkit cannot build: its weights would not load either
        raise CheckpointError(str(e)) from e
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _timm_knows(text: str) -> bool:
    """A timm model name vitkit does not decode itself (`deit_small_patch16_224`); timm is asked only then."""
    if not _BARE_NAME.match(text):
        return False
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(text))


def names_weights(source: str | Path) -> bool:
    """True when `source` points at weights (a path that exists, or a Hub name), not at a bare architecture.

    `vitkit train --model X` fine-tunes X when this holds and builds X with random weights otherwise.
    """
    parsed = parse_name(source)
    return isinstance(parsed, HubName) or (isinstance(parsed, Path) and parsed.exists())


def default_weights(arch: ArchitectureName) -> HubName:
    """The repo of timm's default pretrained tag for a bare timm name; timm's registry knows it, so timm is needed."""
    hint = (
        f"'{arch.name}' names an architecture, not weights: add a pretrained tag as timm names them "
        f"('{arch.name}.<tag>', e.g. 'vit_small_patch16_224.augreg_in21k_ft_in1k') or give a Hub repo id"
    )
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        raise CheckpointError(f"{hint} (with timm installed its default tag is used)") from None
    try:
        cfg = get_pretrained_cfg(arch.name)
    except RuntimeError:
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise CheckpointError(f"{hint}; timm knows no Hub weights for it")
    return HubName(hub_id if "/" in hub_id.strip("/") else f"timm/{arch.name}.{cfg.tag}")


# --------------------------------------------------------------------------------------------- fetching
def locate(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[Path, HubOrigin | None]:
    """The local path a loader reads for `source` and, for a Hub name, where its files came from.

    The keyword arguments are `fetch`'s; a local path ignores them.
    """
    parsed = parse_name(source)
    if isinstance(parsed, ArchitectureName):
        parsed = default_weights(parsed)
    if isinstance(parsed, Path):
        if not parsed.exists():
            raise CheckpointError(f"checkpoint '{source}' does not exist")
        return parsed, None
    fetched = fetch(parsed, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    return fetched.path, fetched.origin


@dataclass
class Fetched:
    """A downloaded (or cached) checkpoint: `path` is what the format loaders read, `origin` where it came from."""

    path: Path
    origin: HubOrigin


def fetch(
    name: HubName,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Fetched:
    """The files of `name` that vitkit reads, downloaded into (or found in) the Hub cache.

    Args:
        name: the repo; its own revision (`OWNER/NAME@REV`) is used when `revision` is None.
        revision: branch, tag or commit hash (default: the repo's main branch).
        cache_dir: the Hub cache folder (default: huggingface_hub's, i.e. HF_HUB_CACHE or HF_HOME/hub).
        token: a Hub token for private or gated repos (default: HF_TOKEN or the login's stored token).
        local_files_only: never touch the network; only the cache (as HF_HUB_OFFLINE=1 does for every call).

    Raises:
        CheckpointError: one line naming the repo, the file and the way to get them.
    """
    from ..optional import require

    require("huggingface_hub", f"loading '{name.repo_id}' by name")  # a core dependency; an old install may lack it
    if revision is not None and name.revision is not None and revision != name.revision:
        raise CheckpointError(f"'{name.repo_id}@{name.revision}' asks for another revision than revision={revision!r}")
    hub = _Hub(name.repo_id, revision or name.revision or "main", cache_dir, token)
    if local_files_only or hub_offline():
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        return hub.from_cache(why)
    if _COMMIT.fullmatch(hub.revision):  # a commit's files never change: a cached copy needs no network call
        with contextlib.suppress(CheckpointError):
            return hub.from_cache("")
    try:
        return hub.download()
    except _Unreachable as e:
        try:
            cached = hub.from_cache(str(e))
        except CheckpointError:
            raise CheckpointError(str(e)) from e.__cause__
        log.warning("'%s': the Hub could not be reached (%s); the cached copy is used", name.repo_id, e.reason)
        return cached


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or now in {"1", "ON", "YES", "TRUE"}


def choose_files(repo_id: str, names: list[str]) -> list[str]:
    """Of a repo's files, those a loader reads: metadata, then exactly one weights file (safetensors first)."""
    top = [n for n in names if "/" not in n]
    chosen = [n for n in METADATA_FILES if n in top]
    weights = next((n for n in FOLDER_WEIGHTS if n in top), None)
    if weights is None:
        for suffixes in LONE_WEIGHTS_SUFFIXES:
            found = sorted(n for n in top if n.endswith(suffixes))
            if len(found) > 1:
                raise CheckpointError(
                    f"'{repo_id}' holds several weights files ({', '.join(found)}) and none vitkit prefers "
                    f"({', '.join(FOLDER_WEIGHTS)}); download the one you want and pass its path"
                )
            if found:
                weights = found[0]
                break
    if weights is None:
        raise CheckpointError(
            f"'{repo_id}' has no weights file vitkit reads (looked for {', '.join(FOLDER_WEIGHTS)}, or one "
            f"*.safetensors / *.pth / *.bin / *.npz); its files: {', '.join(sorted(names)[:12]) or 'none'}"
        )
    return [*chosen, weights]


def loadable_path(folder: Path, files: list[str]) -> Path:
    """The folder when its config.json describes the weights (timm / transformers layout), else the weights file."""
    weights = folder / files[-1]
    if "config.json" in files and files[-1] in FOLDER_WEIGHTS and not is_vitkit_checkpoint(weights):
        return folder
    return weights


class _Unreachable(Exception):
    """The Hub did not answer (connection, proxy, TLS, timeout, an interrupted transfer, a 5xx): try the cache."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class _Hub:
    """One repo at one revision: its download and its cached copy, with huggingface_hub's errors made into lines."""

    def __init__(self, repo_id: str, revision: str, cache_dir: str | Path | None, token: str | bool | None):
        from huggingface_hub import constants

        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.endpoint = constants.ENDPOINT
        # HF_HUB_ETAG_TIMEOUT bounds each metadata request; hf_hub_download's own default ignores the variable
        self.timeout = float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10))

    @property
    def cache_root(self) -> str:
        from huggingface_hub import constants

        return self.cache_dir or constants.HF_HUB_CACHE

    # ------------------------------------------------------------------------------------------ online
    def download(self) -> Fetched:
        from huggingface_hub import HfApi

        api = HfApi(library_name="vitkit", library_version=__version__)
        info = self._call(
            lambda: api.model_info(self.repo_id, revision=self.revision, token=self.token, timeout=self.timeout),
            filename=None,
        )
        files = choose_files(self.repo_id, [s.rfilename for s in info.siblings or []])
        paths = [Path(self._call(lambda f=f: self._hf_hub_download(f), filename=f)) for f in files]
        folders = {p.parent for p in paths}
        if len(folders) > 1:  # the branch moved between two files: they belong to different commits
            raise CheckpointError(
                f"'{self.repo_id}' changed on the Hub while its files were downloaded (commits "
                f"{', '.join(sorted(f.name for f in folders))}); run again, or pin revision= to one commit"
            )
        return self._fetched(folders.pop(), files, offline=False)

    def _fetched(self, folder: Path, files: list[str], offline: bool) -> Fetched:
        origin = HubOrigin(self.repo_id, self.revision, folder.name, tuple(files), str(folder), self.endpoint, offline)
        return Fetched(loadable_path(folder, files), origin)

    def _hf_hub_download(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(
            self.repo_id,
            filename,
            revision=self.revision,
            cache_dir=self.cache_dir,
            token=self.token,
            etag_timeout=self.timeout,
            library_name="vitkit",
            library_version=__version__,
        )

    def _call(self, request: Any, filename: str | None) -> Any:
        """Run one huggingface_hub request; its exceptions become a CheckpointError line (or _Unreachable)."""
        try:
            return request()
        except CheckpointError:
            raise
        except Exception as e:
            raise self._explain(e, filename) from e

    def _explain(self, e: Exception, filename: str | None) -> Exception:
        from huggingface_hub.utils import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo, what = self.repo_id, f"'{filename}' of '{self.repo_id}'" if filename else f"'{self.repo_id}'"
        login = "pass token=, set HF_TOKEN, or log in with `hf auth login`"
        if isinstance(e, GatedRepoError):
            return CheckpointError(f"'{repo}' is gated: accept its conditions at {self.endpoint}/{repo}, then {login}")
        if isinstance(e, RepositoryNotFoundError):
            return CheckpointError(
                f"'{repo}' is neither a local path nor a model repo at {self.endpoint}, or it is private and no "
                f"valid token was sent: check the name; for a private repo {login}"
            )
        if isinstance(e, RevisionNotFoundError):
            return CheckpointError(f"'{repo}' has no revision '{self.revision}' (a branch, tag or commit hash)")
        if isinstance(e, EntryNotFoundError):
            return CheckpointError(f"'{repo}' has no file '{filename}' at revision {self.revision}")
        if isinstance(e, HFValidationError):
            return CheckpointError(f"'{repo}' is not a valid Hub repo id: {_first_line(e)}")
        if isinstance(e, PermissionError):
            return CheckpointError(
                f"cannot write {what} into the Hub cache {self.cache_root} ({_first_line(e)}); "
                "set HF_HUB_CACHE or pass cache_dir= to a writable folder"
            )
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, HfHubHTTPError) and status is not None and status < 500 and status != 429:
            return CheckpointError(f"the Hub at {self.endpoint} refused {what} (HTTP {status}: {_first_line(e)})")
        reason = _network_reason(e, self.endpoint)
        if reason is None and status is not None:
            reason = f"HTTP {status} from {self.endpoint}"
        if reason is None:
            return e  # not a network failure: a defect to see with its traceback
        return _Unreachable(
            f"could not download {what} ({reason}) and it is not in the cache {self.cache_root} either: "
            f"{self._how_to_get()}",
            reason,
        )

    # ----------------------------------------------------------------------------------------- offline
    def from_cache(self, why: str) -> Fetched:
        """The cached snapshot of this revision; CheckpointError naming what is missing when there is none."""
        folder = self._snapshot_folder()
        if folder is None:
            raise CheckpointError(
                f"'{self.repo_id}' (revision {self.revision}) is not in the Hub cache {self.cache_root} and {why}: "
                f"{self._how_to_get()}"
            )
        present = sorted(p.name for p in folder.iterdir() if p.is_file())  # complete files only: see the docstring
        try:
            files = choose_files(self.repo_id, present)
        except CheckpointError:
            raise CheckpointError(
                f"'{self.repo_id}' (revision {self.revision}) has no weights file in the Hub cache {folder} "
                f"(only {', '.join(present) or 'nothing'}; was its download interrupted?) and {why}: "
                f"{self._how_to_get()}"
            ) from None
        return self._fetched(folder, files, offline=True)

    def _snapshot_folder(self) -> Path | None:
        """The cache's folder of the commit this revision named when it was last downloaded (the documented layout
        `models--OWNER--NAME/refs/REVISION` -> `snapshots/COMMIT/`), without any network call."""
        from huggingface_hub.file_download import repo_folder_name

        repo = Path(self.cache_root) / repo_folder_name(repo_id=self.repo_id, repo_type="model")
        commit = self.revision
        if not _COMMIT.fullmatch(commit):
            ref = repo / "refs" / self.revision
            commit = ref.read_text().strip() if ref.is_file() else ""
        folder = repo / "snapshots" / commit
        return folder if commit and folder.is_dir() else None

    def _how_to_get(self) -> str:
        rev = "" if self.revision == "main" else f" --revision {self.revision}"
        return (
            f"run once with network access, or `{_download_command()} {self.repo_id}{rev}` where there is, "
            "or pass a local path"
        )


def _download_command() -> str:
    """The command-line download of the installed huggingface_hub (`hf` replaced `huggingface-cli`)."""
    import huggingface_hub

    major, minor = (int(x) for x in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    return "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"


def _network_reason(e: BaseException, endpoint: str) -> str | None:
    """A short cause for a transport failure (requests', urllib3's or httpx's exceptions, recognised by class name,
    so that no HTTP library is imported here), None for anything else.

    The outermost recognised exception decides: wrappers know more than what they wrap (urllib3 makes a refused
    connection a subclass of its timeout error; requests wraps it in a ConnectionError).
    """
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        reason = _transport_reason(e, endpoint)
        if reason is not None:
            return reason
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def _transport_reason(e: BaseException, endpoint: str) -> str | None:
    names = {cls.__name__ for cls in type(e).__mro__}
    detail, text = _first_line(e), str(e).lower()
    if "ProxyError" in names or (names & {"ConnectError", "ConnectionError"} and "proxy" in text):
        return f"proxy error ({detail}); check HTTPS_PROXY / HTTP_PROXY / NO_PROXY"
    if "SSLError" in names or "certificate verify" in text:
        return f"TLS error ({detail}); check the certificate bundle (SSL_CERT_FILE, REQUESTS_CA_BUNDLE)"
    if names & {"TimeoutException", "Timeout", "ReadTimeout", "ConnectTimeout", "ReadTimeoutError"}:
        return f"no answer from {endpoint} in time; HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT set the limits"
    if names & {"RemoteProtocolError", "ChunkedEncodingError", "IncompleteRead"} or "consistency check" in text:
        return f"the download was interrupted ({detail}); the partial file is not used"
    if names & {"ConnectError", "ConnectionError", "NetworkError", "NewConnectionError", "OfflineModeIsEnabled"}:
        return f"cannot connect to {endpoint}: {detail}"
    if names & {"TransportError", "RequestException"}:
        return f"network error: {detail}"
    return None


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


__all__ = [
    "HubName",
    "ArchitectureName",
    "Fetched",
    "parse_name",
    "names_weights",
    "default_weights",
    "locate",
    "fetch",
    "hub_offline",
    "choose_files",
    "loadable_path",
]
