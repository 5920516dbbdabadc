"""Atomic file writes: readers see the old file or the complete new one, never half of one.

Every file vitkit writes for later use (checkpoints, model files, exports, the decode cache, command outputs) goes
through `atomic_write`: the data goes to a temp file beside the target, is flushed to disk (fsync) and only then
renamed over the target, so a crash, a kill or a full disk mid-write leaves the previous file in place.

The temp file gets the permissions a plain `open(path, "w")` would give: a new file those of the umask (it is
created with mode 0o666, as `open` does, not 0o600 like `tempfile.mkstemp`), a replaced file keeps its mode.
This module imports nothing from vitkit, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

_TEMP_MARK = ".tmp"


def _temp_prefix(path: Path) -> str:
    """`.NAME.HOST-`: temp files of `path` written on this host; the writer's pid follows."""
    return f".{path.name}.{socket.gethostname()}-"


def _temp_path(path: Path) -> Path:
    """A fresh temp name beside `path`, ending in the target's suffix, so writers that choose the format by
    extension (np.save adds `.npy` to other names, torch.export.save warns without `.pt2`) treat it as the target.
    """
    name = f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}{_TEMP_MARK}{path.suffix}"
    return path.with_name(name)


def _writer_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, owned by another user
    return False


def remove_orphaned_temps(path: str | Path) -> None:
    """Delete temp files of `path` left by a writer on this host that was killed mid-write (its pid is gone).

    A run killed while saving leaves `.NAME.HOST-PID.XXXX.tmp` behind (as large as the file it was writing);
    without this, every crash would leave one more.
    """
    path = Path(path)
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*{_TEMP_MARK}*"):
        pid = tmp.name[len(prefix) :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _writer_is_gone(int(pid)):
            tmp.unlink(missing_ok=True)


def _existing_mode(path: Path) -> int | None:
    """The permission bits of `path`, or None when there is no file to replace."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def _create_empty(tmp: Path, mode: int | None) -> None:
    """Create `tmp` as `open(..., "w")` would create a new file: mode 0o666 less the umask (the kernel applies it).

    When replacing a file of mode `mode`, no reader the old file shut out can open the temp file meanwhile, and the
    writer can still write it (the exact mode is set before the rename).
    """
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode | stat.S_IWUSR))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to; on a clean exit it replaces `path` atomically.

    For writers that want a file name (ONNX and torch.export, np.memmap, np.save); bytes already in memory go
    through `atomic_write_bytes`. The parent folder is created when missing.

        with atomic_write("model.onnx") as tmp:
            program.save(tmp)

    Raises:
        OSError: the write failed (disk full, read-only, ...); its filename is `path`. On any error, in the
            writer or here, the old file is untouched and the temp file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temps(path)
    tmp = _temp_path(path)
    old_mode = _existing_mode(path)
    try:
        _create_empty(tmp, old_mode)
        yield tmp
        _fsync(tmp)
        if old_mode is not None:
            os.chmod(tmp, old_mode)  # open(path, "w") keeps the mode of the file it overwrites
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # "[Errno 28] No space left on device" alone does not say where
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`) and return `path` as a Path.

    Raises:
        OSError: the write failed; its filename is `path`, the old file is untouched and no temp file is left.
    """
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return path


__all__ = ["atomic_write", "atomic_write_bytes", "remove_orphaned_temps"]
