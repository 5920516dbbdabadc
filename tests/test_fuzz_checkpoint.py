"""Fuzzing the checkpoint-metadata parser and the safetensors header: a model or a CheckpointError, nothing else.

Bounded to seconds; `VITKIT_FUZZ_EXAMPLES=5000` explores deeper.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitkit
from vitkit.model.loading import load_model
from vitkit.model.serialization import CheckpointError, build_metadata, parse_metadata

from .conftest import tiny_kwargs

EXAMPLES = int(os.environ.get("VITKIT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

torch.manual_seed(0)
MODEL = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=1, embed_dim=16, num_heads=2))
META = build_metadata(MODEL)
CONFIG = json.loads(META["config"])
PREPROCESS = json.loads(META["preprocess"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_json_object(draw, base: dict) -> dict:
    """`base` with a few fields replaced by random JSON values, removed, or added."""
    d = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "add":
            d[draw(st.text(max_size=10))] = draw(json_values)
        elif d:
            key = draw(st.sampled_from(sorted(d)))
            if op == "delete":
                del d[key]
            else:
                d[key] = draw(json_values)
    return d


def _dumps(v) -> str:
    return json.dumps(v, allow_nan=True)


@st.composite
def metadata(draw) -> dict[str, str]:
    meta = dict(META)
    target = draw(st.sampled_from(["config", "preprocess", "labels", "format", "raw"]))
    if target == "config":
        meta["config"] = _dumps(draw(mutated_json_object(CONFIG)))
    elif target == "preprocess":
        meta["preprocess"] = _dumps(draw(mutated_json_object(PREPROCESS)))
    elif target == "labels":
        meta["labels"] = _dumps(draw(json_values))
    elif target == "format":
        meta["format"] = draw(st.text(max_size=8))
    else:  # any key, any text
        meta[draw(st.sampled_from(["config", "preprocess", "labels"]))] = draw(st.text(max_size=40))
    return meta


@pytest.mark.timeout(60)
@FUZZ
@given(metadata())
def test_parse_metadata_returns_or_raises_checkpoint_error(meta):
    try:
        cfg, pre, labels = parse_metadata(meta, "fuzz.safetensors")
    except CheckpointError as e:
        assert "fuzz.safetensors" in str(e)
        return
    # what it accepts must be buildable (on the meta device: no memory)
    with torch.device("meta"):
        vitkit.VisionTransformer(cfg, preprocess=pre, labels=labels)
    assert labels is None or len(labels) == cfg.num_classes


def _header_entries() -> dict:
    """The real header of MODEL's file: {name: {dtype, shape, data_offsets}} plus __metadata__."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in MODEL.state_dict().items()}, metadata=META)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


HEADER, DATA = _header_entries()


@st.composite
def safetensors_file(draw) -> bytes:
    """A safetensors file whose JSON header has been mutated (tensor entries, metadata, or the header itself)."""
    header = json.loads(json.dumps(HEADER))
    names = sorted(k for k in header if k != "__metadata__")
    if draw(st.integers(0, 9)) == 0:  # now and then, a header that is not even an object of entries
        header = draw(json_values)
    for _ in range(draw(st.integers(1, 3)) if isinstance(header, dict) else 0):
        what = draw(st.sampled_from(["entry", "field", "metadata", "drop"]))
        name = draw(st.sampled_from(names))
        if what == "entry":
            header[name] = draw(json_values)
        elif what == "field" and isinstance(header.get(name), dict):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header[name][field] = draw(
                json_values
                | st.sampled_from(["F16", "BF16", "I32", "U8", "BOOL", "F64", "F8_E4M3", "C64"])
                | st.lists(st.integers(-2, 1 << 20), max_size=4)
            )
        elif what == "metadata":
            old = header.get("__metadata__")
            header["__metadata__"] = draw(
                (mutated_json_object(old) if isinstance(old, dict) else st.nothing()) | json_values
            )
        elif what == "drop":
            header.pop(name, None)
    raw = json.dumps(header).encode()
    if draw(st.booleans()):  # the length prefix lies sometimes
        prefix = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    else:
        prefix = struct.pack("<Q", len(raw))
    return prefix + raw + DATA


@pytest.mark.timeout(120)
@FUZZ
@given(safetensors_file())
def test_mutated_safetensors_header(blob):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.safetensors"
        path.write_bytes(blob)
        for load in (load_model, vitkit.from_pretrained):
            try:
                model = load(path)
            except CheckpointError as e:
                assert "fuzz.safetensors" in str(e)
            else:
                assert isinstance(model, vitkit.VisionTransformer)


def test_unmutated_file_loads(tmp_path):
    """Control: the fuzzing starts from a file that loads."""
    path = tmp_path / "ok.safetensors"
    header = json.dumps(HEADER).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + DATA)
    assert torch.equal(load_model(path).head.weight, MODEL.head.weight)


def _training_checkpoint_bytes() -> bytes:
    import io

    from vitkit.train.checkpoint import CKPT_FORMAT

    buf = io.BytesIO()
    state = {"model": {k: v.clone() for k, v in list(MODEL.state_dict().items())[:3]}, "optimizer": {}, "step": 3}
    torch.save({"format": CKPT_FORMAT, "version": 1, **state}, buf)
    return buf.getvalue()


TRAIN_CKPT = _training_checkpoint_bytes()


@st.composite
def mutated_training_checkpoint(draw) -> bytes:
    data = bytearray(TRAIN_CKPT)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "overwrite", "truncate"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i : i + len(chunk)] = chunk
        else:
            del data[i:]
    return bytes(data)


@pytest.mark.timeout(120)
@FUZZ
@given(mutated_training_checkpoint())
def test_mutated_training_checkpoint_loads_or_raises_checkpoint_error(blob):
    from vitkit.train.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "last.ckpt"
        path.write_bytes(blob)
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            assert "last.ckpt" in str(e)
        else:
            assert isinstance(state, dict)
