"""The Vision Transformer, in the order the idea goes:

image ─► patches ─► linear embedding ─► + position embedding (+ cls / register tokens)
      ─► L × Block[LN → multi-head self-attention → +residual ; LN → MLP(GELU) → +residual]
      ─► final LN ─► pool (token | avg | map | seqpool) ─► head ─► logits  (softmax gives class probabilities)

Attention maps are a first-class output: `model(x, return_attention=[...] | "all")` returns the logits and a
dict {layer: (B, heads, N, N)}; only the asked layers compute the explicit map, the others keep the fast path.

Speed lives elsewhere: `_encode` asks `vitkit.fast.select` once per call whether a faster runner should run the
same arithmetic on this machine (CPU bf16 inference and training); otherwise the modules run as written here.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import fast
from ..config import PreprocessConfig, ViTConfig, default_preprocess
from .layers import AttentionPoolLatent, Block, ConvStem, PatchEmbed, SequencePool
from .outputs import Intermediate, Intermediates
from .pos_embed import resample_pos_embed, sincos_2d
from .serialization import save_folder, save_model

AttentionRequest = Iterable[int] | str | None  # layer indices (negative ok), "all", or None


def learned_pool(cfg: ViTConfig) -> nn.Module | None:
    """The pooling module with weights of its own ("map": attention with a learned query; "seqpool": a softmax over
    one score per token), None for the parameter-free ones ("token", "avg", "none")."""
    if cfg.global_pool == "map":
        return AttentionPoolLatent(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps)
    if cfg.global_pool == "seqpool":
        return SequencePool(cfg.embed_dim)
    return None


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, preprocess: PreprocessConfig | None = None, labels: list[str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.preprocess = preprocess or default_preprocess(cfg)  # travels with saved weights
        self.labels = labels  # class names, index -> name; travels with saved weights
        D = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens

        # 1. patches -> linear embedding
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.patch_size, cfg.in_chans, D, cfg.stem_layers)
        else:
            self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)

        # 2. cls / register tokens and position embedding
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        n_patches = cfg.grid_size[0] * cfg.grid_size[1]
        if cfg.pos_embed == "learn":
            embed_len = n_patches if cfg.no_embed_class else n_patches + self.num_prefix_tokens
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, D))
        elif cfg.pos_embed == "sincos2d":  # fixed, patches only (prefix tokens get none, as in big_vision)
            self.register_buffer("pos_embed", sincos_2d(cfg.grid_size, D), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()

        # 3. the encoder: L blocks, stochastic depth growing linearly with depth
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.qk_norm, cfg.init_values, cfg.proj_drop_rate,
                  cfg.attn_drop_rate, drop_path, cfg.norm_eps, cfg.attn_backend)
            for drop_path in dpr
        )  # fmt: skip

        # 4. final norm, pool, head (with avg pooling the norm moves after the pool: fc_norm, as in timm)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if not cfg.use_fc_norm else nn.Identity()
        self.attn_pool = learned_pool(cfg)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False  # recompute block activations in backward: less memory, ~1/3 more compute
        self.init_weights()

    # ------------------------------------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """timm's default: truncated normal(0.02) for linear weights and the position embedding, tiny tokens."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.attn_pool, AttentionPoolLatent):
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.cfg.embed_dim**-0.5)

    # ------------------------------------------------------------------------------------- the forward pass
    def patch_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The patch grid for an input image (B, C, H, W); refuses sizes the model was not built for."""
        H, W = x.shape[-2:]
        p = self.cfg.patch_size
        if not self.cfg.dynamic_img_size and (H, W) != self.cfg.img_size:
            raise ValueError(
                f"input is {H}x{W} but the model was built for {self.cfg.img_size[0]}x{self.cfg.img_size[1]}; "
                "resize the image or create the model with dynamic_img_size=True"
            )
        if H % p[0] or W % p[1]:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {p[0]}x{p[1]}")
        return (H // p[0], W // p[1])

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Add position embeddings and prepend cls/register tokens: (B, h*w, D) -> (B, prefix + h*w, D)."""
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pe = self.pos_embed
        if pe is None:
            return torch.cat(prefix + [x], dim=1)
        if self.cfg.pos_embed == "sincos2d":
            if torch.compiler.is_exporting() or grid != self.cfg.grid_size:  # recomputed exactly, not resampled
                pe = sincos_2d(grid, self.cfg.embed_dim).to(x.device)
            return torch.cat(prefix + [x + pe.to(x.dtype)], dim=1)
        pe_prefix = 0 if self.cfg.no_embed_class else self.num_prefix_tokens
        pe = resample_pos_embed(pe, grid, self.cfg.grid_size, pe_prefix)  # identity at the built size
        if self.cfg.no_embed_class:
            return torch.cat(prefix + [x + pe], dim=1)
        return torch.cat(prefix + [x], dim=1) + pe

    def _encode(
        self,
        x: torch.Tensor,
        want_attn: set[int],
        collect: set[int] | None = None,
        stop_after: int | None = None,
        pooled_only: bool = False,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor], tuple[int, int]]:
        """Image -> tokens (B, N, D) after the blocks, attention maps, collected block outputs, the patch grid.

        pooled_only: the caller reads only the pooled output, so a runner may shorten the last block to the rows the
        pooling reads (tokens (B, 1, D) then; `vitkit.fast.blocks.Runner`).
        """
        grid = self.patch_grid(x)
        run = fast.select(self, x, want_attn, pooled_only)  # a faster runner for this call, or None: the modules
        x = self.patch_embed(x) if run is None else run.patch_embed(self.patch_embed, x)  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        x = self._pos_embed(x, grid)  # (B, N, D), N = prefix + h*w
        if keep is not None:  # only these patch tokens go on: (B, prefix + K, D)
            P = self.num_prefix_tokens
            patches = x[:, P:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :P], patches], dim=1)
        x = self.norm_pre(self.pos_drop(x))
        maps: dict[int, torch.Tensor] = {}
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            step = blk if run is None else partial(run.block, i, blk)  # (x, need_weights) -> (x, map or None)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and i not in want_attn:
                x, attn = checkpoint(step, x, False, use_reentrant=False)  # activations recomputed in backward
            else:
                x, attn = step(x, i in want_attn)  # (B, N, D)
            if attn is not None:
                maps[i] = attn  # (B, heads, N, N)
            if collect is not None and i in collect:
                outs[i] = x
            if stop_after is not None and i >= stop_after:
                break
        return x, maps, outs, grid

    def _layer_set(self, request: AttentionRequest) -> set[int]:
        if request is None:
            return set()
        if isinstance(request, str):
            if request != "all":
                raise ValueError(f"return_attention must be a list of layer indices or 'all', got {request!r}")
            return set(range(len(self.blocks)))
        depth = len(self.blocks)
        layers = {int(i) % depth if -depth <= int(i) < depth else depth for i in request}
        if depth in layers:
            raise ValueError(f"attention layer index out of range for a {depth}-block model: {list(request)}")
        return layers

    def patch_dropout_keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """Patch dropout (cfg.patch_drop_rate) for this training forward on images x (B, C, H, W): (B, K) indices
        of the patch tokens each image keeps, a random K = round((1 - rate) * N) of its N, or None (keep all).

        None outside training and at rate 0, so evaluation and inference see every token and a rate of 0 draws no
        random numbers (the forward stays what it was). The draw comes from torch's generator for x's device, whose
        CPU state a checkpoint holds: a resumed run drops the same tokens.
        """
        rate = self.cfg.patch_drop_rate
        if not self.training or rate <= 0:
            return None
        h, w = self.patch_grid(x)
        n = h * w
        k = max(round((1.0 - rate) * n), 1)
        if k >= n:
            return None
        return torch.rand(x.shape[0], n, device=x.device).argsort(dim=1)[:, :k]  # (B, K): the K smallest draws

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) -> normalised tokens (B, N, D).

        keep: (B, K) indices of the patch tokens to encode (row-major in the patch grid), the rest dropped after
        the position embedding (masked-autoencoder pretraining, patch dropout): tokens (B, prefix + K, D). None:
        every token, or in training with cfg.patch_drop_rate > 0 a random subset (`patch_dropout_keep`).
        """
        keep = self.patch_dropout_keep(x) if keep is None else keep
        return self.norm(self._encode(x, set(), keep=keep)[0])

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> one vector per image (B, D) (or tokens unchanged with global_pool='none')."""
        if self.attn_pool is not None:  # "map" / "seqpool": over the patch tokens only, as timm's "map" does
            return self.attn_pool(x[:, self.num_prefix_tokens :])
        if self.cfg.global_pool == "token":
            return x[:, 0]
        if self.cfg.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, classes), or the pooled features (B, D) with pre_logits=True."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(
        self, x: torch.Tensor, return_attention: AttentionRequest = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Image (B, C, H, W) -> logits (B, classes); with return_attention also {layer: (B, heads, N, N)}.

        In training with cfg.patch_drop_rate > 0 the blocks see a random subset of each image's patch tokens
        (`patch_dropout_keep`); the maps are then over the kept tokens.
        """
        want = self._layer_set(return_attention)
        tokens, maps, _, _ = self._encode(x, want, pooled_only=True, keep=self.patch_dropout_keep(x))
        logits = self.forward_head(self.norm(tokens))
        return logits if return_attention is None else (logits, maps)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Iterable[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        return_attention: AttentionRequest = None,
    ) -> Intermediates:
        """Outputs of chosen blocks, split into patch grid (B, D, h, w), cls and register tokens.

        indices: None = every block, an int n = the last n blocks, a list = those blocks (negative ok).
        norm: apply the final norm to each intermediate. stop_early: skip the blocks after the last index.
        Every patch token, in training too: the grids need them all (patch dropout applies to forward and
        forward_features only).
        """
        depth = len(self.blocks)
        if indices is None:
            take = set(range(depth))
        elif isinstance(indices, int):
            take = set(range(depth - indices, depth))
        else:
            take = self._layer_set(indices)
        want = self._layer_set(return_attention)
        stop = max(take | want) if stop_early and (take | want) else None
        tokens, maps, outs, (h, w) = self._encode(x, want, collect=take, stop_after=stop)
        P = self.num_prefix_tokens
        layers = []
        for i in sorted(take):
            t = self.norm(outs[i]) if norm else outs[i]  # (B, N, D)
            B, _, D = t.shape
            layers.append(
                Intermediate(
                    layer=i,
                    patches=t[:, P:].reshape(B, h, w, D).permute(0, 3, 1, 2),  # (B, D, h, w)
                    cls=t[:, 0] if self.cls_token is not None else None,
                    registers=t[:, int(self.cls_token is not None) : P] if self.reg_token is not None else None,
                    attention=maps.get(i),
                )
            )
        return Intermediates(layers=layers, tokens=self.norm(tokens))

    # --------------------------------------------------------------------------------------- housekeeping
    def train(self, mode: bool = True) -> VisionTransformer:
        if mode:  # fused AdamW updates weights without bumping version counters: drop the packed inference copies
            fast.clear_cache(self)
        return super().train(mode)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in training: keep only each block's input, recompute the rest in backward."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (zero-initialised, the usual start for fine-tuning); optionally change pooling."""
        if global_pool is not None and global_pool != self.cfg.global_pool:
            self.cfg = self.cfg.replace(global_pool=global_pool, fc_norm=self.cfg.use_fc_norm)
            ref = next(self.parameters())
            self.attn_pool = learned_pool(self.cfg)
            if self.attn_pool is not None:
                self.attn_pool.to(ref)
                if isinstance(self.attn_pool, SequencePool):  # as init_weights would have made it
                    nn.init.trunc_normal_(self.attn_pool.score.weight, std=0.02)
                    nn.init.zeros_(self.attn_pool.score.bias)
        self.cfg = self.cfg.replace(num_classes=num_classes)
        if num_classes > 0:
            ref = next(self.parameters())
            self.head = nn.Linear(self.cfg.embed_dim, num_classes).to(ref.device, ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        if self.labels is not None and len(self.labels) != num_classes:
            self.labels = None

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed (tokens and embeddings)."""
        return {"pos_embed", "cls_token", "reg_token", "attn_pool.latent"}

    def save(self, path: str | Path, **metadata: str) -> Path:
        """Write weights as safetensors with config, preprocessing and labels in the metadata."""
        return save_model(self, path, **metadata)

    def save_pretrained(self, directory: str | Path, format: str = "vitkit", **options: object) -> Path:
        """Write a folder with a model card: format "vitkit", "hf" (transformers ViT) or "timm" (Hub layout)."""
        return save_folder(self, directory, format, **options)
