"""The cheap probe: episode-level splits, ridge that finds a linear map and nothing in noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.data import DataConfig
from launcher.data.lunarlander_generate import generate_lunarlander
from launcher.methods.vit import grid_pool
from launcher.probe import (
    FoldRidge,
    ProbeConfig,
    ProbeScore,
    ProbeSet,
    cross_validated_probe,
    describe,
    episode_folds,
    held_out_probe,
    moments_of,
)


def test_no_fold_puts_one_episode_on_two_sides_and_every_sample_is_held_out_once() -> None:
    groups = np.repeat(np.arange(20), np.random.default_rng(0).integers(1, 30, size=20))
    folds = episode_folds(groups, 5)
    episodes = [set(groups[fold]) for fold in folds]
    assert all(episodes) and sum(len(e) for e in episodes) == len(set().union(*episodes)) == 20  # disjoint
    held_out = np.sort(np.concatenate(folds))
    assert held_out.tolist() == list(range(len(groups)))


def test_ridge_recovers_a_linear_map_and_finds_nothing_in_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = np.stack([x[:, 0], x[:, 1] - 2 * x[:, 2], rng.normal(size=300)], axis=1)  # two signals, one noise
    folds = episode_folds(np.arange(300) // 5, 5)
    r2 = cross_validated_probe(x, y, folds)
    assert r2[0] > 0.99 and r2[1] > 0.99 and r2[2] < 0.05  # noise: about 0 or below
    penalties = FoldRidge(x, y).choose_penalties(folds)
    assert penalties[2] > penalties[0]  # the noise column is shrunk hardest


@pytest.mark.parametrize("features", [8, 80], ids=["primal", "kernel"])
def test_the_penalty_path_equals_one_solve_per_penalty(features: int) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(57, features)) + 3.0, rng.normal(size=(57, 2))
    train, test = np.arange(50), np.arange(50, 57)
    mean = x[train].mean(0)
    scale = np.sqrt(((x[train] - mean) ** 2).mean())
    a, b = (x[train] - mean) / scale, (x[test] - mean) / scale
    ridge = FoldRidge(x, y, penalties=(0.1, 10.0))
    assert ridge.kernel == (features > 57)
    for penalty, got in zip((0.1, 10.0), ridge.predict(train, test)):
        weights = np.linalg.solve(a.T @ a + penalty * np.eye(features), a.T @ (y[train] - y[train].mean(0)))
        np.testing.assert_allclose(got, b @ weights + y[train].mean(0), rtol=1e-6, atol=1e-8)


def one_bright_patch(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Tokens of an 8 x 8 patch grid where one patch carries a bright object: its (column, row) is the label."""
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.normal(0, 0.3, size=(n, 64, 16)).astype(np.float32))
    where = rng.integers(0, 64, size=n)
    tokens[np.arange(n), where] += 4.0  # the object: every feature of its patch lit
    return tokens, np.stack([where % 8, where // 8], axis=1).astype(np.float64)


def test_every_token_reads_where_a_one_patch_object_is_and_two_by_two_cells_do_not() -> None:
    tokens, position = one_bright_patch(600, seed=0)
    folds = episode_folds(np.arange(600) // 10, 5)
    per_token = cross_validated_probe(tokens.flatten(1).numpy(), position, folds)
    moments = cross_validated_probe(moments_of(tokens).numpy(), position, folds)
    cells = cross_validated_probe(grid_pool(tokens, side=8, grid=2).numpy(), position, folds)
    assert per_token.min() > 0.95 and moments.min() > 0.95
    assert cells.max() < 0.85  # a 2 x 2 grid knows the quadrant, not the patch


def test_the_position_moments_are_the_mean_and_the_column_and_row_weighted_means() -> None:
    tokens = torch.zeros(1, 4, 2)
    tokens[0, 1] = torch.tensor([1.0, 2.0])  # row 0, column 1 of a 2 x 2 grid
    assert moments_of(tokens).tolist() == [[0.25, 0.5, 0.25, 0.5, -0.25, -0.5]]


def test_a_held_out_test_set_is_scored_by_a_probe_fit_on_the_other_samples() -> None:
    tokens, position = one_bright_patch(500, seed=1)
    x = tokens.flatten(1).numpy()
    folds = episode_folds(np.arange(400) // 10, 5)
    r2 = held_out_probe(x[:400], position[:400], folds, x[400:], position[400:])
    assert r2.min() > 0.95


def test_the_table_puts_the_rates_no_single_frame_shows_after_a_bar() -> None:
    names = {0: "x", 1: "y", 2: "vx", 4: "angle"}
    table = describe(
        {"encoder": ProbeScore({0: 0.9, 1: 0.8, 2: 0.1, 4: 0.5}, (0, 1, 4))}, names, (0, 1, 4), "lunarlander"
    )
    head, row = table.splitlines()
    assert head.split() == ["x", "y", "angle", "|", "vx", "mean", "of", "x,y,angle"]
    assert row.split() == ["encoder", "0.900", "0.800", "0.500", "|", "0.100", "0.733"]


def test_a_feature_equal_to_a_target_scores_one_and_noise_zero_on_lunarlander_episodes(tmp_path) -> None:
    root = tmp_path / "probe"
    generate_lunarlander(root, 900, num_workers=1, seed=3, agent="random")
    cfg = ProbeConfig(data=DataConfig(name="lunarlander", root=str(root), augment="none"), targets=(0, 1, 2, 3, 4))
    probe = ProbeSet(cfg, 64)
    episodes = np.asarray(probe.dataset.frames.episodes)[probe.indices]
    for k, fold in enumerate(probe.folds):
        others = np.concatenate([f for j, f in enumerate(probe.folds) if j != k])
        assert not set(episodes[fold]) & set(episodes[others])  # a probe never sees its test episodes
    x_of_frame = torch.from_numpy(np.asarray(probe.dataset.frames.states)[probe.indices, 0])
    seen, generator = [0], torch.Generator().manual_seed(0)

    def true_x(images: torch.Tensor) -> torch.Tensor:  # the samples come in probe.indices order
        rows = x_of_frame[seen[0] : seen[0] + len(images)]
        seen[0] += len(images)
        return torch.stack([rows, torch.randn(len(rows), generator=generator)], dim=1)

    assert probe.score(true_x).r2[0] > 0.999
    noise = probe.score(lambda images: torch.randn(len(images), 16, generator=generator))
    assert noise.mean < 0.05 and all(r2 < 0.1 for r2 in noise.r2.values())


def test_a_probe_of_an_inner_layer_reads_the_tokens_after_that_block() -> None:
    from launcher.methods import build_method, get_method

    model = build_method(get_method("mae").tiny()).eval()
    images = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    inner = model.patch_tokens(images, depth=1)
    encoder = model.encoder
    x = encoder.prepend_cls(encoder.embed_patches(images))
    expected = encoder.norm(encoder.blocks[0](x))[:, encoder.num_prefix_tokens :]
    torch.testing.assert_close(inner, expected)
    assert not torch.allclose(inner, model.patch_tokens(images))  # the output is after every block
    with pytest.raises(ValueError, match="probe.depth"):
        ProbeConfig(depth=0)
