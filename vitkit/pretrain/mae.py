"""The masked autoencoder (MAE, He et al. 2021): hide most patches, encode the rest, paint the hidden ones back.

image ─► patch tokens + position embedding ─► keep a random 25 % ─► the ViT's blocks, on the kept tokens only
      ─► linear to the decoder's width ─► mask tokens at the hidden places ─► + decoder position embedding
      ─► a few decoder blocks ─► linear to p*p*C pixels per patch ─► MSE on the hidden patches only

The encoder is an ordinary `VisionTransformer`: `forward_features(x, keep=...)` drops the hidden tokens after the
position embedding, so a conv-tokenizer (stem="conv") encoder hides whole tokens the same way. Only the kept
quarter of the tokens goes through the encoder, which is why MAE is cheap per image. The decoder exists only for
pretraining; the encoder is what `vitkit pretrain` saves.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.preprocess import to_device
from ..model.layers import Block
from ..model.pos_embed import sincos_2d
from ..model.vit import VisionTransformer


# ------------------------------------------------------------------------------------------------- masking
def visible_count(num_patches: int, mask_ratio: float) -> int:
    """How many of `num_patches` stay visible at `mask_ratio` (MAE's int(N * (1 - ratio)), at least one)."""
    return max(int(num_patches * (1.0 - mask_ratio)), 1)


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random set of visible patches per image: (keep (B, K) int64 indices, hidden (B, N) bool).

    The noise is drawn on the CPU from `generator` (default: torch's global generator, whose state a checkpoint
    holds, so a resumed run hides the same patches), then moved to `device`: a GPU run hides the same patches as
    a CPU run with the same seed.
    """
    noise = torch.rand(batch, num_patches, generator=generator)  # (B, N)
    keep = noise.argsort(dim=1)[:, : visible_count(num_patches, mask_ratio)]  # (B, K): the K smallest draws
    hidden = torch.ones(batch, num_patches, dtype=torch.bool).scatter_(1, keep, False)  # (B, N)
    return to_device(keep, device), to_device(hidden, device)


# -------------------------------------------------------------------------------------------------- pixels
def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, ph*pw*C): the pixels of each patch, patches in row-major order as the tokens."""
    B, C, H, W = images.shape
    ph, pw = patch_size
    x = images.reshape(B, C, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // ph) * (W // pw), ph * pw * C)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, int], grid: tuple[int, int], chans: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, h*w, ph*pw*C) -> (B, C, h*ph, w*pw)."""
    B = patches.shape[0]
    (ph, pw), (h, w) = patch_size, grid
    x = patches.reshape(B, h, w, ph, pw, chans)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, chans, h * ph, w * pw)


def hide_pixels(images: torch.Tensor, hidden: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """Zero the pixels of the hidden patches: images (B, C, H, W), hidden (B, h*w) bool -> (B, C, H, W).

    A convolutional tokenizer sees past its own patch: its receptive field reaches into the neighbours, so a
    visible token would carry the hidden pixels next to it and the decoder could copy them back. Zeroed (the
    dataset mean, in normalised pixels) they carry nothing, as the masked convolutions of ConvMAE and SparK do.
    """
    B, C, H, W = images.shape
    ph, pw = patch_size
    seen = (~hidden).to(images.dtype).reshape(B, 1, H // ph, 1, W // pw, 1)
    return (images.reshape(B, C, H // ph, ph, W // pw, pw) * seen).reshape(B, C, H, W)


def patch_stats(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's pixel mean and std (B, N, 1): what `norm_pix_loss` normalises the target by."""
    return target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + eps).sqrt()


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error over the hidden patches only, in fp32. pred, target (B, N, P); hidden (B, N) bool.

    norm_pix: the target is each patch normalised by its own mean and std (MAE's choice: sharper features, as
    the network need not spend capacity on each patch's brightness and contrast).
    """
    target = target.float()
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    weights = hidden.float()
    return (per_patch * weights).sum() / weights.sum()


# ------------------------------------------------------------------------------------------------- decoder
class MaeDecoder(nn.Module):
    """Encoded visible tokens -> predicted pixels of every patch (B, N, ph*pw*C)."""

    def __init__(
        self,
        grid: tuple[int, int],
        encoder_dim: int,
        patch_pixels: int,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed, as in MAE: the decoder must know where each hidden patch is, and learns nothing from a table
        self.register_buffer("pos_embed", sincos_2d(self.grid, dim), persistent=False)  # (1, N, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """tokens (B, prefix + K, De) from the encoder, keep (B, K) their patch indices -> pixels (B, N, P)."""
        x = self.embed(tokens)  # (B, prefix + K, D)
        prefix, visible = x[:, :num_prefix], x[:, num_prefix:]
        B, _, D = x.shape
        N = self.pos_embed.shape[1]
        full = self.mask_token.to(x.dtype).expand(B, N, D)  # (B, N, D): a mask token everywhere ...
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, D), visible)  # ... but where a token was seen
        x = torch.cat([prefix, full + self.pos_embed.to(x.dtype)], dim=1)  # (B, prefix + N, D)
        for blk in self.blocks:
            x, _ = blk(x)
        return self.pred(self.norm(x))[:, num_prefix:]  # (B, N, P): the prefix tokens predict nothing


# --------------------------------------------------------------------------------------------- the whole
class MaskedAutoencoder(nn.Module):
    """Encoder + decoder; `forward(images)` returns the reconstruction loss of a freshly masked batch."""

    def __init__(
        self,
        encoder: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        cfg = encoder.cfg
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size, self.grid, self.chans = tuple(cfg.patch_size), tuple(cfg.grid_size), cfg.in_chans
        patch_pixels = self.patch_size[0] * self.patch_size[1] * self.chans
        if norm_pix_loss and patch_pixels < 2:
            raise ValueError("norm_pix_loss needs at least two pixels per patch; use a larger patch or turn it off")
        self.decoder = MaeDecoder(self.grid, cfg.embed_dim, patch_pixels, decoder_dim, decoder_depth, decoder_heads)
        self.stem_sees_neighbours = cfg.stem == "conv"  # a conv tokenizer needs the hidden pixels zeroed first
        # the pooling and head of the encoder see no gradient here; frozen, they stay out of the optimizer and
        # out of DDP's unused-parameter check (fine-tuning trains them)
        for part in (encoder.fc_norm, encoder.attn_pool, encoder.head):
            if part is not None:
                part.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def predict(self, images: torch.Tensor, keep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch (B, N, P) predicted from the patches in `keep` (B, K) alone (hidden: (B, N))."""
        if self.stem_sees_neighbours:
            images = hide_pixels(images, hidden, self.patch_size)
        tokens = self.encoder.forward_features(images, keep=keep)  # (B, prefix + K, D): only the visible patches
        return self.decoder(tokens, keep, self.encoder.num_prefix_tokens)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> the loss on the hidden patches (fp32 scalar)."""
        keep, hidden = random_masking(images.shape[0], self.num_patches, self.mask_ratio, generator, images.device)
        pred = self.predict(images, keep, hidden)
        return masked_patch_loss(pred, patchify(images, self.patch_size), hidden, self.norm_pix_loss)

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstructed images (B, C, H, W), hidden (B, N) bool, the raw prediction (B, N, P)), in the input's
        normalised pixel space.

        Visible patches are the input's own; hidden ones are the prediction. With `norm_pix_loss` a prediction is
        in per-patch normalised units, so it is shown with the hidden patch's own mean and std (as MAE's demo
        does): the shapes and edges are the model's, the patch's overall colour and contrast are the original's.
        The raw prediction shows what the model alone says.
        """
        keep, hidden = random_masking(images.shape[0], self.num_patches, self.mask_ratio, generator, images.device)
        raw = self.predict(images, keep, hidden).float()  # (B, N, P)
        target = patchify(images.float(), self.patch_size)
        pred = raw
        if self.norm_pix_loss:
            mean, std = patch_stats(target)
            pred = raw * std + mean
        patches = torch.where(hidden.unsqueeze(-1), pred, target)
        return unpatchify(patches, self.patch_size, self.grid, self.chans), hidden, raw

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's block activations in backward (the decoder is shallow)."""
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Tokens and embeddings of both halves: AdamW leaves them undecayed (vitkit.train.optim)."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder.mask_token"}
