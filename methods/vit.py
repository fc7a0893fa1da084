"""Shared Vision Transformer pieces for the masked-image methods (MAE, PCAE) and fine-tuning.

Built on timm's ``Block`` and ``PatchEmbed``; positions are fixed 2-D sin-cos embeddings.
Also holds the masking helpers (``patchify``, ``random_masking``, seed-driven noise), grid
pooling of patch tokens, and the config fields every ViT method shares (``ViTConfig``) and
every masked-image method adds (``MaskedViTConfig``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .registry import MethodConfig
from .seeding import per_sample_noise

ViTSizeName = Literal["micro", "mini", "tiny", "small", "base", "large", "huge"]


@dataclass(frozen=True)
class ViTSize:
    """Width, depth and head count of a ViT size preset."""

    embed_dim: int
    depth: int
    num_heads: int


VIT_SIZES: dict[str, ViTSize] = {
    "micro": ViTSize(embed_dim=32, depth=3, num_heads=2),  # CPU tests only
    "mini": ViTSize(embed_dim=192, depth=6, num_heads=3),  # ViT-Ti's width at half its depth: a CPU's default
    "tiny": ViTSize(embed_dim=192, depth=12, num_heads=3),
    "small": ViTSize(embed_dim=384, depth=12, num_heads=6),
    "base": ViTSize(embed_dim=768, depth=12, num_heads=12),
    "large": ViTSize(embed_dim=1024, depth=24, num_heads=16),
    "huge": ViTSize(embed_dim=1280, depth=32, num_heads=16),
}

LayerNorm = partial(nn.LayerNorm, eps=1e-6)

BlockHook = Callable[[int, Tensor], Tensor]
"""Called as ``hook(block_index, tokens)`` after each block; returns the tokens to carry on with."""


def vit_size(name: str) -> ViTSize:
    """Look up a size preset by name."""
    try:
        return VIT_SIZES[name]
    except KeyError:
        raise ValueError(f"unknown ViT size preset {name!r}; known presets: {', '.join(VIT_SIZES)}") from None


# ----------------------------------------------------------------------------- masking


class Masking(NamedTuple):
    """One random masking of a batch of patch sequences.

    ``ids_keep``/``ids_masked`` index patches (0-based, no cls), ordered by ascending noise;
    ``ids_restore`` undoes that shuffle; ``mask`` is 1 for removed patches, in patch order.
    """

    ids_keep: Tensor
    ids_masked: Tensor
    ids_restore: Tensor
    mask: Tensor


def random_masking(num_patches: int, mask_ratio: float, noise: Tensor) -> Masking:
    """Per-sample random masking: keep the ``int(N * (1 - mask_ratio))`` patches with lowest noise."""
    assert noise.ndim == 2 and noise.shape[1] == num_patches, noise.shape
    num_keep = int(num_patches * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones_like(noise)
    mask[:, :num_keep] = 0
    mask = mask.gather(1, ids_restore)
    return Masking(ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], ids_restore, mask)


def noise_from_seeds(seeds: Tensor, n: int, device: torch.device | str) -> Tensor:
    """Uniform masking noise ``[B, n]`` where row ``i`` depends only on ``seeds[i]``."""
    return per_sample_noise(seeds, n, device, "uniform")


def batch_noise(batch: dict[str, Tensor], n: int) -> Tensor:
    """Masking noise ``[B, n]`` for a batch: from ``batch["seed"]`` when present, else ``torch.rand``."""
    images = batch["image"]
    if "seed" in batch:
        return noise_from_seeds(batch["seed"], n, images.device)
    return torch.rand(images.shape[0], n, device=images.device)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, p*p*C]``, patches in row-major order, pixels ordered (row, col, channel)."""
    B, C, H, W = images.shape
    p = patch_size
    assert H % p == 0 and W % p == 0, (H, W, p)
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Select tokens ``x[b, ids[b, j]]`` -> ``[B, len(ids[b]), D]``."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of a state dict under ``prefix``, without it: one submodule's weights."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def grid_pool(tokens: Tensor, side: int, grid: int, ids: Tensor | None = None) -> Tensor:
    """Patch tokens of a ``side x side`` grid averaged over ``grid x grid`` cells: ``[B, grid*grid*D]``.

    ``tokens`` ``[B, n, D]`` are the whole grid in row-major order, or, when some were dropped
    (token reduction), the tokens at patch ids ``ids`` ``[B, n]``. One mean per cell keeps where
    things are, which a global mean forgets. A cell left without tokens is zero.
    """
    if side % grid:
        raise ValueError(f"a grid of {grid} x {grid} cells must divide the {side} patches per side")
    B, n, D = tokens.shape
    if ids is None:
        ids = torch.arange(n, device=tokens.device).expand(B, -1)
    cell_side = side // grid
    cells = (ids // side // cell_side) * grid + (ids % side) // cell_side
    sums = tokens.new_zeros(B, grid * grid, D).scatter_add_(1, cells.unsqueeze(-1).expand(-1, -1, D), tokens)
    counts = torch.zeros(B, grid * grid, device=tokens.device).scatter_add_(
        1, cells, torch.ones_like(cells, dtype=torch.float)
    )
    return (sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)).flatten(1)


def position_moments(tokens: Tensor, side: int, ids: Tensor | None = None) -> Tensor:
    """Patch tokens of a ``side x side`` grid -> ``[B, 3D]``: their mean, and their means weighted by
    each patch's column and by its row (from -1 at the first to 1 at the last).

    ``tokens`` ``[B, n, D]`` are the whole grid in row-major order, or, when some were dropped
    (token reduction), the tokens at patch ids ``ids`` ``[B, n]``. A linear map of these applies
    one detector to every token and reads how much of it there is, and where: the position of a
    small object stays linear, whichever tokens were kept.
    """
    B, n, D = tokens.shape
    if ids is None:
        ids = torch.arange(n, device=tokens.device).expand(B, -1)
    coordinate = torch.linspace(-1, 1, side, device=tokens.device, dtype=tokens.dtype)
    weights = torch.stack([torch.ones_like(ids, dtype=tokens.dtype), coordinate[ids % side], coordinate[ids // side]])
    return torch.einsum("kbn,bnd->bkd", weights, tokens).flatten(1) / n


# ----------------------------------------------------------------------------- modules


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1) -> Tensor:
    """Fixed 2-D sin-cos position embeddings ``[num_prefix + h*w, dim]``; prefix (cls) rows are zero."""
    pos = build_sincos2d_pos_embed(list(grid_size), dim=dim)
    return torch.cat([pos.new_zeros(num_prefix_tokens, dim), pos])


def init_weights(module: nn.Module) -> None:
    """MAE initialisation for linears and layer norms (use with ``Module.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """A plain ViT encoder (cls token, fixed sin-cos positions, pre-norm blocks, final norm).

    The pieces are exposed separately so a caller can embed any subset of patches
    (``embed_patches``), add the cls token (``prepend_cls``) and run the blocks on any token set
    with an optional per-block hook (``forward_tokens``), e.g. for progressive token reduction.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = self.patch_embed.grid_size
        self.num_patches: int = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, so not saved: rebuilt identically at construction.
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid_size, embed_dim), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=LayerNorm)
            for rate in rates
        )
        self.norm = LayerNorm(embed_dim)
        self.reset_parameters()

    @classmethod
    def from_preset(cls, size: str, **kwargs: int | float) -> ViTEncoder:
        """Build the encoder of a named size preset (``micro`` ... ``huge``)."""
        preset = vit_size(size)
        return cls(embed_dim=preset.embed_dim, depth=preset.depth, num_heads=preset.num_heads, **kwargs)

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # as a linear layer on flat patches
        nn.init.normal_(self.cls_token, std=0.02)

    def embed_patches(self, images: Tensor, ids: Tensor | None = None) -> Tensor:
        """Patch tokens plus positions ``[B, n, D]``: all patches, or only ``ids`` ``[B, n]`` (no cls)."""
        if ids is None:
            return self.patch_embed(images) + self.pos_embed[self.num_prefix_tokens :]
        # Project only the chosen patches, so the patches left out cost nothing: the stride-p
        # conv's weight read as a linear layer over patchify's (row, col, channel) pixel order.
        proj = self.patch_embed.proj
        weight = proj.weight.permute(0, 2, 3, 1).reshape(self.embed_dim, -1)
        patches = gather_tokens(patchify(images, self.patch_size), ids)
        return F.linear(patches, weight, proj.bias) + self.pos_embed[ids + self.num_prefix_tokens]

    def prepend_cls(self, x: Tensor) -> Tensor:
        """``[B, n, D]`` -> ``[B, 1 + n, D]`` with the cls token first (its position embedding is zero)."""
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward_tokens(
        self, x: Tensor, hook: BlockHook | None = None, norm: bool = True, depth: int | None = None
    ) -> Tensor:
        """Run every block (or the first ``depth``), then the final norm (unless ``norm=False``), on
        a token set ``[B, n, D]``."""
        for i, block in enumerate(self.blocks[:depth]):
            x = block(x)
            if hook is not None:
                x = hook(i, x)
        return self.norm(x) if norm else x

    def forward(self, images: Tensor, ids_keep: Tensor | None = None, depth: int | None = None) -> Tensor:
        """Normalised tokens ``[B, 1 + n, D]`` (cls first) for all patches or only ``ids_keep``; after
        the first ``depth`` blocks only (a probe of an inner layer), normalised by the final norm."""
        return self.forward_tokens(self.prepend_cls(self.embed_patches(images, ids_keep)), depth=depth)


class MaskedDecoder(nn.Module):
    """A light ViT decoder that predicts targets for query positions from visible-token latents.

    Input tokens are ``[cls, visible..., one mask token per query]``, each with its own fixed
    position embedding, and only the query outputs go through the prediction head. Attention
    is permutation-equivariant, so this equals MAE's un-shuffle-then-predict decoder restricted
    to the queries, without the scatter and without predicting what the loss ignores.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        grid_size: tuple[int, int],
        in_dim: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, embed_dim), persistent=False)
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path, norm_layer=LayerNorm)
                for _ in range(depth)
            )
        )
        self.norm = LayerNorm(embed_dim)
        self.pred = nn.Linear(embed_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_visible: Tensor, ids_query: Tensor) -> Tensor:
        """Predictions ``[B, m, out_dim]`` at ``ids_query`` from ``latent`` ``[B, 1 + k, in_dim]``.

        ``latent`` holds the encoder's cls token, then its tokens for the patches ``ids_visible``.
        """
        B, m = ids_query.shape
        x = self.embed(latent)
        x = torch.cat([x, self.mask_token.expand(B, m, -1)], dim=1)
        prefix = ids_visible.new_zeros(B, self.num_prefix_tokens)
        positions = torch.cat([prefix, ids_visible + self.num_prefix_tokens, ids_query + self.num_prefix_tokens], dim=1)
        x = self.blocks(x + self.pos_embed[positions])
        return self.pred(self.norm(x[:, -m:]))


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class ViTConfig(MethodConfig):
    """The encoder fields every ViT method shares: size preset, patches, MLP width, stochastic depth."""

    size: ViTSizeName = "base"
    patch_size: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = 0.0

    # The fields that fix the encoder's weights: what a downstream run copies from its source.
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ("size", "patch_size", "img_size", "in_chans", "mlp_ratio")

    def __post_init__(self) -> None:
        super().__post_init__()
        vit_size(self.size)
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; "
                "pick sizes so the image splits into whole patches"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def vit(self) -> ViTSize:
        return vit_size(self.size)

    @property
    def num_patches_side(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_side**2

    def build_encoder(self, drop_path: float | None = None) -> ViTEncoder:
        """The encoder this config describes; ``drop_path`` overrides the top stochastic-depth rate."""
        return ViTEncoder.from_preset(
            self.size,
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            mlp_ratio=self.mlp_ratio,
            drop_path=self.drop_path if drop_path is None else drop_path,
        )


@dataclass(kw_only=True)
class MaskedViTConfig(ViTConfig):
    """Masking and decoder fields shared by the masked-image methods (MAE, PCAE)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.num_visible < 1 or self.num_masked < 1:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} on {self.num_patches} patches leaves {self.num_visible} "
                f"visible and {self.num_masked} masked; both must be at least 1"
            )
        if self.decoder_dim <= 0 or self.decoder_depth <= 0 or self.decoder_num_heads <= 0:
            raise ValueError(
                "decoder_dim, decoder_depth and decoder_num_heads must be positive, got "
                f"{self.decoder_dim}, {self.decoder_depth}, {self.decoder_num_heads}"
            )
        if self.decoder_dim % self.decoder_num_heads != 0:
            raise ValueError(
                f"decoder_dim {self.decoder_dim} is not divisible by decoder_num_heads {self.decoder_num_heads}"
            )
        if self.decoder_dim % 4 != 0:
            raise ValueError(f"decoder_dim must be a multiple of 4 for 2-D sin-cos positions, got {self.decoder_dim}")

    @classmethod
    def tiny(cls, **fields: Any) -> MaskedViTConfig:
        """A "micro" ViT on 32 px images with a one-block decoder (PCAE: 12 masked -> 6 -> 3 -> 1 targets)."""
        tiny = dict(size="micro", img_size=32, patch_size=8, decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
        return cls(**{**tiny, **fields})

    @property
    def num_visible(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def num_masked(self) -> int:
        return self.num_patches - self.num_visible

    def build_decoder(self, out_dim: int, drop_path: float = 0.0) -> MaskedDecoder:
        """The decoder this config describes, mapping encoder tokens to ``out_dim`` per query."""
        return MaskedDecoder(
            grid_size=(self.num_patches_side,) * 2,
            in_dim=self.vit.embed_dim,
            embed_dim=self.decoder_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
            out_dim=out_dim,
            mlp_ratio=self.mlp_ratio,
            drop_path=drop_path,
        )
