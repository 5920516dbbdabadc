"""Fuzzing the image-decoding path: whatever the bytes, `decode_image` returns (H, W, 3) uint8 or raises
ImageDecodeError naming the upload. Bounded to seconds; `VITKIT_FUZZ_EXAMPLES=5000` explores deeper."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitkit.data.decode import ImageDecodeError, decode_image

from .badinput import encode, noise_image, valid_jpeg, valid_png

EXAMPLES = int(os.environ.get("VITKIT_FUZZ_EXAMPLES", "150"))
MAX_PIXELS = 1 << 20  # mutated headers often declare big images; a small limit keeps each example fast
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seeds() -> dict[str, bytes]:
    small = noise_image(12, 16, seed=1)
    return {
        "jpeg": valid_jpeg(12, 16),
        "progressive_jpeg": encode(small, "JPEG", progressive=True),
        "png": valid_png(12, 16),
        "png_palette": encode(small.convert("P"), "PNG"),
        "png16": encode(Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000), "PNG"),
        "gif": encode(small.convert("P"), "GIF"),
        "bmp": encode(small, "BMP"),
        "tiff": encode(small, "TIFF"),
        "webp": encode(small, "WEBP"),
        "ico": encode(small, "ICO"),
    }


SEEDS = _seeds()
MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
    b"\x00\x00\x01\x00",
]


def _check(data: bytes) -> None:
    try:
        a = decode_image(data, name="<fuzz>", max_pixels=MAX_PIXELS)
    except ImageDecodeError as e:
        assert "<fuzz>" in str(e)
        str(e).encode("utf-8")  # printable
        return
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8
    assert a.ndim == 3 and a.shape[2] == 3 and a.shape[0] >= 1 and a.shape[1] >= 1
    assert a.shape[0] * a.shape[1] <= MAX_PIXELS


@st.composite
def mutated(draw) -> bytes:
    """A valid file with a few bit flips, overwrites, insertions, deletions or a truncation."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i : i + len(chunk)] = chunk
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        else:
            del data[i:]
    return bytes(data)


@pytest.mark.timeout(60)
@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _check(data)


@pytest.mark.timeout(60)
@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=512))
def test_magic_number_then_garbage(magic, tail):
    _check(magic + tail)


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=EXAMPLES * 3)
@given(mutated())
def test_mutated_valid_images(data):
    _check(data)


def test_seeds_decode():
    """Control: the unmutated seeds all decode, so the fuzzing starts from real files."""
    for name, data in SEEDS.items():
        assert decode_image(data, name=name).shape[2] == 3, name
