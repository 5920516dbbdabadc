"""The building blocks of a Vision Transformer: tokenizers, attention, MLP, LayerScale, DropPath, Block, MAP pool.

Module and parameter names follow timm (`patch_embed.proj`, `attn.qkv`, `mlp.fc1`, `ls1.gamma`, ...) so foreign
checkpoints map onto these modules almost 1:1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from . import cpu_kernels, fast_inference
from .attention_backend import pick_backend
from .fast_inference import Linear


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p×p patches and embed each linearly: one conv with stride = kernel."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H/p, W/p)."""
        if fast_inference.engaged(self, x):
            # CPU bf16 inference: the conv is one matmul of the (B, h*w, C*p*p) patches with the (D, C*p*p) weight;
            # as a prepacked linear it skips oneDNN's per-call conv weight reorder (1.5 ms of ViT-S/16's 18 ms at
            # batch 1). The (B, h*w, D) tokens come back as a (B, D, h, w) view, which flattens to tokens for free.
            B, C, H, W = x.shape
            p, q = self.patch_size
            h, w = H // p, W // q
            patches = x[:, :, : h * p, : w * q].to(torch.bfloat16).reshape(B, C, h, p, w, q)
            patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * q)  # (c, i, j): the weight's order
            tokens = fast_inference.linear(self.proj, patches)
            if tokens is not None:
                return tokens.view(B, h, w, -1).permute(0, 3, 1, 2)
        return self.proj(x)

    def train(self, mode: bool = True) -> PatchEmbed:
        if mode:  # drop the conv's packed copy, as fast_inference.Linear.train does (fused AdamW keeps versions)
            fast_inference.clear_cache(self.proj)
        return super().train(mode)


class ConvStem(nn.Module):
    """Convolutional tokenizer for small images (Xiao et al. 2021, "Early convolutions help transformers see").

    A stack of [3×3 conv → BatchNorm → ReLU] layers whose strides multiply to the patch size reaches the same
    patch grid as a p×p patch embedding; a 1×1 conv then maps the channels to the embedding width. `layers` gives
    (out_channels, stride) per conv; the default is log2(p) stride-2 layers with widths doubling up to D (D/4, D/2,
    D for p = 8). Overlapping receptive fields give the encoder locality that plain patches lack, and stride-1
    layers between the downsamplings let it learn local features fast on small datasets (CIFAR: 57 % -> 67 % in
    a 3-minute CPU budget, see vitkit/recipes/cifar10_budget.yaml).
    """

    def __init__(
        self,
        patch_size: tuple[int, int],
        in_chans: int,
        embed_dim: int,
        layers: tuple[tuple[int, int], ...] | None = None,
    ):
        super().__init__()
        if patch_size[0] != patch_size[1] or patch_size[0] & (patch_size[0] - 1):
            raise ValueError(f"stem='conv' needs a square power-of-two patch size, got {patch_size}")
        self.patch_size = patch_size
        if layers is None:
            n = patch_size[0].bit_length() - 1
            layers = tuple((max(embed_dim // 2 ** (n - 1 - i), 16), 2) for i in range(n))
        convs: list[nn.Module] = []
        chans = in_chans
        for out, stride in layers:
            convs += [nn.Conv2d(chans, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            chans = out
        self.stem = nn.Sequential(*convs)
        self.proj = nn.Conv2d(chans, embed_dim, kernel_size=1)
        # channels-last (NHWC) weights and activations: oneDNN's native layout, no reorders around every conv
        # (CIFAR training step +14 % on the AMX CPU); the (B, D, h, w) output then flattens to tokens for free
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(self.stem(x))  # (B, C, H, W) -> (B, D, H/p, W/p), stored NHWC


class Attention(nn.Module):
    """Multi-head self-attention with a choice of backend.

    `sdpa` calls PyTorch's fused scaled_dot_product_attention; `math` writes softmax(q kᵀ / √d) v out as
    matrix products, which is faster on CPU at short sequences (see attention_backend.py) and is the only
    path that can return the attention map. `auto` picks per call from measured rules.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        need_weights: bool = False,
        residual: torch.Tensor | None = None,
        queries: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) -> (B, Q, D) [+ residual, added inside the output projection], and (B, heads, Q, N) or None.

        queries: compute the output of the first Q tokens only (their queries attend over all N keys); None: Q = N.
        """
        B, N, C = x.shape
        qkv = self.qkv(x)  # (B, N, 3D)
        if self._on_training_kernel(qkv, need_weights, queries):
            o = cpu_kernels.attention_with_grad(qkv, self.num_heads, self.scale)  # (B, N, D)
            return self.proj_drop(self.proj(o, residual=residual)), None
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if queries is not None:
            q = q[:, :, :queries]  # (B, heads, Q, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        Q = q.shape[2]

        backend = "math" if need_weights else self.backend
        if backend == "auto":
            training = torch.is_grad_enabled() and x.requires_grad
            backend = pick_backend(x.device.type, N, training, q.dtype != torch.float32)
        attn = None
        if backend == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:  # heads folded into the batch, (B*heads, N, head_dim); the 1/sqrt(d) scale rides on the matmul
            H, hd = self.num_heads, self.head_dim
            q3, k3, v3 = q.reshape(B * H, Q, hd), k.reshape(B * H, N, hd), v.reshape(B * H, N, hd)
            attn = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=self.scale)
            attn = attn.softmax(dim=-1)  # (B*heads, Q, N)
            x = torch.bmm(self.attn_drop(attn), v3).view(B, H, Q, hd)  # (B, heads, Q, head_dim)
            attn = attn.view(B, H, Q, N)
        x = x.transpose(1, 2).reshape(B, Q, C)  # (B, Q, D)
        x = self.proj_drop(self.proj(x, residual=residual))
        return x, (attn if need_weights else None)

    def _on_training_kernel(self, qkv: torch.Tensor, need_weights: bool, queries: int | None) -> bool:
        """Whether this call's attention runs on vitkit's CPU kernels with their own backward (cpu_kernels.py): bf16
        training on the CPU where `auto` would pick explicit attention, for all queries, without attention dropout,
        qk-norm or a returned map, outside torch.compile (a C++ call would break its graph)."""
        if not (torch.is_grad_enabled() and qkv.requires_grad) or qkv.dtype != torch.bfloat16:  # inference, fp32
            return False
        if need_weights or queries is not None or self.backend != "auto" or not isinstance(self.q_norm, nn.Identity):
            return False
        if not qkv.is_cpu:
            return False
        if self.training and self.attn_drop.p > 0 or torch.compiler.is_compiling():
            return False
        N = qkv.shape[1]
        return pick_backend("cpu", N, True) == "math" and cpu_kernels.trainable(N, self.head_dim)


class Mlp(nn.Module):
    """Two linear layers with GELU between: D -> hidden -> D."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D) [+ residual, added inside fc2 on the CPU fast path]."""
        x = self.fc1(x, activation="gelu")  # GELU(fc1(x)), (B, N, hidden): one fused kernel on the CPU fast path
        return self.drop2(self.fc2(self.drop1(x), residual=residual))


class LayerScale(nn.Module):
    """Per-channel learned scale on a residual branch (CaiT): x * gamma, gamma initialised small."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.to(x.dtype) if fast_inference.engaged(self, x) else self.gamma  # keep a bf16 stream
        return x * gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's whole residual branch with probability p (rescale the rest)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PreNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict keys) for a block's norm1 / norm2, whose output feeds a linear.

    In bf16 autocast training on the CPU it writes bf16 straight away (`cpu_kernels.layer_norm_to_bf16`): autocast
    would run it in fp32 and the next linear would cast the result, a pass more each way. Elsewhere: nn.LayerNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.layer_norm_to_bf16(x, self) if torch.is_grad_enabled() else None  # inference: no detour
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) if y is None else y


class Block(nn.Module):
    """One Transformer encoder block: x + attn(LN(x)), then x + mlp(LN(x)) (pre-norm, optional LayerScale)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_backend: str = "auto",
    ):
        super().__init__()
        self.norm1 = PreNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_eps, attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = PreNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False, queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) -> (B, Q, D), and the attention map (B, heads, Q, N) or None.

        queries: the output of the first Q tokens only, None: all (Q = N). Every row of a block depends on all N
        inputs through the keys and values, but only on its own row after attention, so this is the same result for
        those rows with the rest of the work skipped: how `VisionTransformer.forward` runs the last block when it
        pools the class token.
        """
        if fast_inference.engaged(self, x):
            if not need_weights and self.attn.backend in ("auto", "sdpa"):
                plan = self._fast_plan()
                if plan is not None:
                    return _run_fast(plan, x, queries), None
            if isinstance(self.ls1, nn.Identity) and isinstance(self.ls2, nn.Identity):
                # CPU bf16 inference through the modules (hooks, attention maps): each residual add rides on the
                # matmul before it (proj, fc2) as a oneDNN post-op; drop-path and dropout are identities in eval
                r = x if queries is None else x[:, :queries]
                x, attn = self.attn(self.norm1(x), need_weights, residual=r, queries=queries)
                return self.mlp(self.norm2(x), residual=x), attn
        y, attn = self.attn(self.norm1(x), need_weights, queries=queries)
        x = x if queries is None else x[:, :queries]
        add = cpu_kernels.residual_add  # x + branch; one pass for an fp32 stream and a bf16 branch (autocast)
        x = add(x, self.drop_path1(self.ls1(y)))
        x = add(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))
        return x, attn  # (B, Q, D), (B, heads, Q, N) or None

    def _fast_plan(self) -> _FastBlock | None:
        """This block's weights gathered for `_run_fast`, cached beside the block; None to take the module path.

        Rebuilt when any parameter under the block changes (in place, swapped, or replaced with its module); plain
        attributes (LayerNorm eps, head count) are read when it is built. None when a forward hook is registered on a
        submodule (the straight-line path would skip it), or a weight cannot be packed (fast_inference.packed).
        """
        state = _state_key(self)
        if state is None:
            return None
        key, params = state
        return fast_inference.cached(self, key, lambda: self._build_fast_plan(params))

    def _build_fast_plan(self, params: tuple[torch.Tensor, ...]) -> _FastBlock | None:
        a, mlp = self.attn, self.mlp
        if not all(isinstance(ls, (nn.Identity, LayerScale)) for ls in (self.ls1, self.ls2)):
            return None
        weights = [fast_inference.packed(a.qkv), _packed_scaled(a.proj, self.ls1)]
        weights += [fast_inference.packed(mlp.fc1), _packed_scaled(mlp.fc2, self.ls2)]
        if any(w is None for w in weights):
            return None
        ln = lambda n: (n.normalized_shape, n.weight, n.bias, n.eps)  # noqa: E731  (F.layer_norm's arguments)
        qk_norm = None if isinstance(a.q_norm, nn.Identity) else (ln(a.q_norm), ln(a.k_norm))
        rows = fast_inference.ROW_PACKED_PROJECTIONS.get(a.proj.out_features)
        few_rows = None
        if rows is not None:  # proj and fc2 packed a second time, for inputs of rows[0]..rows[1] rows (one more copy)
            few_rows = (rows, _packed_scaled(a.proj, self.ls1, rows_hint=1), _packed_scaled(mlp.fc2, self.ls2, 1))
        return _FastBlock(
            ln(self.norm1), ln(self.norm2), *weights, a.num_heads, a.head_dim, qk_norm, few_rows, params
        )  # fmt: skip

    def train(self, mode: bool = True) -> Block:
        if mode:  # drop the gathered plan with its packed weights (fused AdamW keeps version counters as they were)
            fast_inference.clear_cache(self)
        return super().train(mode)


def _packed_scaled(layer: nn.Module, ls: nn.Module, rows_hint: int | None = None) -> tuple | None:
    """`layer` packed, with a LayerScale after it folded in: gamma * (x Wᵀ + b) = x (gamma W)ᵀ + gamma b, so the
    scaled branch still ends in one matmul with the residual add as its post-op (DINOv2, DeiT-III). The folded copy
    lives in the block's plan (rebuilt when gamma changes: the plan's key covers it), not in the layer's cache, as
    does a copy packed for a given row count (`rows_hint`, fast_inference.ROW_PACKED_PROJECTIONS)."""
    if isinstance(ls, nn.Identity) and rows_hint is None:
        return fast_inference.packed(layer)
    if not fast_inference.packable(layer):
        return None
    weight, bias = layer.weight.detach().float(), None if layer.bias is None else layer.bias.detach().float()
    if not isinstance(ls, nn.Identity):
        gamma = ls.gamma.detach().float()  # (out,)
        weight, bias = weight * gamma[:, None], None if bias is None else bias * gamma
    return fast_inference.pack(weight, bias, rows_hint)


class _FastBlock(NamedTuple):
    """A block's weights as `_run_fast` takes them: LayerNorm arguments (shape, weight, bias, eps), packed linears
    (packed bf16 weight, bf16 bias), the head split, and the optional qk-norm LayerNorms. Plain tuple fields: at
    batch 1 each nn.Module attribute lookup (~0.6 µs) adds up over the ~40 a block needs. `params` holds the
    parameters the plan's key names by id, so none of those ids can be reused while the key is compared."""

    norm1: tuple
    norm2: tuple
    qkv: tuple
    proj: tuple
    fc1: tuple
    fc2: tuple
    num_heads: int
    head_dim: int
    qk_norm: tuple | None
    few_rows: tuple | None  # ((lo, hi), proj, fc2): proj and fc2 packed for inputs of lo..hi rows, or None
    params: tuple


def _run_fast(p: _FastBlock, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
    """One block on the CPU inference fast path, as straight-line kernel calls: (B, N, D) -> (B, Q, D) bf16.

    x: bf16 (the stream `VisionTransformer._encode` keeps) or fp32 under autocast. The same arithmetic as the module
    path with the fast path on (fused GELU and residual adds), minus its Python: no nested module calls, no
    per-layer re-checks of the fast-path conditions (`Block.forward` has checked them once).
    """
    lp = torch.ops.mkldnn._linear_pointwise
    B, N, C = x.shape
    x = x.to(torch.bfloat16).contiguous()
    ln = cpu_kernels.layer_norm  # F.layer_norm, or the kernels' where built (cpu_kernels.py)
    qkv = lp(ln(x, *p.norm1), *p.qkv, "none", [], "")  # (B, N, 3D): q, k, v side by side
    Q = N if queries is None else queries  # only the first Q rows' outputs: their queries, all keys and values
    if queries is not None:
        x = x[:, :queries].contiguous()  # (B, Q, D)
    if p.qk_norm is None and cpu_kernels.usable(N, p.head_dim, Q):  # the brgemm kernel (cpu_kernels.py)
        o = cpu_kernels.attention(qkv.view(B, N, 3 * C), p.num_heads, Q, p.head_dim**-0.5)  # (B, Q, D)
    else:
        q, k, v = qkv.view(B, N, 3, p.num_heads, p.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if p.qk_norm is not None:
            q, k = F.layer_norm(q[:, :, :Q], *p.qk_norm[0]), F.layer_norm(k, *p.qk_norm[1])
        o = F.scaled_dot_product_attention(q[:, :, :Q], k, v).transpose(1, 2).reshape(B, Q, C)  # (B, Q, D)
    proj, fc2 = p.proj, p.fc2
    if p.few_rows is not None and p.few_rows[0][0] <= B * Q <= p.few_rows[0][1]:
        proj, fc2 = p.few_rows[1:]  # the same weights packed for this row count (ROW_PACKED_PROJECTIONS)
    x = lp.binary(o, x, *proj, "add")  # x + proj(o): the add is a post-op of the matmul
    h = lp(ln(x, *p.norm2), *p.fc1, "gelu", [], "none")  # GELU(fc1(.)), exact erf as nn.GELU(); (B, Q, 4D)
    return lp.binary(h, x, *fc2, "add")  # x + fc2(h)


def _state_key(block: nn.Module) -> tuple[tuple, tuple[torch.Tensor, ...]] | None:
    """(key, parameters): every module under `block`, and every parameter's id, version and storage; the parameters.

    None when a forward hook is registered globally or on a module below the block (the straight-line path would
    skip it; the block's own hooks fire either way), or a parameter is an inference tensor (no version counter).
    A plain walk over `_modules`: ~8 µs for a block, where `block.modules()` alone took 12.
    """
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    key: list = []
    params: list[torch.Tensor] = []
    stack = list(block._modules.values())  # the block's own hooks fire anyway: `forward` runs inside its call
    try:
        while stack:
            m = stack.pop()
            if m is None:
                continue
            if m._forward_hooks or m._forward_pre_hooks:
                return None
            key.append(m)
            for t in m._parameters.values():
                if t is not None:
                    key += (id(t), t._version, t.data_ptr())
                    params.append(t)
            stack += m._modules.values()
    except RuntimeError:  # inference tensors have no version counter
        return None
    return tuple(key), tuple(params)


class AttentionPoolLatent(nn.Module):
    """Multihead attention pooling ("map", big_vision): one learned query attends over all tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, dim * 2)
        self.proj = Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, head_dim)
        x = self.proj(x.transpose(1, 2).reshape(B, 1, C))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]  # (B, D)
