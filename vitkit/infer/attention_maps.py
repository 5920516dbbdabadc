"""Turn per-layer attention maps (B, heads, N, N) into per-image heatmaps over the patch grid (B, h, w).

Token order inside a vitkit ViT is [cls?, registers..., patches...]; `num_prefix_tokens` counts the first two
kinds. Register tokens are never drawn: maps keep only patch columns and rescale them to sum to 1.

- `cls_attention`: how much the class token attends to each patch in one layer.
- `patch_attention`: for models without a class token (avg / map pooling): the mean attention that all patch
  queries give each patch in one layer.
- `attention_rollout` (Abnar & Zuidema 2020): attention flow through all layers, each layer's attention mixed
  with the residual path as 0.5·A + 0.5·I; optionally the lowest attentions are discarded first.
- `gradient_rollout` (Chefer et al. 2021): rollout of attention weighted by its gradient for one class, so the
  map depends on the class asked about; `attention_gradients` takes those gradients from a grad-enabled forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HeadChoice = int | str  # an index, "mean", "max", "min", or "all" (keep every head)


def select_heads(attn: torch.Tensor, head: HeadChoice = "mean") -> torch.Tensor:
    """Fuse or pick heads along dim 1: (B, heads, ...) -> (B, ...), or unchanged for head="all"."""
    if head == "all":
        return attn
    if head == "mean":
        return attn.mean(dim=1)
    if head == "max":
        return attn.amax(dim=1)
    if head == "min":
        return attn.amin(dim=1)
    try:
        index = int(head)
    except (TypeError, ValueError):
        raise ValueError(f"head must be an index, 'mean', 'max', 'min' or 'all', got {head!r}") from None
    if not -attn.shape[1] <= index < attn.shape[1]:
        raise ValueError(f"head {index} does not exist: this layer has {attn.shape[1]} heads (0..{attn.shape[1] - 1})")
    return attn[:, index]


def _patch_map(rows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., h*w) weights on patch keys -> (..., h, w), rescaled to sum to 1 over the patches."""
    rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows.reshape(*rows.shape[:-1], *grid)


def cls_attention(attn: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], head: HeadChoice = "mean"):
    """How much the class token attends to each patch in one layer: (B, heads, N, N) -> (B, h, w).

    Register tokens are prefix tokens and are left out of the map. head="mean" averages the heads;
    an int selects one; "all" keeps them: (B, heads, h, w). Each map is rescaled to sum to 1 over patches.
    """
    a = _patch_map(attn[:, :, 0, num_prefix_tokens:].float(), grid)  # (B, heads, h, w): cls query, patch keys
    return select_heads(a, head)


def patch_attention(attn: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], head: HeadChoice = "mean"):
    """Mean attention that all patch queries give each patch key, for models without a class token.

    (B, heads, N, N) -> (B, h, w) (or (B, heads, h, w) with head="all"); rescaled to sum to 1 over patches.
    """
    P = num_prefix_tokens
    a = attn[:, :, P:, P:].float().mean(dim=2)  # (B, heads, h*w): averaged over patch queries
    return select_heads(_patch_map(a, grid), head)


def attention_rollout(
    maps: Sequence[torch.Tensor], head: HeadChoice = "mean", discard_ratio: float = 0.0, keep_cls_column: bool = True
) -> torch.Tensor:
    """Attention rollout over layers in order: list of (B, heads, N, N) -> (B, N, N), every row sums to 1.

    Each layer: fuse heads, optionally zero the lowest `discard_ratio` of the entries (never the class token's
    column when `keep_cls_column`), add the residual path (0.5·A + 0.5·I), renormalise rows, and multiply
    onto the running product: R = Â_L ··· Â_1. Row i of R says how output token i mixes the input tokens.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one layer's attention")
    if head == "all":
        raise ValueError("rollout fuses heads in every layer; use head='mean', 'max', 'min' or an index")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    B, _, N, _ = maps[0].shape
    eye = torch.eye(N, device=maps[0].device)
    rollout = eye.expand(B, N, N)
    for attn in maps:
        a = select_heads(attn.float(), head)  # (B, N, N)
        if discard_ratio > 0:
            a = discard_lowest(a, discard_ratio, keep_cls_column)
        a = 0.5 * a + 0.5 * eye  # the residual connection carries the token itself forward
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout  # (B, N, N)
    return rollout


def discard_lowest(a: torch.Tensor, ratio: float, keep_cls_column: bool = True) -> torch.Tensor:
    """Zero the lowest `ratio` of each image's (N, N) attention entries; the cls column (0) is kept: (B, N, N)."""
    B, N, _ = a.shape
    flat = a.reshape(B, N * N).clone()
    ranked = flat.clone()
    if keep_cls_column:
        ranked.view(B, N, N)[:, :, 0] = float("inf")  # never chosen as "lowest"
    n_candidates = N * N - (N if keep_cls_column else 0)
    k = int(n_candidates * ratio)
    if k > 0:
        lowest = ranked.topk(k, dim=-1, largest=False).indices  # (B, k)
        flat.scatter_(1, lowest, 0.0)
    return flat.view(B, N, N)


def rollout_map(rollout: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], has_cls: bool) -> torch.Tensor:
    """(B, N, N) rollout -> (B, h, w): the class token's row over patches, or (no cls) the mean patch row."""
    P = num_prefix_tokens
    rows = rollout[:, 0, P:] if has_cls else rollout[:, P:, P:].mean(dim=1)  # (B, h*w)
    return _patch_map(rows, grid)


def to_unit_range(heat: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map over its last two dims to [0, 1] for display (a flat map becomes all zeros)."""
    lo = heat.amin(dim=(-2, -1), keepdim=True)
    hi = heat.amax(dim=(-2, -1), keepdim=True)
    return (heat - lo) / (hi - lo).clamp_min(1e-12)


def keep_mass_mask(heat: torch.Tensor, mass: float) -> torch.Tensor:
    """The smallest set of patches holding `mass` of each map's attention, as a bool mask (DINO's visualisation).

    heat (..., h, w), each map summing to 1 (as `cls_attention` returns them). Per map, the patches are sorted by
    weight, highest first, and kept while the weight before them is still short of `mass`: the kept set reaches
    the mass, and without its lightest patch it would not (both up to 1e-6: twelve patches of 1/20 hold 60 %, though
    float32 sums them to 0.59999996). Returns a bool tensor of heat's shape.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"the attention mass to keep must be in (0, 1], got {mass}")
    flat = heat.flatten(-2).double()  # (..., h*w)
    flat = flat / flat.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    weights, order = flat.sort(dim=-1, descending=True)
    before = weights.cumsum(dim=-1) - weights  # the mass of the heavier patches ahead of each one
    keep_sorted = before < mass - 1e-6
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.view(heat.shape)


def attention_gradients(output: torch.Tensor, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of a scalar `output` with respect to each attention map (B, heads, N, N) of the same forward.

    The maps must come from a grad-enabled forward (`model(x, return_attention=...)`). The model hands back each
    map as a reshaped view of the softmax output that the attention product consumed, so the product's graph runs
    through that softmax output rather than through the view: the gradient is taken with respect to the view's
    base (the same numbers, laid out the same way) and given the map's shape.

    Raises:
        RuntimeError: a map is not part of `output`'s autograd graph (e.g. computed under no_grad).
    """

    def graph_tensor(m: torch.Tensor) -> torch.Tensor:
        base = m._base
        same_layout = (
            base is not None
            and base.numel() == m.numel()
            and base.is_contiguous()
            and m.is_contiguous()
            and base.storage_offset() == m.storage_offset()
        )
        return base if same_layout else m

    inputs = [graph_tensor(m) for m in maps]
    if not all(t.requires_grad for t in inputs):
        raise RuntimeError("the attention maps are not part of an autograd graph: run the forward with grad enabled")
    grads = torch.autograd.grad(output, inputs, allow_unused=True)
    if any(g is None for g in grads):
        raise RuntimeError("an attention map does not reach the output: its gradient cannot be taken")
    return [g.reshape(m.shape) for g, m in zip(grads, maps)]


def gradient_rollout(maps: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], head: HeadChoice = "mean"):
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf 2021, "Generic attention-model explainability"):
    attention maps and their gradients for one class, lists of (B, heads, N, N) in layer order -> (B, N, N).

    Each layer: Ā = heads fused (mean by default) of max(∇A ⊙ A, 0), keeping the attention that raised the class
    score; then R ← R + Ā R from R = I (the identity is the residual path). Row i of R says how much each input
    token contributed to output token i for that class; `rollout_map` reads the class token's row.
    """
    if not maps or len(maps) != len(grads):
        raise ValueError(f"gradient rollout needs one gradient per attention map, got {len(maps)} and {len(grads)}")
    if head == "all":
        raise ValueError("gradient rollout fuses heads in every layer; use head='mean', 'max', 'min' or an index")
    B, _, N, _ = maps[0].shape
    relevance = torch.eye(N, device=maps[0].device).expand(B, N, N)
    for attn, grad in zip(maps, grads):
        weighted = select_heads((grad.float() * attn.float()).clamp(min=0), head)  # (B, N, N)
        relevance = relevance + weighted @ relevance
    return relevance
