"""Progressive token reduction: which tokens are kept, random mode, config checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.methods import build_method
from launcher.methods.classifier import ClassifierConfig
from launcher.methods.token_reduction import TokenReducer


def brute_force_least_similar(tokens: torch.Tensor, k: int) -> list[int]:
    """Indices of the k tokens with the lowest cosine to the mean of the unit-normalised tokens."""
    units = [t / t.norm() for t in tokens]
    mean = sum(units) / len(units)
    scores = [float(torch.dot(u, mean) / mean.norm()) for u in units]
    return sorted(range(len(units)), key=lambda i: scores[i])[:k]


def test_reducer_keeps_the_tokens_least_similar_to_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 10, 8) + 0.5  # an offset so the mean direction is meaningful
    ids = torch.randperm(40)[:30].view(3, 10)
    kept, kept_ids = TokenReducer(0.5)(x, ids)
    assert kept.shape == (3, 5, 8) and kept_ids.shape == (3, 5)
    for b in range(3):
        want = brute_force_least_similar(x[b], 5)
        assert kept_ids[b].tolist() == ids[b, want].tolist()
        torch.testing.assert_close(kept[b], x[b, want])


def test_reducer_keeps_prefix_tokens_first() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 8, 4)
    ids = torch.arange(8).expand(2, -1)
    kept, kept_ids = TokenReducer(0.25, num_prefix_tokens=1)(x, ids)
    assert kept.shape == (2, 1 + 2, 4)
    torch.testing.assert_close(kept[:, 0], x[:, 0])
    for b in range(2):
        want = brute_force_least_similar(x[b, 1:], 2)
        assert kept_ids[b].tolist() == want
        torch.testing.assert_close(kept[b, 1:], x[b, 1:][want])


def test_random_mode_keeps_a_subset_of_the_right_size() -> None:
    x = torch.randn(2, 9, 4)
    ids = torch.arange(100, 109).expand(2, -1)
    kept, kept_ids = TokenReducer(0.5, mode="random")(x, ids)
    assert kept.shape == (2, 4, 4)
    for b in range(2):
        chosen = kept_ids[b].tolist()
        assert len(set(chosen)) == 4 and set(chosen) <= set(range(100, 109))
        torch.testing.assert_close(kept[b], x[b, [i - 100 for i in chosen]])


def test_reducer_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="keep_ratio"):
        TokenReducer(0.0)
    with pytest.raises(ValueError, match="known modes"):
        TokenReducer(0.5, mode="merge")  # type: ignore[arg-type]


TINY = {"size": "micro", "img_size": 32, "patch_size": 8}


def test_reduction_keeps_the_cls_token_and_the_least_mean_like_tokens() -> None:
    torch.manual_seed(0)
    model = build_method(ClassifierConfig(**TINY, num_classes=3, keep_ratio=0.5, num_drop_stages=1))
    x = torch.randn(2, 17, 32)
    ids = torch.arange(16).expand(2, -1)
    kept, kept_ids = model.reducer(x, ids)
    assert torch.equal(kept[:, 0], x[:, 0])
    tokens = nn.functional.normalize(x[:, 1:], dim=-1)
    score = (tokens * tokens.mean(1, keepdim=True)).sum(-1)
    expected = score.argsort(dim=1)[:, :8]
    assert torch.equal(kept_ids.sort(1).values, expected.sort(1).values)
