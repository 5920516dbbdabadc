"""The building blocks of a Vision Transformer: tokenizers, attention, MLP, LayerScale, DropPath, Block, MAP pool,
sequence pool.

Plain PyTorch modules on nn.Linear / nn.LayerNorm: this is the model as the idea describes it. The CPU speed
machinery (packed weights, block plans, C++ kernels) lives in `vitkit/fast/` and runs the same arithmetic on these
modules' parameters; nothing here knows about it.

Module and parameter names follow timm (`patch_embed.proj`, `attn.qkv`, `mlp.fc1`, `ls1.gamma`, ...) so foreign
checkpoints map onto these modules almost 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention_backend import pick_backend


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p×p patches and embed each linearly: one conv with stride = kernel."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)


class ConvStem(nn.Module):
    """Convolutional tokenizer for small images (Xiao et al. 2021, "Early convolutions help transformers see").

    A stack of [3×3 conv → BatchNorm → ReLU] layers whose strides multiply to the patch size reaches the same
    patch grid as a p×p patch embedding; a 1×1 conv then maps the channels to the embedding width. `layers` gives
    (out_channels, stride) per conv; the default is log2(p) stride-2 layers with widths doubling up to D (D/4, D/2,
    D for p = 8). Overlapping receptive fields give the encoder the locality that plain patches lack, which is what
    lets it learn fast on small datasets (the CIFAR-10 budget recipe, vitkit/recipes/cifar10_budget.yaml).
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
        # channels-last (NHWC) weights and activations: oneDNN's native layout, no reorders around every conv; the
        # (B, D, h, w) output then flattens to tokens for free
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(self.stem(x))  # (B, C, H, W) -> (B, D, H/p, W/p), stored NHWC


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q kᵀ / √d) v per head, with a choice of backend.

    `sdpa` calls PyTorch's fused scaled_dot_product_attention; `math` writes the product out as matrix products,
    which is faster on the CPU at short sequences in training (attention_backend.py) and is the only path that can
    return the attention map. `auto` picks per call from measured rules.
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
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) -> (B, N, D), and the attention map (B, heads, N, N) when asked for, else None."""
        q, k, v = self.split_heads(self.qkv(x))  # each (B, heads, N, head_dim)
        o, attn = self.attend(q, k, v, need_weights)  # (B, N, D)
        return self.proj_drop(self.proj(o)), attn

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3D) -> q, k, v, each (B, heads, N, head_dim), with the optional qk-norm applied to q and k."""
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def backend_for(self, device_type: str, tokens: int, training: bool, low_precision: bool) -> str:
        """ "sdpa" or "math" for a call at this sequence length: the configured backend, or the measured rule."""
        if self.backend != "auto":
            return self.backend
        return pick_backend(device_type, tokens, training, low_precision)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, heads, Q, hd), k and v (B, heads, N, hd) -> heads merged (B, Q, D), and the map (B, heads, Q, N)."""
        B, H, Q, hd = q.shape
        N = k.shape[2]
        training = torch.is_grad_enabled() and q.requires_grad
        backend = "math" if need_weights else self.backend_for(q.device.type, N, training, q.dtype != torch.float32)
        attn = None
        if backend == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:  # heads folded into the batch, (B*heads, N, hd); the 1/√d scale rides on the matmul
            q3, k3, v3 = q.reshape(B * H, Q, hd), k.reshape(B * H, N, hd), v.reshape(B * H, N, hd)
            attn = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=self.scale)
            attn = attn.softmax(dim=-1).view(B, H, Q, N)  # the returned map is on the path: gradients reach it
            o = torch.bmm(self.attn_drop(attn).view(B * H, Q, N), v3).view(B, H, Q, hd)
        return o.transpose(1, 2).reshape(B, Q, H * hd), (attn if need_weights else None)


class Mlp(nn.Module):
    """Two linear layers with GELU between: D -> hidden -> D."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, D) -> (B, N, hidden)
        return self.drop2(self.fc2(x))  # (B, N, D)


class LayerScale(nn.Module):
    """Per-channel learned scale on a residual branch (CaiT): x * gamma, gamma initialised small."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


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
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_eps, attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) -> (B, N, D), and the attention map (B, heads, N, N) or None."""
        y, attn = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


class AttentionPoolLatent(nn.Module):
    """Multihead attention pooling ("map", big_vision): one learned query attends over all tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
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


class SequencePool(nn.Module):
    """Sequence pooling ("seqpool", CCT: Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact
    Transformers"): each token scores itself with one linear map, the softmax of the scores over the tokens weighs
    them, and the pooled vector is the weighted sum. One (D + 1)-parameter map instead of a class token: the model
    learns which tokens matter, where average pooling weighs them all alike.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> their pooling weights (B, N), each row summing to 1 (softmax in fp32)."""
        return self.score(x).squeeze(-1).float().softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(x).to(x.dtype)  # (B, N)
        return torch.bmm(w.unsqueeze(1), x).squeeze(1)  # (B, D)
