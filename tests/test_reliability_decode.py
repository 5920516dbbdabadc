"""The bad-input corpus through `decode_image`: correct pixels, or an ImageDecodeError naming the file and why.

Never another exception type, never a hang, never a message that cannot be printed.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageFile

from vitkit.data.decode import ImageDecodeError, decode_image, display_name

from .badinput import NON_UTF8_NAME, make_cases, png_bomb, printable, write_corpus

CASES = make_cases()


def _assert_refused(source, name_in_message: str, reason: str, **kw) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(source, **kw)
    msg = str(info.value)
    msg.encode("utf-8")  # strict: printable on any UTF-8 terminal or log
    assert name_in_message in msg, f"message does not name the file: {msg}"
    assert re.search(reason, msg, re.IGNORECASE), f"message {msg!r} does not give the reason /{reason}/"
    return info.value


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_from_bytes(case):
    if case.ok:
        a = decode_image(case.data, name=case.name)
        assert a.dtype == np.uint8 and a.shape == case.shape and a.flags.c_contiguous
        if case.check:
            case.check(a)
    else:
        _assert_refused(case.data, case.name, case.reason, name=case.name)


@pytest.mark.timeout(20)
def test_corpus_from_files(tmp_path):
    written = write_corpus(tmp_path)
    for rel, case in written.items():
        path = tmp_path / rel
        if case.ok:
            a = decode_image(path)
            assert a.shape == case.shape, rel
        else:
            _assert_refused(path, display_name(str(path)), case.reason)


@pytest.mark.timeout(20)
def test_links_directories_and_special_files_are_refused_not_waited_on(tmp_path):
    write_corpus(tmp_path)
    _assert_refused(tmp_path / "bad" / "loop.jpg", "loop.jpg", r"could not be read.*symbolic links")
    _assert_refused(tmp_path / "bad" / "dir.jpg", "dir.jpg", r"is a directory")
    _assert_refused(tmp_path / "missing.jpg", "missing.jpg", r"does not exist")
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening a FIFO for reading would block forever
    _assert_refused(fifo, "fifo.jpg", r"not a regular file")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    _assert_refused(tmp_path / "zero.jpg", "zero.jpg", r"not a regular file")


@pytest.mark.timeout(20)
def test_non_utf8_file_names_decode_and_print(tmp_path, capsys):
    good = tmp_path / NON_UTF8_NAME
    good.write_bytes(next(c for c in CASES if c.name == "good.png").data)
    assert decode_image(good).shape == (48, 64, 3)
    # the same name as bytes through os.fsdecode, and a broken file under that name
    bad = tmp_path / os.fsdecode(b"broken_\xff\xfe.jpg")
    bad.write_bytes(b"<html>")
    err = _assert_refused(bad, "broken_\\xff\\xfe.jpg", r"not an image")
    print(err)  # must not raise UnicodeEncodeError
    assert "broken_" in capsys.readouterr().out
    assert printable(NON_UTF8_NAME) == display_name(NON_UTF8_NAME) == "caf\\xe9_latin1_\\xff.png"


@pytest.mark.timeout(20)
def test_bomb_is_refused_from_the_header_before_any_pixel_is_allocated(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    # even when some library has switched PIL's own guard off, vitkit's limit holds
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _assert_refused(png_bomb(), "<upload>", r"100000x100000 .* over the limit .*decompression bomb")
    assert loads == [], "pixels were decoded before the size check"
    # a modest image over a caller's own limit is refused the same way
    _assert_refused(png_bomb(300, 200), "<upload>", r"60,000 pixels, over the limit of 10,000", max_pixels=10_000)
    assert loads == []
    ok = io.BytesIO()
    Image.new("RGB", (100, 100)).save(ok, "PNG")
    assert decode_image(ok.getvalue(), max_pixels=10_000).shape == (100, 100, 3)


def test_bytes_like_sources_are_content_not_paths():
    data = next(c for c in CASES if c.name == "good.jpg").data
    for source in (data, bytearray(data), memoryview(data)):
        assert decode_image(source).shape == (48, 64, 3)
