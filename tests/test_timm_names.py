"""timm's `vit_*` names: each one builds exactly as timm does, or fails with the reason docs/timm-names.md gives.

The sweep builds vitkit's and timm's model for every name on the `meta` device (no memory, seconds for the list);
a few representative names are also checked number for number, timm's weights loaded into vitkit's model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import vitkit
from vitkit.config import TIMM_FAMILIES, UnsupportedModelError, config_from_name, timm_family_names

try:
    import timm

    TIMM_NAMES = timm.list_models("vit_*")
except ImportError:  # the sweep needs timm (dev extra); the docs checks below do not
    timm = None
    TIMM_NAMES = []

DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "timm-names.md"
WIDE_REPRESENTATIVES = {"vit_large_patch16_224", "vit_so400m_patch14_siglip_224", "vit_so400m_patch14_reg1_tipsv2"}


def _sweep_case(name: str) -> str | pytest.ParameterSet:
    """Building a wide model takes timm ~0.5 s even on the meta device: those beyond a few representatives run with
    the slow tests (`make test-slow`); narrower names and every unsupported one (no timm build) run always."""
    try:
        wide = config_from_name(name).embed_dim >= 1024 and name not in WIDE_REPRESENTATIVES
    except Exception:  # unsupported (or a decoder bug, which the test itself reports)
        wide = False
    return pytest.param(name, marks=pytest.mark.slow) if wide else name


def _doc_rows(section: str) -> dict[str, str]:
    """{name: second column} of one table of docs/timm-names.md ("Supported" or "Not supported")."""
    text = DOCS_PAGE.read_text()
    body = text.split(f"## {section} (", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([^`]+)` \| (.+) \|$", body, re.M)}


# ------------------------------------------------------------------------------------------------ the sweep
@pytest.mark.parametrize("name", [_sweep_case(n) for n in TIMM_NAMES])
def test_every_timm_vit_name_builds_as_timm_or_says_why_not(name):
    from vitkit.interop.timm_names import DIFFERS, check_timm_name

    result = check_timm_name(name)  # a TypeError / KeyError from the decoder would escape and fail here
    assert result.status != DIFFERS, f"{name}: {result.reason}"


def test_docs_table_lists_this_timms_names():
    """Every installed timm name is on the page (the sweep above checks each against timm, the tests below check
    the page against vitkit)."""
    if timm is None:
        pytest.skip("timm not installed")
    documented = re.search(r"name in timm (\S+)'s", DOCS_PAGE.read_text()).group(1)
    if documented != timm.__version__:
        pytest.skip(f"docs/timm-names.md was generated with timm {documented}, {timm.__version__} is installed")
    assert set(_doc_rows("Supported")) | set(_doc_rows("Not supported")) == set(TIMM_NAMES)


# ------------------------------------------------------------------------------ the docs page, without timm
def test_documented_supported_names_build_with_the_documented_parameter_count():
    rows = _doc_rows("Supported")
    assert len(rows) > 50
    for name, count in rows.items():
        with torch.device("meta"):
            model = vitkit.create_model(name)
        assert f"{sum(p.numel() for p in model.parameters()):,}" == count, name


def test_documented_unsupported_names_raise_the_documented_reason():
    rows = _doc_rows("Not supported")
    assert len(rows) > 50
    for name, reason in rows.items():
        with pytest.raises(UnsupportedModelError) as err:
            vitkit.create_model(name)
        assert err.value.reason == reason and err.value.name == name
        assert str(err.value).startswith(f"'{name}': vitkit has no ")


# ------------------------------------------------------------------------------------- decoding, directly
def test_the_issue_examples():
    cfg = config_from_name("vit_base_patch16_reg4_gap_256")
    assert (cfg.img_size, cfg.reg_tokens, cfg.class_token, cfg.global_pool) == ((256, 256), 4, False, "avg")
    with pytest.raises(UnsupportedModelError, match="vitkit has no relative-position ViT"):
        vitkit.create_model("vit_relpos_base_patch16_224")
    with pytest.raises(UnsupportedModelError, match="hybrid ViT"):
        vitkit.create_model("vit_base_r50_s16_384.orig_in21k_ft_in1k")  # a pretrained tag changes nothing


def test_a_size_that_is_not_whole_patches_names_the_size_that_is():
    with pytest.raises(UnsupportedModelError, match=r"img_size=378\) has the same weights"):
        config_from_name("vit_so400m_patch14_siglip_384")
    assert config_from_name("vit_so400m_patch14_siglip_384", img_size=378).grid_size == (27, 27)
    assert config_from_name("vit_so400m_patch14_siglip_384", patch_size=16).grid_size == (24, 24)  # whole again


def test_family_names_need_their_size_and_keep_overrides():
    with pytest.raises(ValueError, match="needs an image size"):
        config_from_name("vit_base_patch16_siglip")
    cfg = config_from_name("vit_small_patch14_dinov2", img_size=224, num_classes=7)
    assert (cfg.img_size, cfg.num_classes, cfg.init_values) == ((224, 224), 7, 1e-5)


def test_every_family_name_is_listed_and_builds():
    names = timm_family_names()
    assert len(names) >= len(TIMM_FAMILIES)
    assert set(names) <= set(vitkit.list_models())
    for name in names:
        config_from_name(name)


def test_generic_names_take_a_trailing_size():
    cfg = config_from_name("vit_small_patch16_reg2_gap_192")  # not a timm name: spelled out by its suffixes
    assert (cfg.img_size, cfg.reg_tokens, cfg.global_pool) == ((192, 192), 2, "avg")
    with pytest.raises(ValueError, match="two image sizes"):
        config_from_name("vit_small_patch16_224_gap_192")


# ------------------------------------------------------------------------------- number for number, a few
PARITY = [
    "vit_base_patch16_reg4_gap_256",  # registers without position embedding, avg pool with fc_norm
    "vit_base_patch16_gap_224",  # 16 heads at width 768, avg pool after the final norm
    "vit_medium_patch16_gap_256",  # no qkv bias, LayerScale
    "vit_so150m_patch16_reg4_map_256",  # attention pooling over the patch tokens, registers with positions
    "vit_so150m2_patch16_reg1_gap_256",  # 13 heads, mlp ratio 34/13
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg1_tipsv2",
    "vit_base_patch16_siglip_224",
]


@pytest.mark.parametrize("name", PARITY)
def test_logits_match_timm_with_timms_weights(name):
    if timm is None:
        pytest.skip("timm not installed")
    patch = config_from_name(name).patch_size[0]
    small = dict(depth=2, img_size=4 * patch, num_classes=5)
    with torch.device("meta"):  # built without their initialisation: every value is drawn below
        theirs = timm.create_model(name, pretrained=False, **small).eval()
        ours = vitkit.create_model(name, **small).eval()
    theirs.to_empty(device="cpu")
    with torch.no_grad():
        for p in theirs.parameters():  # LayerScale starts near zero: random values make every branch count
            p.normal_(0.0, 0.1)
    ours.to_empty(device="cpu").load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 4 * patch, 4 * patch)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
