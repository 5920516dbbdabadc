"""JAX .npz checkpoints in the exact key layouts of google-research/vision_transformer and big_vision.

Each test writes a random timm ViT as a Flax-layout .npz, checks that timm's own .npz loader
(`timm.models.vision_transformer._load_weights`) reads it back into the same model (so the file really has
that layout), then loads it with vitkit and compares logits with timm's loaded model (fp32, <= 1e-4).
"""

import numpy as np
import pytest
import torch

import vitkit
from vitkit.interop import load_with_report

from .test_interop import TOL, max_diff, timm_vit

timm = pytest.importorskip("timm")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().copy()


def _mha(arrays: dict, key: str, w_q, b_q, w_kv, b_kv, w_o, b_o, heads: int) -> None:
    """PyTorch fused projections -> Flax DenseGeneral kernels: q/k/v (D, heads, hd), out (heads, hd, D)."""
    D = w_o.shape[0]
    hd = D // heads
    ws = list(w_q.split(D)) + list(w_kv.split(D)) if w_kv is not None else list(w_q.split(D))
    bs = list(b_q.split(D)) + list(b_kv.split(D)) if b_kv is not None else list(b_q.split(D))
    for name, w, b in zip(("query", "key", "value"), ws, bs):
        arrays[f"{key}/{name}/kernel"] = _np(w.T.reshape(D, heads, hd))
        arrays[f"{key}/{name}/bias"] = _np(b.reshape(heads, hd))
    arrays[f"{key}/out/kernel"] = _np(w_o.T.reshape(heads, hd, D))
    arrays[f"{key}/out/bias"] = _np(b_o)


def write_npz(model, path, layout: str, scanned: bool = False) -> None:
    """A timm VisionTransformer as a .npz in the google-research ('gr') or big_vision ('bv') layout."""
    sd = model.state_dict()
    heads = model.blocks[0].attn.num_heads
    bv = layout == "bv"
    a: dict[str, np.ndarray] = {}
    a["embedding/kernel"] = _np(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0))  # (ph, pw, C, D)
    a["embedding/bias"] = _np(sd["patch_embed.proj.bias"])
    if "cls_token" in sd:
        a["cls"] = _np(sd["cls_token"])
    a["pos_embedding" if bv else "Transformer/posembed_input/pos_embedding"] = _np(sd["pos_embed"])
    a["Transformer/encoder_norm/scale"] = _np(sd["norm.weight"])
    a["Transformer/encoder_norm/bias"] = _np(sd["norm.bias"])
    if "head.weight" in sd:
        a["head/kernel"] = _np(sd["head.weight"].T)
        a["head/bias"] = _np(sd["head.bias"])
    mha, ln2, mlp = (0, 1, 0) if bv else (1, 2, 3)
    blocks = []
    for i in range(len(model.blocks)):
        p, b = f"blocks.{i}.", {}
        b["LayerNorm_0/scale"], b["LayerNorm_0/bias"] = _np(sd[p + "norm1.weight"]), _np(sd[p + "norm1.bias"])
        _mha(b, f"MultiHeadDotProductAttention_{mha}", sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"],
             None, None, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"], heads)  # fmt: skip
        b[f"LayerNorm_{ln2}/scale"], b[f"LayerNorm_{ln2}/bias"] = _np(sd[p + "norm2.weight"]), _np(sd[p + "norm2.bias"])
        for r in range(2):
            b[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = _np(sd[p + f"mlp.fc{r + 1}.weight"].T)
            b[f"MlpBlock_{mlp}/Dense_{r}/bias"] = _np(sd[p + f"mlp.fc{r + 1}.bias"])
        blocks.append(b)
    if scanned:  # one stacked block with a leading depth axis (big_vision scan=True)
        for k in blocks[0]:
            a[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            a.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    if "attn_pool.latent" in sd:
        p = "attn_pool."
        a["MAPHead_0/probe"] = _np(sd[p + "latent"])
        _mha(a, "MAPHead_0/MultiHeadDotProductAttention_0", sd[p + "q.weight"], sd[p + "q.bias"],
             sd[p + "kv.weight"], sd[p + "kv.bias"], sd[p + "proj.weight"], sd[p + "proj.bias"], heads)  # fmt: skip
        a["MAPHead_0/LayerNorm_0/scale"], a["MAPHead_0/LayerNorm_0/bias"] = (
            _np(sd[p + "norm.weight"]),
            _np(sd[p + "norm.bias"]),
        )
        for r in range(2):
            a[f"MAPHead_0/MlpBlock_0/Dense_{r}/kernel"] = _np(sd[p + f"mlp.fc{r + 1}.weight"].T)
            a[f"MAPHead_0/MlpBlock_0/Dense_{r}/bias"] = _np(sd[p + f"mlp.fc{r + 1}.bias"])
    if bv:
        a = {f"params/{k}": v for k, v in a.items()}
    np.savez(path, **a)


CASES = {
    # google-research/vision_transformer: cls token, pos embedding includes the cls position
    "gr_cls": ("gr", dict(), False),
    "gr_224_patch16_tiny": ("gr", dict(img_size=64, patch_size=16, depth=1), False),
    # big_vision: params/ prefix, patch-only pos_embedding; pool 'tok' (cls), 'gap' (no fc_norm) and 'map'
    "bv_tok": ("bv", dict(no_embed_class=True), False),
    "bv_gap": ("bv", dict(class_token=False, global_pool="avg", fc_norm=False), False),
    "bv_map": ("bv", dict(class_token=False, global_pool="map"), False),
    "bv_map_scanned": ("bv", dict(class_token=False, global_pool="map"), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_npz_parity_with_timm_loader(tmp_path, case):
    from timm.models.vision_transformer import _load_weights

    layout, kw, scanned = CASES[case]
    src = timm_vit(**kw)
    path = tmp_path / "w.npz"
    write_npz(src, path, layout, scanned)
    ref = timm_vit(**kw)  # different random weights until timm's loader fills them
    with torch.no_grad():
        _load_weights(ref, str(path))
    ref.eval()
    x = torch.randn(2, 3, *src.patch_embed.img_size)
    with torch.no_grad():
        assert max_diff(ref(x), src(x)) <= TOL  # the file holds the layout timm expects
        model, report = load_with_report(path)
        assert report.complete, report.details()
        assert max_diff(model(x), ref(x)) <= TOL
    assert report.format.endswith("(big_vision)" if layout == "bv" else "(google-research/vision_transformer)")
    assert model.cfg.num_heads == 3  # read from the attention kernels
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.interpolation == "bilinear"


def test_npz_extra_tensors_ignored_or_named(tmp_path):
    src = timm_vit()
    write_npz(src, tmp_path / "w.npz", "gr")
    arrays = dict(np.load(tmp_path / "w.npz"))
    arrays["pre_logits/kernel"] = np.zeros((192, 192), np.float32)
    arrays["Transformer/encoderblock_0/Surprise_0/kernel"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(vitkit.model.serialization.CheckpointError, match="Surprise_0"):
        vitkit.from_pretrained(tmp_path / "x.npz")
    model, report = load_with_report(tmp_path / "x.npz", strict=False)
    assert [s for s, _ in report.ignored] == ["pre_logits/kernel"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), src(x)) <= TOL


def test_npz_object_arrays_are_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(vitkit.model.serialization.CheckpointError, match="plain arrays"):
        vitkit.from_pretrained(tmp_path / "obj.npz")


def _bv_sincos(h: int, w: int, width: int) -> np.ndarray:
    """big_vision's posemb_sincos_2d, transcribed with numpy's mgrid/einsum as it is written there."""
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / (10_000.0 ** (np.arange(width // 4) / (width // 4 - 1)))
    y, x = np.einsum("m,d->md", y.flatten(), omega), np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


@pytest.mark.parametrize("size", [32, 64])
def test_big_vision_sincos_without_stored_pos_embedding(tmp_path, size):
    kw = dict(class_token=False, global_pool="avg", fc_norm=False, img_size=size)
    peer = timm_vit(**kw)
    with torch.no_grad():
        peer.pos_embed.copy_(torch.from_numpy(_bv_sincos(size // 8, size // 8, 192)))
    write_npz(peer, tmp_path / "w.npz", "bv")
    arrays = {k: v for k, v in np.load(tmp_path / "w.npz").items() if k != "params/pos_embedding"}
    np.savez(tmp_path / "sincos.npz", **arrays)
    model, report = load_with_report(tmp_path / "sincos.npz", **({"img_size": size} if size != 32 else {}))
    if size == 32:  # no size asked: big_vision's default 224 is assumed, then asked sizes recompute exactly
        assert model.cfg.img_size == (224, 224) and "sin-cos" in report.details()
        model, report = load_with_report(tmp_path / "sincos.npz", img_size=32)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model.cfg.img_size == (size, size) and max_diff(model(x), peer(x)) <= TOL
