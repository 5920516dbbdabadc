"""A bad-input corpus, generated at test time (no binary blobs in the repo).

Each `Case` is a file name, its bytes and what a correct reader must do with it: decode it to a known shape
(and, for some, known pixels) or refuse it with an error whose message names the file and matches `reason`.
`write_corpus(folder)` writes every case plus the things that are not plain files (a symlink loop, a
directory named like an image, a non-UTF-8 file name) into a dataset-like folder.

Used by tests/test_reliability*.py and tests/test_fuzz*.py; run it directly to write a corpus for poking
at the CLI by hand: `python -m tests.badinput runs/badinput`.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import noise_rgb

# A name that is not valid UTF-8: on Linux the file system takes any bytes, Python shows them as surrogates.
NON_UTF8_NAME = os.fsdecode(b"caf\xe9_latin1_\xff.png")


@dataclass(frozen=True)
class Case:
    """One corpus item. `shape` set: must decode to it; `reason` set: must be refused with a matching message."""

    name: str
    data: bytes
    shape: tuple[int, int, int] | None = None
    reason: str | None = None  # regex (case-insensitive) the ImageDecodeError message must contain
    check: Callable[[np.ndarray], None] | None = None  # extra pixel assertions for decodable cases
    label: str = "good"  # dataset class folder the item goes in when written as a dataset

    @property
    def ok(self) -> bool:
        return self.shape is not None


# ------------------------------------------------------------------------------------------------------------
# Building blocks


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_image(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise_rgb(h, w, seed))


def valid_jpeg(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    return encode(noise_image(h, w, seed), "JPEG", quality=90)


def valid_png(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    return encode(noise_image(h, w, seed), "PNG")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height RGB pixels (10^10 by default: 30 GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + png_chunk(b"IEND", b"")
    )


def gif_bomb() -> bytes:
    """A GIF whose logical screen and only frame declare 65535 x 65535 pixels (4.3 G), with 1 pixel of data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 0xFFFF, 0xFFFF, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 0xFFFF, 0xFFFF, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def _pixel_is(y: int, x: int, rgb: tuple[int, int, int], tol: int = 40) -> Callable[[np.ndarray], None]:
    def check(a: np.ndarray) -> None:
        got = a[y, x].astype(int)
        assert np.abs(got - np.array(rgb)).max() <= tol, f"pixel ({y}, {x}) is {got.tolist()}, expected ~{rgb}"

    return check


def _all_checks(*checks: Callable[[np.ndarray], None]) -> Callable[[np.ndarray], None]:
    def check(a: np.ndarray) -> None:
        for c in checks:
            c(a)

    return check


def _gray_check(a: np.ndarray) -> None:
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), "grayscale must give R == G == B"


def _exif_rotated_jpeg() -> bytes:
    """20 wide x 10 high: left half red, right half blue, with EXIF Orientation=6 (display rotated 90° CW).

    Shown upright it is 10 wide x 20 high with red on top (the left column becomes the top row)."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (6, 4), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (3, 0, 6, 4))  # right half is palette index 1 (green); left half index 0 (red, transparent)
    return encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _gray16_png() -> bytes:
    a = np.array([[0, 65535, 32768], [1000, 65535, 0]], dtype=np.uint16)
    return encode(Image.fromarray(a), "PNG")


def _gray16_check(a: np.ndarray) -> None:
    got = a[..., 0].astype(int)
    expected = np.array([[0, 255, 128], [4, 255, 0]])
    assert np.abs(got - expected).max() <= 1, f"16-bit gray scaled to {got.tolist()}, expected {expected.tolist()}"


def _flip_bytes(data: bytes, start: int, stop: int, step: int = 7) -> bytes:
    out = bytearray(data)
    for i in range(start, min(stop, len(out)), step):
        out[i] ^= 0xFF
    return bytes(out)


HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


# ------------------------------------------------------------------------------------------------------------
# The corpus


def make_cases() -> list[Case]:
    """Every in-memory corpus item (plain files); see `write_corpus` for links, directories and odd names."""
    jpg, png = valid_jpeg(), valid_png()
    red_png = encode(Image.new("RGB", (5, 7), (255, 0, 0)), "PNG")
    cmyk = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # cyan 0, magenta+yellow = red
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 2, 4))
    return [
        Case("good.jpg", jpg, shape=(48, 64, 3)),
        Case("good.png", png, shape=(48, 64, 3)),
        Case("png_named.jpg", red_png, shape=(7, 5, 3), check=_pixel_is(0, 0, (255, 0, 0), tol=0)),
        Case("cmyk.jpg", cmyk, shape=(8, 8, 3), check=_pixel_is(4, 4, (255, 0, 0))),
        Case("gray.png", encode(Image.new("L", (9, 3), 77), "PNG"), shape=(3, 9, 3), check=_gray_check),
        Case("gray16.png", _gray16_png(), shape=(2, 3, 3), check=_all_checks(_gray_check, _gray16_check)),
        Case(
            "palette_transparent.png",
            _palette_with_transparency(),
            shape=(4, 6, 3),
            # transparent red is composited on white; opaque green stays green
            check=_all_checks(_pixel_is(0, 0, (255, 255, 255), tol=0), _pixel_is(0, 5, (0, 255, 0), tol=0)),
        ),
        Case(
            "rgba.png",
            encode(rgba, "PNG"),
            shape=(4, 4, 3),
            check=_all_checks(_pixel_is(0, 0, (0, 0, 255), tol=0), _pixel_is(0, 3, (255, 255, 255), tol=0)),
        ),
        Case("bilevel.png", encode(Image.new("1", (3, 3), 1), "PNG"), shape=(3, 3, 3), check=_gray_check),
        Case(
            "exif_rotated.jpg",
            _exif_rotated_jpeg(),
            shape=(20, 10, 3),
            check=_all_checks(_pixel_is(2, 5, (255, 0, 0)), _pixel_is(17, 5, (0, 0, 255))),
        ),
        Case("one_pixel.png", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), shape=(1, 1, 3)),
        Case("wide_4000x1.png", encode(Image.new("RGB", (4000, 1), (9, 9, 9)), "PNG"), shape=(1, 4000, 3)),
        Case("tall_1x4000.jpg", encode(Image.new("RGB", (1, 4000), (200, 9, 9)), "JPEG"), shape=(4000, 1, 3)),
        Case(
            "animated.gif",
            _animated_gif(),
            shape=(6, 8, 3),
            check=_pixel_is(0, 0, (255, 0, 0), tol=0),  # the first frame
        ),
        # ---- refused ----
        Case("empty.jpg", b"", reason=r"empty", label="bad"),
        Case("truncated.jpg", jpg[: len(jpg) // 2], reason=r"truncated", label="bad"),
        Case("truncated.png", png[: len(png) // 2], reason=r"truncated", label="bad"),
        Case("truncated_header.png", png[:30], reason=r"not an image|truncated|could not", label="bad"),
        Case("jpeg_soi_only.jpg", b"\xff\xd8", reason=r"not an image|truncated", label="bad"),
        Case("corrupt_header.jpg", _flip_bytes(jpg, 2, 80, 1), reason=r"not an image|could not", label="bad"),
        Case("corrupt_data.jpg", _flip_bytes(jpg, 400, len(jpg) - 2), reason=r"could not be decoded", label="bad"),
        Case("corrupt_data.png", _flip_bytes(png, 100, 101), reason=r"could not be decoded", label="bad"),
        Case("html.jpg", HTML, reason=r"not an image.*HTML page", label="bad"),
        Case("text.png", b"hello, I am a text file\n" * 10, reason=r"not an image.*text", label="bad"),
        Case("bomb.png", png_bomb(), reason=r"decompression bomb", label="bad"),
        Case("bomb.gif", gif_bomb(), reason=r"decompression bomb", label="bad"),
    ]


def write_corpus(folder: str | Path, with_special: bool = True) -> dict[str, Case]:
    """Write the corpus as a class-per-folder dataset: `folder/good/*` decodable, `folder/bad/*` refused.

    With `with_special`, also: a symlink loop (`bad/loop.jpg` -> itself), a directory symlink cycle
    (`good/cycle` -> `..`), a directory named `bad/dir.jpg`, and a good PNG under a non-UTF-8 file name.
    Returns {relative path: Case} for the plain files (including the non-UTF-8 one).
    """
    folder = Path(folder)
    written: dict[str, Case] = {}
    for case in make_cases():
        path = folder / case.label / case.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(case.data)
        written[f"{case.label}/{case.name}"] = case
    if with_special:
        (folder / "bad" / "loop.jpg").symlink_to("loop.jpg")  # ELOOP on open
        (folder / "good" / "cycle").symlink_to("..", target_is_directory=True)  # a walker that follows links loops
        (folder / "bad" / "dir.jpg").mkdir()
        odd = Case(NON_UTF8_NAME, valid_png(16, 16, seed=3), shape=(16, 16, 3))
        (folder / "good" / odd.name).write_bytes(odd.data)
        written[f"good/{odd.name}"] = odd
    return written


def printable(s: str) -> str:
    """`s` with undecodable bytes (surrogate escapes) shown as \\xNN: safe to print to any UTF-8 stream."""
    return os.fsencode(s).decode("utf-8", "backslashreplace") if isinstance(s, str) else repr(s)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "badinput-corpus")
    for rel, case in write_corpus(out).items():
        print(f"{'decodes' if case.ok else 'refused'}  {printable(str(out / rel))}")
