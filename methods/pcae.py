"""PCAE: predict an EMA teacher's features of the masked patches, with progressive token reduction.

The student encodes the visible patches (+ cls). An EMA copy of it, the teacher, encodes only
the masked patches and discards tokens after chosen blocks (``TokenReducer``), so the targets
are the few masked tokens that survive. A light decoder predicts the teacher's standardised
features at those positions; the loss is one minus their mean cosine similarity.

Departures from the reference release (caddyless/PCAE), all deliberate fixes:
the teacher starts as a copy of the student and is frozen in every run mode (not only under
DDP); it sees the masked patches (as after commit 3332232), never the visible ones; the
prediction head outputs the teacher's width rather than ``p*p*3``, so every ViT size works;
the EMA momentum really ends at ``momentum_final``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .protocol import EncoderChoice
from .registry import register_method
from .token_reduction import TokenReductionConfig
from .vit import MaskedViTConfig, Masking, batch_noise, random_masking, strip_prefix


@dataclass(kw_only=True)
class PCAEConfig(TokenReductionConfig, MaskedViTConfig):
    """PCAE with a ViT encoder; defaults are the reference ViT-B/16 recipe.

    The teacher reduces tokens as ``TokenReductionConfig`` says: keep ratio 0.5 after blocks
    0, 4 and 8 for ViT-B (147 -> 73 -> 36 -> 18 target tokens).
    """

    name: str = "pcae"
    drop_path: float = 0.25
    decoder_drop_path: float = 0.25
    keep_ratio: float = 0.5
    momentum: float = 0.9999
    momentum_final: float = 1.0
    # The teacher's memory as a fraction of the run: when set, the starting momentum is
    # 1 - 1 / (momentum_horizon * total_steps), so the teacher averages over the same share of
    # training at any length and batch size (batch cancels: a run of E epochs has E*N/B steps and
    # the horizon in samples is momentum_horizon*E*N). The paper's 0.9999 at ImageNet length
    # (400 epochs at batch 4096: 125,120 steps) is momentum_horizon = 0.08. ``momentum`` is then unused.
    momentum_horizon: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.decoder_drop_path < 1.0:
            raise ValueError(f"decoder_drop_path must be in [0, 1), got {self.decoder_drop_path}")
        for key in ("momentum", "momentum_final"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value}")
        if self.momentum_horizon is not None and not 0.0 < self.momentum_horizon <= 1.0:
            raise ValueError(f"momentum_horizon must be a fraction of the run in (0, 1], got {self.momentum_horizon}")
        counts = self.target_token_counts
        if counts[-1] < 1:
            raise ValueError(
                f"token reduction leaves no target tokens ({' -> '.join(map(str, counts))}); "
                "raise keep_ratio, lower mask_ratio or use fewer drop stages"
            )

    def start_momentum(self, total_steps: int) -> float:
        """The EMA momentum at step 0 of a run of ``total_steps`` (see ``momentum_horizon``)."""
        if self.momentum_horizon is None:
            return self.momentum
        return max(0.0, 1.0 - 1.0 / (self.momentum_horizon * total_steps))

    @property
    def target_token_counts(self) -> tuple[int, ...]:
        """Teacher token counts: masked patches, then after each reduction (ViT-B/16: 147, 73, 36, 18)."""
        return self.reduced_counts(self.num_masked)


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum at ``step``: a half cosine from ``start`` (step 0) to ``end`` (step ``total_steps``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


class TeacherTargets(NamedTuple):
    """What the teacher produced for a batch.

    ``features`` ``[B, m, D]`` are the standardised targets at patch ids ``ids`` ``[B, m]``;
    ``ids_per_stage`` holds the ids entering the teacher, then those kept after each reduction.
    """

    features: Tensor
    ids: Tensor
    ids_per_stage: tuple[Tensor, ...]


@register_method("pcae", config=PCAEConfig)
class PCAE(nn.Module):
    """Student/teacher feature prediction on masked patches with a token-reducing EMA teacher."""

    def __init__(self, cfg: PCAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = cfg.build_encoder()
        self.teacher = cfg.build_encoder(drop_path=0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.drop_positions = cfg.resolved_drop_positions
        self.reducer = cfg.build_reducer()
        self.decoder = cfg.build_decoder(out_dim=self.teacher.embed_dim, drop_path=cfg.decoder_drop_path)
        counts = cfg.target_token_counts
        # The random drop mode draws its scores from the batch seeds too, after the mask noise.
        self._noise_sizes = (self.student.num_patches, *(counts[:-1] if cfg.drop_mode == "random" else ()))

    def _draw(self, batch: dict[str, Tensor]) -> tuple[Masking, tuple[Tensor, ...]]:
        noise = batch_noise(batch, sum(self._noise_sizes)).split(self._noise_sizes, dim=1)
        return random_masking(self.student.num_patches, self.cfg.mask_ratio, noise[0]), noise[1:]

    def mask(self, batch: dict[str, Tensor]) -> Masking:
        """The masking this batch gets (a function of ``batch["seed"]`` when present)."""
        return self._draw(batch)[0]

    @torch.no_grad()
    def teacher_targets(self, images: Tensor, ids_masked: Tensor, stage_noise: Sequence[Tensor] = ()) -> TeacherTargets:
        """Encode only the masked patches (no cls), reducing tokens after each drop position."""
        ids_per_stage = [ids_masked]
        noise = iter(stage_noise)

        def reduce(block_index: int, x: Tensor) -> Tensor:
            if block_index not in self.drop_positions:
                return x
            x, ids = self.reducer(x, ids_per_stage[-1], next(noise, None))
            ids_per_stage.append(ids)
            return x

        x = self.teacher.forward_tokens(self.teacher.embed_patches(images, ids_masked), hook=reduce)
        features = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)  # the targets in fp32, whatever autocast ran
        return TeacherTargets(features, ids_per_stage[-1], tuple(ids_per_stage))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]
        masking, stage_noise = self._draw(batch)
        latent = self.student(images, masking.ids_keep)
        targets = self.teacher_targets(images, masking.ids_masked, stage_noise)
        pred = self.decoder(latent, masking.ids_keep, targets.ids)
        loss = 1.0 - F.cosine_similarity(pred.float(), targets.features, dim=-1).mean()
        num_targets = pred.new_tensor(float(targets.ids.shape[1]))
        return {"loss": loss, "num_target_tokens": num_targets}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher after optimizer step ``step`` (1-based) of ``total_steps``."""
        m = ema_momentum(step, total_steps, self.cfg.start_momentum(total_steps), self.cfg.momentum_final)
        if m < 1.0:
            torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()), 1.0 - m)

    @staticmethod
    def encoder_state(state: dict[str, Tensor], which: EncoderChoice = "student") -> dict[str, Tensor]:
        """The student's (``student.*``) or the EMA teacher's (``teacher.*``) weights of a PCAE checkpoint."""
        return strip_prefix(state, f"{which}.")

    def patch_tokens(self, images: Tensor, depth: int | None = None) -> Tensor:
        """The student's normalised patch tokens for all patches, in grid order ``[B, N, D]``
        (after its first ``depth`` blocks: an inner layer for a probe)."""
        return self.student(images, depth=depth)[:, self.student.num_prefix_tokens :]

    def teacher_patch_tokens(self, images: Tensor, depth: int | None = None) -> Tensor:
        """The EMA teacher's normalised patch tokens for all patches (no reduction) ``[B, N, D]``."""
        return self.teacher(images, depth=depth)[:, self.teacher.num_prefix_tokens :]

    def embed(self, images: Tensor) -> Tensor:
        """Mean of the student's normalised patch tokens over all patches ``[B, D]``."""
        return self.patch_tokens(images).mean(dim=1)
