"""Which of timm's `vit_*` model names vitkit builds, checked against timm itself.

Each name in `timm.list_models("vit_*")` is either supported (vitkit's `create_model(name)` has timm's state-dict
keys and shapes, parameter count, head count, LayerNorm eps, activation and pooling) or unsupported with the reason
`config_from_name` gives (UnsupportedModelError). Both models are built on the `meta` device, so no memory is
touched and the whole list takes seconds. Regenerate the docs table after a timm upgrade:

    python -m vitkit.interop.timm_names --write docs/timm-names.md
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import UnsupportedModelError, ViTConfig, config_from_name
from ..model import VisionTransformer
from ..optional import require

SUPPORTED, UNSUPPORTED, DIFFERS = "supported", "unsupported", "differs"


@dataclass
class NameCheck:
    """The outcome for one timm name."""

    name: str
    status: str  # supported | unsupported | differs
    reason: str = ""  # unsupported: what vitkit lacks; differs: what does not match timm
    timm_params: int | None = None  # timm's parameter count with vitkit's default head (1000 classes)


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Persistent state-dict entries and their shapes (non-persistent buffers such as sin-cos tables aside)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _timm_layer_facts(model: nn.Module) -> dict[str, Any]:
    """What timm's first block and pooling compute with, in vitkit's terms (None where the block is not timm's
    plain pre-norm Block)."""
    block = model.blocks[0] if len(model.blocks) else None
    if block is None or type(block).__name__ != "Block" or type(block.mlp).__name__ != "Mlp":
        return dict(block=type(block).__name__ if block is not None else None)
    act = block.mlp.act
    return dict(
        block="Block",
        attention=type(block.attn).__name__,
        num_heads=block.attn.num_heads,
        norm=type(block.norm1).__name__,
        norm_eps=block.norm1.eps,
        activation="gelu" if type(act) is nn.GELU and act.approximate == "none" else type(act).__name__,
        global_pool=model.global_pool or "none",
        pool_include_prefix=getattr(model, "pool_include_prefix", False),
    )


def _vitkit_layer_facts(cfg: ViTConfig) -> dict[str, Any]:
    return dict(
        block="Block",
        attention="Attention",
        num_heads=cfg.num_heads,
        norm="LayerNorm",
        norm_eps=cfg.norm_eps,
        activation="gelu",
        global_pool=cfg.global_pool,
        pool_include_prefix=False,
    )


def _differences(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> list[str]:
    """Human-readable state-dict differences, a few of each kind."""
    out = []
    if missing := sorted(set(theirs) - set(ours)):
        out.append(f"vitkit lacks {missing[:3]}")
    if extra := sorted(set(ours) - set(theirs)):
        out.append(f"vitkit has extra {extra[:3]}")
    shared = sorted(set(ours) & set(theirs))
    if shapes := [f"{k} {ours[k]} vs timm {theirs[k]}" for k in shared if ours[k] != theirs[k]]:
        out.append("shapes differ: " + "; ".join(shapes[:3]))
    return out


def check_timm_name(name: str) -> NameCheck:
    """Build `name` with vitkit and with timm (meta device) and compare; or record why vitkit refuses it."""
    timm = require("timm", "checking timm's model names")
    try:
        cfg = config_from_name(name)
    except UnsupportedModelError as e:
        return NameCheck(name, UNSUPPORTED, e.reason)
    except ValueError as e:  # a timm name vitkit neither builds nor explains: the table needs an entry
        return NameCheck(name, DIFFERS, f"config_from_name: {e}")
    with torch.device("meta"):
        ours = VisionTransformer(cfg)
        theirs = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes)
    timm_params = sum(p.numel() for p in theirs.parameters())
    problems = _differences(state_shapes(ours), state_shapes(theirs))
    if sum(p.numel() for p in ours.parameters()) != timm_params:
        problems.append(f"{sum(p.numel() for p in ours.parameters())} parameters vs timm {timm_params}")
    facts_ours, facts_timm = _vitkit_layer_facts(cfg), _timm_layer_facts(theirs)
    problems += [f"{k} {facts_ours.get(k)!r} vs timm {v!r}" for k, v in facts_timm.items() if facts_ours.get(k) != v]
    return NameCheck(name, DIFFERS if problems else SUPPORTED, "; ".join(problems), timm_params)


def timm_vit_names() -> list[str]:
    """timm's `vit_*` model names (the installed timm's)."""
    return list(require("timm", "checking timm's model names").list_models("vit_*"))


def sweep(names: Iterable[str] | None = None) -> list[NameCheck]:
    """check_timm_name for every name (default: all of timm's `vit_*`)."""
    return [check_timm_name(n) for n in (timm_vit_names() if names is None else names)]


def markdown(results: list[NameCheck], timm_version: str) -> str:
    """The docs page: supported names with timm's parameter count, unsupported ones with the reason."""
    ok = [r for r in results if r.status == SUPPORTED]
    no = [r for r in results if r.status == UNSUPPORTED]
    bad = [r for r in results if r.status == DIFFERS]
    lines = [
        "# timm model names",
        "",
        f"`vitkit.create_model(NAME)` against `timm.create_model(NAME)` for every name in timm {timm_version}'s",
        f'`timm.list_models("vit_*")`: {len(ok)} supported, {len(no)} not (a different block type or layer).',
        "Supported means the same state-dict keys and shapes, parameter count, head count, LayerNorm eps, activation",
        "and pooling, so timm's weights for the name load 1:1 (`vitkit.from_pretrained`). An unsupported name raises",
        "`vitkit.config.UnsupportedModelError` with the reason below. A pretrained tag (`NAME.augreg_in21k`) does",
        "not change the architecture.",
        "",
        "Parameter counts are with vitkit's default head of 1000 classes; `timm.create_model(NAME)` without",
        "`num_classes` takes the head of the name's default pretrained tag (none for most SigLIP and DINOv2 names).",
        "Generated by `python -m vitkit.interop.timm_names --write docs/timm-names.md`; `tests/test_timm_names.py`",
        "checks the installed timm against the same rules.",
        "",
    ]
    if bad:
        lines += ["## Differ from timm (to fix)", "", "| name | difference |", "| --- | --- |"]
        lines += [f"| `{r.name}` | {r.reason} |" for r in bad] + [""]
    lines += [f"## Supported ({len(ok)})", "", "| name | parameters (timm) |", "| --- | ---: |"]
    lines += [f"| `{r.name}` | {r.timm_params:,} |" for r in ok]
    lines += ["", f"## Not supported ({len(no)})", "", "| name | vitkit has no |", "| --- | --- |"]
    lines += [f"| `{r.name}` | {r.reason} |" for r in no]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check timm's vit_* names against vitkit; print or write the table.")
    parser.add_argument("--write", type=Path, help="write the markdown page here instead of printing it")
    args = parser.parse_args(argv)
    timm = require("timm", "checking timm's model names")
    results = sweep()
    page = markdown(results, timm.__version__)
    if args.write:
        args.write.write_text(page)
    else:
        print(page, end="")
    return 1 if any(r.status == DIFFERS for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["NameCheck", "check_timm_name", "sweep", "timm_vit_names", "markdown", "state_shapes", "main"]
