"""Untrusted checkpoint files: code hidden in a pickle never runs; broken safetensors and configs give clear errors.

Every refusal must be a CheckpointError whose message names the file; nothing else may escape.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

import vitkit
from vitkit.model.loading import load_model
from vitkit.model.serialization import CheckpointError, build_metadata, parse_metadata

from .conftest import run_vitkit, tiny_kwargs, tiny_model


class CreatesFile:
    """Unpickling this object calls open(marker, 'w'): a stand-in for any code an attacker would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _timm_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refused(fn, *args, match: str = "", **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert match.lower() in msg.lower(), f"expected {match!r} in: {msg}"
    return msg


# ------------------------------------------------------------------------------------------------ pickles


def _pickle_variants(tmp_path, payload, state):
    """The same payload in each pickle container torch knows: zip (.pth), legacy (.bin), bare pickle (.pt)."""
    evil = {"state_dict": state, "extra": payload}
    zip_file, legacy, bare = tmp_path / "evil.pth", tmp_path / "evil.bin", tmp_path / "evil.pt"
    torch.save(evil, zip_file)
    torch.save(evil, legacy, _use_new_zipfile_serialization=False)
    bare.write_bytes(pickle.dumps(evil, protocol=2))
    return [zip_file, legacy, bare]


def test_the_payload_is_live(tmp_path, tiny):
    """Control: unpickling plainly does run the payload, so the refusals below are real refusals."""
    marker = tmp_path / "pwned_control"
    path = _pickle_variants(tmp_path, CreatesFile(str(marker)), {"w": torch.zeros(1)})[0]
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.timeout(60)
def test_pickle_carrying_code_is_refused_without_running_it(tmp_path, tiny):
    marker = tmp_path / "pwned"
    files = _pickle_variants(tmp_path, CreatesFile(str(marker)), _timm_state(tiny))
    for path in files:
        msg = _refused(vitkit.from_pretrained, path, match=path.name)
        assert "refused" in msg or "not a readable" in msg, msg
        assert not marker.exists(), f"{path.name}: the payload ran"
    # the same inside a transformers folder and a timm Hub folder
    for cfg in ({"model_type": "vit", "architectures": ["ViTForImageClassification"]}, {"architecture": "vit_tiny"}):
        folder = tmp_path / f"folder_{len(cfg)}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        torch.save({"state_dict": {}, "extra": CreatesFile(str(marker))}, folder / "pytorch_model.bin")
        _refused(vitkit.from_pretrained, folder, match="pytorch_model.bin")
        assert not marker.exists(), f"{folder.name}: the payload ran"


def test_plain_pickled_state_dict_still_loads(tmp_path, tiny):
    """weights_only=True refuses code, not weights: a clean timm-style .pth loads."""
    torch.save(_timm_state(tiny), tmp_path / "clean.pth")
    model = vitkit.from_pretrained(tmp_path / "clean.pth", num_heads=4)  # 32 wide: not a standard head count
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model.eval()(x), tiny.eval()(x), atol=1e-5)


def test_npz_with_object_array_is_refused(tmp_path):
    import numpy as np

    marker = tmp_path / "pwned_npz"
    arr = np.empty(1, dtype=object)
    arr[0] = CreatesFile(str(marker))
    np.savez(tmp_path / "evil.npz", evil=arr)
    _refused(vitkit.from_pretrained, tmp_path / "evil.npz", match="evil.npz")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ safetensors


def _write(tmp_path, name, tensors, meta) -> str:
    path = tmp_path / name
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


def _tamper_cases(model):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = build_metadata(model)
    cfg = json.loads(meta["config"])
    first = "blocks.0.attn.qkv.weight"

    def with_cfg(**kw):
        return {**meta, "config": json.dumps({**cfg, **kw})}

    return {
        # tensors that do not fit the config
        "int_dtype": ({**state, first: state[first].to(torch.int32)}, meta, "wrong shape/dtype"),
        "wrong_shape": ({**state, first: state[first][:-1]}, meta, "wrong shape/dtype"),
        "missing": ({k: v for k, v in state.items() if k != first}, meta, "missing ['blocks.0.attn.qkv.weight']"),
        "extra": ({**state, "evil.extra": torch.zeros(3)}, meta, "unexpected ['evil.extra']"),
        # metadata that is missing or malformed
        "no_config": (state, {k: v for k, v in meta.items() if k != "config"}, "lacks 'config'"),
        "config_not_json": (state, {**meta, "config": "{not json"}, "not valid JSON"),
        "config_is_list": (state, {**meta, "config": "[1, 2]"}, "expected an object"),
        "config_unknown_key": (state, with_cfg(warp_drive=True), "unknown key"),
        "config_string_width": (state, with_cfg(embed_dim="32"), "embed_dim"),
        "config_zero_heads": (state, with_cfg(num_heads=0), "num_heads"),
        "config_zero_patch": (state, with_cfg(patch_size=0), "patch_size"),
        "config_negative_depth": (state, with_cfg(depth=-1), "depth"),
        "config_huge_depth": (state, with_cfg(depth=10**9), "depth"),
        "config_deeper_than_file": (state, with_cfg(depth=3), "missing"),
        "config_nan_eps": (
            state,
            {**meta, "config": meta["config"].replace('"norm_eps": 1e-06', '"norm_eps": NaN')},
            "norm_eps",
        ),
        "config_huge_sincos": (state, with_cfg(img_size=65536, patch_size=1, pos_embed="sincos2d"), "buffer"),
        "preprocess_not_json": (state, {**meta, "preprocess": "]["}, "preprocess"),
        "preprocess_zero_std": (state, {**meta, "preprocess": json.dumps({"std": [0, 1, 1]})}, "std"),
        "preprocess_short_mean": (state, {**meta, "preprocess": json.dumps({"mean": [0.5]})}, "mean"),
        "preprocess_bad_crop": (state, {**meta, "preprocess": json.dumps({"crop_pct": 0})}, "crop_pct"),
        "preprocess_bad_interp": (state, {**meta, "preprocess": json.dumps({"interpolation": "magic"})}, "interp"),
        "labels_count": (state, {**meta, "labels": json.dumps(["a", "b"])}, "labels"),
        "labels_not_list": (state, {**meta, "labels": json.dumps({"a": 1})}, "labels"),
    }


@pytest.mark.timeout(60)
def test_tampered_vitkit_safetensors_give_a_clear_error(tmp_path, tiny):
    for name, (tensors, meta, match) in _tamper_cases(tiny).items():
        path = _write(tmp_path, f"{name}.safetensors", tensors, meta)
        msg = _refused(load_model, path, match=match)
        assert path.name in msg, msg
        # through the public entry point: a clear CheckpointError too (never a crash or a half-built model)
        _refused(vitkit.from_pretrained, path, match=path.name)


def test_damaged_files_give_a_clear_error(tmp_path, tiny):
    good = tmp_path / "good.safetensors"
    tiny.save(good)
    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    damaged = {
        "truncated.safetensors": data[: len(data) // 2],
        "header_only.safetensors": data[: 8 + header_len],
        "empty.safetensors": b"",
        "huge_header.safetensors": struct.pack("<Q", 2**62) + data[8:],
        "garbage_header.safetensors": data[:8] + b"\xff" * header_len + data[8 + header_len :],
        "html.safetensors": b"<html><body>404</body></html>",
        "html.pth": b"<html><body>404</body></html>",
        "empty.pth": b"",
        "truncated.pth": None,
    }
    buf = io.BytesIO()
    torch.save(tiny.state_dict(), buf)
    damaged["truncated.pth"] = buf.getvalue()[:5000]
    for name, blob in damaged.items():
        (tmp_path / name).write_bytes(blob)
        _refused(vitkit.from_pretrained, tmp_path / name, match=name)
    assert torch.equal(load_model(good).head.weight, tiny.head.weight)  # the control still loads


def test_metadata_absent_is_not_a_vitkit_checkpoint(tmp_path, tiny):
    path = _write(tmp_path, "bare.safetensors", {k: v.contiguous() for k, v in tiny.state_dict().items()}, None)
    _refused(load_model, path, match="not a vitkit checkpoint")
    # through from_pretrained it is a plain timm-named state dict: its architecture is inferred from shapes
    model = vitkit.from_pretrained(path, num_heads=4)
    assert model.cfg.embed_dim == tiny.cfg.embed_dim and model.cfg.depth == tiny.cfg.depth


def test_parse_metadata_rejects_non_dicts_and_non_strings():
    for meta in (None, [], "vitkit", {"format": "vitkit", "config": 5}, {"format": "vitkit", "config": None}):
        with pytest.raises(CheckpointError):
            parse_metadata(meta)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ folders

HF_OK = {"model_type": "vit", "architectures": ["ViTForImageClassification"], "hidden_size": 32}


@pytest.mark.parametrize(
    "config_text",
    [
        "{not json",
        "",
        "[1, 2, 3]",
        '"a string"',
        "null",
        json.dumps({"model_type": "vit", "architectures": 7}),
        json.dumps({**HF_OK, "image_size": "big"}),
        json.dumps({**HF_OK, "num_attention_heads": "many"}),
        json.dumps({**HF_OK, "num_attention_heads": 0}),
        json.dumps({**HF_OK, "layer_norm_eps": [1]}),
        json.dumps({**HF_OK, "id2label": ["a", "b"]}),
        json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": [1]}),
        json.dumps({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"input_size": 5}}),
        json.dumps({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"mean": "x"}}),
        json.dumps({"architecture": "vit_tiny_patch16_224", "label_names": {"x": "cat"}}),
        json.dumps({"architecture": 5}),
    ],
    ids=lambda s: s[:40],
)
def test_malformed_folder_config_json_gives_a_clear_error(tmp_path, tiny, config_text):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config_text)
    # weights in whichever naming the config claims: both layouts fail only because of the config
    torch.save(_timm_state(tiny), folder / "pytorch_model.bin")
    try:
        model = vitkit.from_pretrained(folder)
    except CheckpointError as e:
        assert "config.json" in str(e) or "model" in str(e), str(e)
    else:  # a config defect that can be worked around must still give a working model
        assert model(torch.randn(1, 3, *model.cfg.img_size)).shape[0] == 1


# ------------------------------------------------------------------------------------------------ training runs


def test_training_checkpoint_carrying_code_is_refused(tmp_path):
    from vitkit.train.checkpoint import CKPT_FORMAT, load_checkpoint, model_from_checkpoint

    marker = tmp_path / "pwned_ckpt"
    evil = {"format": CKPT_FORMAT, "version": 1, "model": {}, "optimizer": CreatesFile(str(marker))}
    torch.save(evil, tmp_path / "last.ckpt")
    for load in (load_checkpoint, model_from_checkpoint):
        _refused(load, tmp_path / "last.ckpt", match="last.ckpt")
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_cli_refuses_a_pickle_payload_with_one_clear_line(tmp_path):
    """`vitkit predict evil.pth` and `vitkit train` resuming from an evil last.ckpt: exit 1, no traceback."""
    from vitkit.train.checkpoint import CKPT_FORMAT

    marker = tmp_path / "pwned_cli"
    torch.save({"state_dict": {}, "x": CreatesFile(str(marker))}, tmp_path / "evil.pth")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"format": CKPT_FORMAT, "model": CreatesFile(str(marker))}, run_dir / "last.ckpt")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    (tmp_path / "x.png").write_bytes(png.getvalue())
    commands = {
        "predict": ["predict", "evil.pth", "x.png"],
        "train": [
            "train",
            "--data",
            "digits",
            "--out",
            "run",
            "--epochs",
            "1",
            "--cache-dir",
            "cache",
            "--no-progress",
        ],
    }
    for verb, args in commands.items():
        r = run_vitkit(args, cwd=tmp_path, timeout=120)
        assert r.returncode == 1, (verb, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert f"vitkit {verb}: error:" in r.stderr and ("evil.pth" in r.stderr or "last.ckpt" in r.stderr), r.stderr
        assert not marker.exists(), f"vitkit {verb} ran the payload"


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_chans=1),  # RGB statistics on a grayscale model: normalize() averages them
        dict(in_chans=4),
        dict(pos_embed="sincos2d", class_token=False, global_pool="avg", reg_tokens=2),
        dict(init_values=1e-5, qk_norm=True, fc_norm=False, img_size=(32, 48)),
        dict(num_classes=0, global_pool="map"),
    ],
    ids=lambda kw: ",".join(kw),
)
def test_the_checks_do_not_refuse_valid_models(tmp_path, kw):
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(**kw))
    model.save(tmp_path / "ok.safetensors")
    loaded = vitkit.from_pretrained(tmp_path / "ok.safetensors")
    assert loaded.cfg == model.cfg and loaded.preprocess == model.preprocess
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket

    from vitkit.files import atomic_write_bytes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    orphan = tmp_path / f".last.ckpt.{host}-{dead.pid}.abc123.tmp"
    live = tmp_path / f".last.ckpt.{host}-{os.getppid()}.def456.tmp"  # a writer still running
    other = tmp_path / f".other.ckpt.{host}-{dead.pid}.ghi789.tmp"  # another file's temp: not ours to judge
    for p in (orphan, live, other):
        p.write_bytes(b"partial")
    atomic_write_bytes(tmp_path / "last.ckpt", b"whole")
    assert (tmp_path / "last.ckpt").read_bytes() == b"whole"
    assert not orphan.exists() and live.exists() and other.exists()
