"""Fine-tuning and linear probing of a pretrained ViT encoder, with PCAE's token reduction.

``finetune`` is MAE's fine-tuning recipe: the whole encoder trains (drop path 0.1, layer-wise
lr decay in the optimizer), global average pooling of the patch tokens, a LayerNorm and a
linear head, Mixup/CutMix with label smoothing (timm's ``Mixup`` and losses). ``linprobe`` is
MAE's linear probe: a frozen encoder, its normalised cls token, a BatchNorm without affine
and a linear head (trained with LARS, chosen in the optimizer config).

Both can reduce tokens inside the encoder as PCAE does downstream: after the blocks in
``drop_positions`` a ``TokenReducer`` (the module the PCAE teacher uses) keeps ``keep_ratio``
of the patch tokens, those least similar to their mean; the cls token is always kept.
``keep_ratio = 1`` is the plain ViT; the paper's "drop ratio" is ``1 - keep_ratio``.

Classification heads are trained with cross-entropy; regression heads (LunarLander's state)
with the mean squared error on the label columns ``targets``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import resample_abs_pos_embed
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn

from .pretrained import PretrainedEncoder, load_pretrained
from .protocol import EncoderChoice
from .registry import register_method
from .seeding import seeded_host_rngs
from .token_reduction import TokenReductionConfig
from .vit import LayerNorm, ViTConfig, grid_pool, position_moments, strip_prefix

log = logging.getLogger(__name__)

Pooling = Literal["avg", "cls", "grid", "moments"]


@dataclass(kw_only=True)
class ClassifierConfig(TokenReductionConfig, ViTConfig):
    """A ViT encoder with a head; defaults are MAE's ViT-B/16 fine-tuning recipe.

    ``pretrained`` is a checkpoint (a file or a checkpoint directory of a run; ``launch
    finetune`` fills it in), ``pretrained_encoder`` picks PCAE's student or EMA teacher.
    Pooling: ``avg`` (patch-token mean + LayerNorm), ``cls`` (the normalised cls token), or
    ``grid`` (normalised patch tokens averaged over ``pool_grid`` x ``pool_grid`` cells,
    concatenated, which keeps where things are, e.g. for LunarLander's position; ``pool_grid: 0``
    is one cell per patch, a head on every patch token), or ``moments`` (the normalised patch
    tokens' mean and their means weighted by column and by row: where a small object is stays
    linear, and it reads the same whichever tokens token reduction kept, where a grid cell whose
    tokens were all dropped reads zero).
    Token reduction (``TokenReductionConfig``) is off by default (keep ratio 1).
    """

    name: str = "finetune"
    task: Literal["classification", "regression"] = "classification"
    num_classes: int = 1000
    targets: tuple[int, ...] = ()  # regression: the label columns to predict
    # Regression: the head predicts (label - target_mean) / target_std, so a short run need not
    # first walk its bias to the targets' mean; empty means 0 and 1. predict() undoes it.
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()
    pool: Pooling = "avg"
    pool_grid: int = 2  # 0: one cell per patch
    drop_path: float = 0.1
    freeze_encoder: bool = False
    head_batchnorm: bool = False  # a BatchNorm1d without affine before the head (MAE's linear probe)
    head_init_std: float = 2e-5
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    pretrained: str = ""
    pretrained_encoder: EncoderChoice = "student"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task == "classification" and self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 for classification, got {self.num_classes}")
        if self.task == "regression":
            if not self.targets:
                raise ValueError("a regression head needs targets: the label columns to predict, e.g. [0, 1]")
            if self.mixup > 0 or self.cutmix > 0 or self.label_smoothing > 0:
                raise ValueError("mixup, cutmix and label_smoothing mix class labels; set them to 0 for regression")
            for key in ("target_mean", "target_std"):
                if getattr(self, key) and len(getattr(self, key)) != len(self.targets):
                    raise ValueError(f"{key} needs one value per target column ({len(self.targets)}), or none")
            if any(s <= 0 for s in self.target_std):
                raise ValueError("target_std values must be > 0")
        if self.pool_grid < 0 or self.num_patches_side % self.pool_cells_side:
            raise ValueError(
                f"pool_grid {self.pool_grid} must divide the {self.num_patches_side} patches per side "
                "(0: one cell per patch)"
            )
        if self.token_counts[-1] < 1:
            raise ValueError(
                f"token reduction leaves no patch tokens ({' -> '.join(map(str, self.token_counts))}); "
                "raise keep_ratio or use fewer drop stages"
            )
        if min(self.mixup, self.cutmix, self.label_smoothing, self.head_init_std) < 0:
            raise ValueError("mixup, cutmix, label_smoothing and head_init_std must be >= 0")

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.task == "classification" else len(self.targets)

    @property
    def pool_cells_side(self) -> int:
        """Cells per side of grid pooling."""
        return self.pool_grid or self.num_patches_side

    @property
    def token_counts(self) -> tuple[int, ...]:
        """Patch tokens entering the first block and after each reduction (ViT-B/16, 0.7: 196, 137, 95, 66)."""
        return self.reduced_counts(self.num_patches)

    @classmethod
    def tiny(cls, **fields) -> ClassifierConfig:
        tiny = dict(size="micro", img_size=32, patch_size=8, num_classes=10, keep_ratio=0.75, num_drop_stages=2)
        return cls(**{**tiny, **fields})


@dataclass(kw_only=True)
class LinearProbeConfig(ClassifierConfig):
    """MAE's linear probe: frozen encoder, cls token, BatchNorm (no affine) + linear head, no mixing."""

    name: str = "linprobe"
    pool: Pooling = "cls"
    drop_path: float = 0.0
    freeze_encoder: bool = True
    head_batchnorm: bool = True
    head_init_std: float = 0.01
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0


class ViTClassifier(nn.Module):
    """Encoder (optionally reducing tokens) -> pooling -> [BatchNorm] -> linear head."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg

        self.encoder = cfg.build_encoder()
        width = self.encoder.embed_dim
        # Positions are learnt while fine-tuning, as in MAE (timm's ViT), from the fixed sin-cos
        # ones (or those of an official checkpoint); the cls row is added to the cls token.
        self.pos_embed = nn.Parameter(self.encoder.pos_embed.detach().clone().unsqueeze(0))
        self.drop_positions = frozenset(cfg.resolved_drop_positions)
        self.reducer = cfg.build_reducer(num_prefix_tokens=self.encoder.num_prefix_tokens)
        if cfg.pool == "avg":  # the mean patch token goes through fc_norm instead of the final norm (MAE)
            self.encoder.norm = nn.Identity()
        self.fc_norm = LayerNorm(width) if cfg.pool == "avg" else nn.Identity()
        features = width * {"grid": cfg.pool_cells_side**2, "moments": 3}.get(cfg.pool, 1)
        linear = nn.Linear(features, cfg.num_outputs)
        nn.init.trunc_normal_(linear.weight, std=cfg.head_init_std)
        nn.init.zeros_(linear.bias)
        self.head = (
            nn.Sequential(nn.BatchNorm1d(features, affine=False, eps=1e-6), linear) if cfg.head_batchnorm else linear
        )
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.pos_embed.requires_grad_(False)
            self.fc_norm.requires_grad_(False)
        if cfg.task == "regression":
            outputs = cfg.num_outputs
            self.register_buffer("target_mean", torch.tensor(cfg.target_mean or [0.0] * outputs), persistent=False)
            self.register_buffer("target_std", torch.tensor(cfg.target_std or [1.0] * outputs), persistent=False)
        if cfg.task == "classification":
            self.mixup = (
                Mixup(
                    mixup_alpha=cfg.mixup,
                    cutmix_alpha=cfg.cutmix,
                    label_smoothing=cfg.label_smoothing,
                    num_classes=cfg.num_classes,
                )
                if cfg.mixup > 0 or cfg.cutmix > 0
                else None
            )
            self.criterion = (
                SoftTargetCrossEntropy()
                if self.mixup is not None
                else LabelSmoothingCrossEntropy(cfg.label_smoothing)
                if cfg.label_smoothing > 0
                else nn.CrossEntropyLoss()
            )

    # ------------------------------------------------------------------ weights

    def check_classes(self, classes: list[str]) -> None:
        """Refuse a training set whose classes the head does not match one to one (``ValueError``)."""
        if self.cfg.task == "classification" and len(classes) != self.cfg.num_classes:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise ValueError(
                f"method.num_classes is {self.cfg.num_classes} but the training set has {len(classes)} classes "
                f"({shown}); set method.num_classes={len(classes)}"
            )

    def initialize(self) -> None:
        """Load the pretrained encoder (``cfg.pretrained``): what a run starts from, once.

        The trainer calls it only for a run without a checkpoint; a run that resumes has every
        weight in its own checkpoint and never needs its source again.
        """
        if self.cfg.pretrained:
            self.load_pretrained(load_pretrained(self.cfg.pretrained, self.cfg.pretrained_encoder))

    @staticmethod
    def encoder_state(state: dict[str, Tensor], which: EncoderChoice = "student") -> dict[str, Tensor]:
        """The fine-tuned encoder's weights (``encoder.*``; its learnt ``pos_embed`` is the caller's)."""
        if which == "teacher":
            raise ValueError("a fine-tuned or probed classifier has no EMA teacher; take the student (the encoder)")
        return strip_prefix(state, "encoder.")

    def load_pretrained(self, pretrained: PretrainedEncoder) -> None:
        """Copy a pretrained encoder in; a fine-tuned official file also brings its head."""
        cfg, enc = self.cfg, self.encoder
        found = (pretrained.width, pretrained.depth, pretrained.patch_size, pretrained.in_chans)
        wanted = (enc.embed_dim, enc.depth, enc.patch_size, cfg.in_chans)
        if found != wanted:
            raise ValueError(
                f"{cfg.pretrained} holds a {pretrained.source} ViT of width {found[0]}, depth {found[1]}, patch "
                f"{found[2]}, {found[3]} channels, but method.size={cfg.size!r}/patch_size={cfg.patch_size} build "
                f"width {wanted[0]}, depth {wanted[1]}, patch {wanted[2]}, {wanted[3]} channels; set method.size "
                f"and method.patch_size to match the checkpoint"
            )
        missing, _ = enc.load_state_dict(pretrained.state, strict=False)  # norm.* unused unless pool is cls
        if missing:
            raise ValueError(f"{cfg.pretrained} lacks encoder weights {missing[:4]}")
        if pretrained.pos_embed is not None:
            pos = pretrained.pos_embed.reshape(1, -1, enc.embed_dim)
            old_side = round((pos.shape[1] - 1) ** 0.5)
            if old_side != cfg.num_patches_side:  # another resolution: resample as MAE's fine-tuning does
                pos = resample_abs_pos_embed(pos, [cfg.num_patches_side] * 2, [old_side] * 2, num_prefix_tokens=1)
            with torch.no_grad():
                self.pos_embed.copy_(pos)
        if pretrained.head is not None:
            head = pretrained.head
            linear = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
            if "head.weight" in head and head["head.weight"].shape == linear.weight.shape:
                linear.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
                if cfg.pool == "avg" and "fc_norm.weight" in head:
                    self.fc_norm.load_state_dict({"weight": head["fc_norm.weight"], "bias": head["fc_norm.bias"]})
                log.info("loaded the fine-tuned head of %s", cfg.pretrained)
        log.info("loaded the %s encoder of %s", pretrained.source, cfg.pretrained)

    # ------------------------------------------------------------------ forward

    def features(self, images: Tensor) -> Tensor:
        """Pooled features ``[B, F]`` (before the head)."""
        cfg, enc = self.cfg, self.encoder
        x = enc.prepend_cls(enc.patch_embed(images)) + self.pos_embed
        ids = torch.arange(enc.num_patches, device=images.device).expand(images.shape[0], -1)

        def reduce(block_index: int, tokens: Tensor) -> Tensor:
            nonlocal ids
            if block_index in self.drop_positions:
                tokens, ids = self.reducer(tokens, ids)
            return tokens

        x = enc.forward_tokens(x, hook=reduce)  # the final norm is an identity for avg pooling
        if cfg.pool == "cls":
            return x[:, 0]
        patches = x[:, enc.num_prefix_tokens :]
        if cfg.pool == "avg":
            return self.fc_norm(patches.mean(dim=1))
        if cfg.pool == "moments":
            return position_moments(patches, cfg.num_patches_side, ids)
        return grid_pool(patches, cfg.num_patches_side, cfg.pool_cells_side, ids)

    @property
    def features_frozen(self) -> bool:
        """Whether ``features(images)`` stay fixed while this trains (the trainer may then cache them).

        True for a frozen encoder without stochastic depth or random token dropping, and
        without Mixup/CutMix (which mix images, not features).
        """
        cfg = self.cfg
        deterministic = cfg.drop_path == 0 and (cfg.keep_ratio == 1.0 or cfg.drop_mode == "similarity")
        return cfg.freeze_encoder and deterministic and cfg.mixup == 0 and cfg.cutmix == 0

    def head_outputs(self, images: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """What the head computes, from images or from their (cached) features: logits, or standardised targets."""
        if features is None:
            with torch.no_grad() if self.cfg.freeze_encoder else nullcontext():
                features = self.features(images)
        return self.head(features)

    def predict(self, images: Tensor) -> Tensor:
        """Class logits ``[B, C]`` or regression outputs ``[B, len(targets)]`` in the labels' units."""
        outputs = self.head_outputs(images)
        if self.cfg.task == "regression":
            return outputs * self.target_std + self.target_mean
        return outputs

    def targets_of(self, labels: Tensor) -> Tensor:
        """The regression columns of a label batch, as floats."""
        return labels[:, list(self.cfg.targets)].float()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss of a batch of images, or of their features when the trainer cached them."""
        images, features, labels = batch.get("image"), batch.get("features"), batch["label"]
        if self.cfg.task == "regression":
            standardised = (self.targets_of(labels) - self.target_mean) / self.target_std
            return {"loss": F.mse_loss(self.head_outputs(images, features).float(), standardised)}
        if features is not None:
            return {"loss": self.criterion(self.head_outputs(features=features).float(), labels)}
        if self.mixup is not None and self.training:
            if images.shape[0] % 2:
                raise ValueError(
                    f"Mixup/CutMix pair samples within a micro-batch; train.micro_batch_size "
                    f"must be even, got {images.shape[0]}"
                )
            # timm draws from NumPy's global RNG: make the draw a function of the samples' seeds.
            with seeded_host_rngs(int(batch["seed"][0])) if "seed" in batch else nullcontext():
                images, labels = self.mixup(images, labels)
        return {"loss": self.criterion(self.head_outputs(images).float(), labels)}

    def embed(self, images: Tensor) -> Tensor:
        return self.features(images)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer-wise lr decay, as MAE's: stem 0, block i -> i + 1, the rest L + 1.

        (timm's own ViT merges the final norm into the last block with the ordinal 99999; MAE
        gives the norms their own, undecayed layer, hence another ordinal here.)
        """
        return {
            "stem": r"^(?:pos_embed|encoder\.cls_token|encoder\.patch_embed)",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^(?:encoder\.norm|fc_norm|head)", (100000,))],
        }


register_method("finetune", config=ClassifierConfig)(ViTClassifier)
register_method("linprobe", config=LinearProbeConfig)(ViTClassifier)
