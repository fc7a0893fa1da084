"""Progressive Token Reduction (PTR, from PCAE): drop tokens between transformer blocks.

After chosen blocks a ``TokenReducer`` keeps a fixed fraction of the tokens and discards the
rest outright (a gather; nothing is merged). Used by the PCAE teacher during pre-training and
by the fine-tuning backbone (``methods/classifier.py``), both configured by ``TokenReductionConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import gather_tokens

DropMode = Literal["similarity", "random"]
DROP_MODES: tuple[str, ...] = ("similarity", "random")


def default_drop_positions(depth: int, num_stages: int) -> tuple[int, ...]:
    """Evenly spaced blocks to reduce after: ``i * depth // num_stages`` (ViT-B, 3 stages: 0, 4, 8)."""
    return tuple(i * depth // num_stages for i in range(num_stages))


def reduced_token_counts(num_tokens: int, keep_ratio: float, num_stages: int) -> tuple[int, ...]:
    """Token counts before the first and after each reduction (147, 0.5, 3 -> 147, 73, 36, 18)."""
    counts = [num_tokens]
    for _ in range(num_stages):
        counts.append(int(counts[-1] * keep_ratio))
    return tuple(counts)


@dataclass(kw_only=True)
class TokenReductionConfig:
    """Where and how much a ViT reduces tokens; mixed into a ``ViTConfig`` (PCAE's teacher, the classifier).

    ``drop_positions`` are the blocks after which tokens are reduced; ``None`` spaces
    ``num_drop_stages`` of them evenly (blocks 0, 4, 8 for ViT-B). ``keep_ratio = 1`` reduces
    nothing; the paper's "drop ratio" is ``1 - keep_ratio``.
    """

    keep_ratio: float = 1.0
    num_drop_stages: int = 3
    drop_positions: tuple[int, ...] | None = None
    drop_mode: DropMode = "similarity"

    def __post_init__(self) -> None:
        super().__post_init__()  # the ViTConfig this is mixed into: its depth is known after
        depth = self.vit.depth
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1] (drop ratio = 1 - keep_ratio), got {self.keep_ratio}")
        if not 0 <= self.num_drop_stages <= depth:
            raise ValueError(
                f"num_drop_stages must be between 0 and the encoder depth {depth}, got {self.num_drop_stages}"
            )
        if self.drop_positions is not None:
            self.drop_positions = tuple(self.drop_positions)
            check_drop_positions(self.drop_positions, self.num_drop_stages, depth)
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"unknown drop_mode {self.drop_mode!r}; known modes: {', '.join(DROP_MODES)}")

    @property
    def resolved_drop_positions(self) -> tuple[int, ...]:
        """The blocks after which tokens are reduced: none at keep ratio 1."""
        if self.keep_ratio == 1.0:
            return ()
        if self.drop_positions is not None:
            return self.drop_positions
        return default_drop_positions(self.vit.depth, self.num_drop_stages)

    def reduced_counts(self, num_tokens: int) -> tuple[int, ...]:
        """``num_tokens`` entering the first block, then the count after each reduction."""
        return reduced_token_counts(num_tokens, self.keep_ratio, len(self.resolved_drop_positions))

    def build_reducer(self, num_prefix_tokens: int = 0) -> TokenReducer:
        return TokenReducer(self.keep_ratio, self.drop_mode, num_prefix_tokens)


def check_drop_positions(positions: tuple[int, ...], num_stages: int, depth: int) -> None:
    """Raise ``ValueError`` unless ``positions`` are ``num_stages`` increasing block indices below ``depth``."""
    if len(positions) != num_stages:
        raise ValueError(
            f"drop_positions {list(positions)} has {len(positions)} entries but num_drop_stages is "
            f"{num_stages}; set num_drop_stages to {len(positions)} or leave drop_positions unset"
        )
    out_of_range = [i for i in positions if not 0 <= i < depth]
    if out_of_range:
        raise ValueError(f"drop_positions {out_of_range} are out of range; blocks are numbered 0 to {depth - 1}")
    if len(set(positions)) != len(positions):
        raise ValueError(f"drop_positions {list(positions)} has duplicates; list each block once")
    if list(positions) != sorted(positions):
        raise ValueError(f"drop_positions {list(positions)} must be in increasing order")


def similarity_scores(x: Tensor) -> Tensor:
    """Cosine similarity ``[B, n]`` of each token to the mean of the L2-normalised tokens.

    This follows the reference release, which averages the *normalised* tokens (the paper's
    figure writes ``1 - sim(X, mean(X))`` without saying which mean). Dividing by the norm of the
    mean changes no ranking within an image; it only makes the score a true cosine. Always in
    fp32: under bf16 autocast the einsum would round scores that differ in the third digit,
    and which tokens are kept would follow the rounding.
    """
    with torch.autocast(x.device.type, enabled=False):
        tokens = F.normalize(x.float(), dim=-1)
        mean = F.normalize(tokens.mean(dim=1), dim=-1)
        return torch.einsum("bnd,bd->bn", tokens, mean)


class TokenReducer(nn.Module):
    """Keep ``int(n * keep_ratio)`` of the ``n`` non-prefix tokens, carrying their position ids.

    ``"similarity"`` keeps the tokens least similar to the mean token (the most distinctive ones);
    ``"random"`` keeps a uniformly random subset (an ablation). Prefix tokens (e.g. cls) are
    always kept, first. Kept tokens come out in ascending score order.
    """

    def __init__(self, keep_ratio: float, mode: DropMode = "similarity", num_prefix_tokens: int = 0) -> None:
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if mode not in DROP_MODES:
            raise ValueError(f"unknown token drop mode {mode!r}; known modes: {', '.join(DROP_MODES)}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.keep_ratio = keep_ratio
        self.mode = mode
        self.num_prefix_tokens = num_prefix_tokens

    def num_kept(self, num_tokens: int) -> int:
        return int(num_tokens * self.keep_ratio)

    def forward(self, x: Tensor, ids: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, P + n, D]``, ``ids`` ``[B, n]`` -> kept ``[B, P + k, D]`` and their ids ``[B, k]``.

        ``noise`` ``[B, n]`` replaces ``torch.rand`` as the random mode's scores, so callers can
        make the choice reproducible.
        """
        prefix, tokens = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        assert ids.shape == tokens.shape[:2], (ids.shape, tokens.shape)
        num_keep = self.num_kept(tokens.shape[1])
        if self.mode == "similarity":
            scores = similarity_scores(tokens.detach())  # the choice itself is not differentiated
        elif noise is not None:
            scores = noise
        else:
            scores = torch.rand(ids.shape, device=x.device)
        keep = scores.topk(num_keep, dim=1, largest=False, sorted=True).indices
        kept = gather_tokens(tokens, keep)
        if self.num_prefix_tokens:
            kept = torch.cat([prefix, kept], dim=1)
        return kept, ids.gather(1, keep)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, mode={self.mode!r}, num_prefix_tokens={self.num_prefix_tokens}"
