"""Decode one image file (or bytes) into an RGB uint8 array, whatever the file throws at us.

Converted: grayscale, 16-bit, float, CMYK, palette (with transparency), RGBA (composited on white),
EXIF-rotated, animated (first frame). Refused with an ImageDecodeError that names the file and the reason:
empty, truncated, corrupt, not an image, or larger than `max_pixels` (decompression bombs).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000×8000; larger images are refused before decoding


class ImageDecodeError(ValueError):
    """An image could not be turned into pixels; the message says which file and why."""


def display_name(path: str | bytes | os.PathLike) -> str:
    """A file name safe to print anywhere: bytes that are not UTF-8 (surrogate escapes) are shown as \\xNN."""
    raw = os.fsencode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path).encode()
    return raw.decode("utf-8", "backslashreplace")


_MAGIC = {
    b"\xff\xd8": "JPEG",
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"RIFF": "WebP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _looks_like(data: bytes) -> str:
    """A hint for a file PIL does not recognise: a web page saved under an image name is the usual culprit."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return f"it starts like a {kind} but is truncated or damaged"
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "it is an HTML page, perhaps a failed download saved under an image name"
    if head.startswith(b"<?xml") and b"<svg" not in head:
        return "it is XML text"
    if head.startswith((b"<svg", b"<?xml")):
        return "it is an SVG drawing; convert it to PNG first"
    sample = data[:256]
    try:
        sample.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError as e:
        utf8 = e.start >= len(sample) - 3  # only a character cut by the 256-byte window
    if utf8 and not any(b < 32 and b not in b"\t\n\r" for b in sample):
        return "it is text"
    return f"unknown or damaged format; first bytes {data[:8].hex(' ')}"


def _read_file(path: Path, name: str) -> bytes:
    """The bytes of a regular file; directories, FIFOs, devices and unreadable paths are refused, not waited on."""
    try:
        st = os.stat(path)  # follows symlinks; a symlink loop raises ELOOP here
    except FileNotFoundError:
        raise ImageDecodeError(f"image '{name}' does not exist") from None
    except OSError as e:
        raise ImageDecodeError(f"image '{name}' could not be read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(f"image '{name}' is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):  # reading /dev/zero or a FIFO would never end
        raise ImageDecodeError(f"image '{name}' is not a regular file (device, FIFO or socket); refused")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"image '{name}' could not be read ({e.strerror or e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit: rescale to 8-bit by the data range
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(
    source: str | Path | bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 array; raise ImageDecodeError with a clear reason otherwise.

    Args:
        source: a path, or the file's bytes (bytes are always content, never a path).
        name: how the file is called in error messages (default: the path, or "<upload>" for bytes).
        max_pixels: images declaring more pixels are refused from their header, before any pixel is allocated.
    """
    if name is None:
        name = "<upload>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    name = display_name(name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = _read_file(Path(source), name)
    if not data:
        raise ImageDecodeError(f"image '{name}' is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL notes on corrupt EXIF etc.: the outcome is what counts
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    f"image '{name}' is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                    "(possible decompression bomb); refused"
                )
            if w == 0 or h == 0:
                raise ImageDecodeError(f"image '{name}' has zero size ({w}x{h})")
            img.seek(0)  # animated: first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.asarray(_to_rgb(img), dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"image '{name}' is not an image file PIL can read ({_looks_like(data)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image '{name}' refused as a possible decompression bomb ({e})") from None
    except MemoryError:
        raise ImageDecodeError(f"image '{name}' needs more memory than is available to decode; refused") from None
    except Exception as e:  # PIL's plugins raise many types (OSError, SyntaxError, struct.error, KeyError...)
        reason = display_name(str(e) or type(e).__name__)
        if "truncated" in reason.lower():
            reason = f"truncated file: {reason}"
        raise ImageDecodeError(f"image '{name}' could not be decoded ({reason})") from None
