"""ViT pieces: patches, masking, seeded noise, the query decoder, positions, stochastic depth."""

from __future__ import annotations

import pytest
import torch

from launcher.methods.vit import (
    MaskedDecoder,
    ViTEncoder,
    gather_tokens,
    grid_pool,
    noise_from_seeds,
    random_masking,
)


def test_random_masking() -> None:
    noise = torch.rand(3, 16)
    m = random_masking(16, 0.75, noise)
    assert m.ids_keep.shape == (3, 4) and m.ids_masked.shape == (3, 12)
    assert torch.equal(m.mask.sum(1), torch.full((3,), 12.0))
    for b in range(3):
        keep = set(m.ids_keep[b].tolist())
        assert keep == set(noise[b].argsort()[:4].tolist())  # lowest noise is kept
        assert keep.isdisjoint(m.ids_masked[b].tolist())
        assert all(m.mask[b, i] == 0 for i in keep)
    shuffled = torch.cat([m.ids_keep, m.ids_masked], dim=1)
    assert torch.equal(shuffled.gather(1, m.ids_restore), torch.arange(16).expand(3, -1))
    assert random_masking(196, 0.75, torch.rand(1, 196)).ids_keep.shape[1] == 49


def test_noise_from_seeds_is_per_sample() -> None:
    a = noise_from_seeds(torch.tensor([5, 6]), 10, "cpu")
    b = noise_from_seeds(torch.tensor([6]), 10, "cpu")
    assert a.shape == (2, 10)
    assert torch.equal(a[1:], b)


def test_embed_patches_subset_matches_conv_path() -> None:
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[3, 0, 15], [7, 8, 2]])
    full = enc.embed_patches(images)
    torch.testing.assert_close(enc.embed_patches(images, ids), gather_tokens(full, ids))


def test_decoder_equals_mae_unshuffle_formulation() -> None:
    # MAE appends mask tokens, un-shuffles to patch order, adds positions, decodes every token;
    # MaskedDecoder gathers positions instead. Attention is permutation-equivariant: same outputs.
    torch.manual_seed(0)
    dec = MaskedDecoder(grid_size=(4, 4), in_dim=8, embed_dim=16, depth=2, num_heads=2, out_dim=5).eval()
    masking = random_masking(16, 0.75, torch.rand(2, 16))
    latent = torch.randn(2, 1 + 4, 8)
    with torch.no_grad():
        got = dec(latent, masking.ids_keep, masking.ids_masked)
        x = dec.embed(latent)
        tokens = torch.cat([x[:, 1:], dec.mask_token.expand(2, 12, -1)], dim=1)
        tokens = gather_tokens(tokens, masking.ids_restore)  # back to patch order
        x = torch.cat([x[:, :1], tokens], dim=1) + dec.pos_embed
        for block in dec.blocks:
            x = block(x)
        want = gather_tokens(dec.pred(dec.norm(x))[:, 1:], masking.ids_masked)
    torch.testing.assert_close(got, want)


def test_pos_embed_is_fixed_and_not_trained() -> None:
    enc = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert enc.pos_embed.shape == (1 + 16, 32)
    assert torch.equal(enc.pos_embed[0], torch.zeros(32))  # cls position
    assert all(p is not enc.pos_embed for p in enc.parameters())
    assert "pos_embed" not in enc.state_dict()


def test_drop_path_rises_linearly() -> None:
    enc = ViTEncoder(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, drop_path=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in enc.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_gather_tokens() -> None:
    x = torch.arange(24.0).view(2, 4, 3)
    out = gather_tokens(x, torch.tensor([[3, 1], [0, 0]]))
    assert torch.equal(out, torch.stack([x[0, [3, 1]], x[1, [0, 0]]]))


def test_grid_pool_averages_each_cell_with_or_without_dropped_tokens() -> None:
    # 4 x 4 patches with D = 1 holding their own row-major index.
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    expected = [sum([0, 1, 4, 5]) / 4, sum([2, 3, 6, 7]) / 4, sum([8, 9, 12, 13]) / 4, sum([10, 11, 14, 15]) / 4]
    assert grid_pool(tokens, side=4, grid=2).tolist() == [expected]
    # After token reduction: only patches 0, 5, 15 remain, in any order; the empty cells are zero.
    ids = torch.tensor([[15, 0, 5]])
    kept = tokens[:, ids[0]]
    assert grid_pool(kept, side=4, grid=2, ids=ids).tolist() == [[2.5, 0.0, 0.0, 15.0]]
