"""MAE maths against independent formulations, seed-driven masking, config validation, ViT helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from methods import build_method
from methods.mae import MAE, MAEConfig, mae_loss
from methods.vit import (
    MaskedDecoder,
    ViTEncoder,
    gather_tokens,
    noise_from_seeds,
    patchify,
    random_masking,
)


def loop_patches(images: torch.Tensor, p: int) -> list[list[list[float]]]:
    """Patches by explicit loops: [sample][patch in row-major order][pixel (row, col, channel)]."""
    B, C, H, W = images.shape
    out = []
    for b in range(B):
        patches = []
        for gy in range(H // p):
            for gx in range(W // p):
                patches.append(
                    [float(images[b, c, gy * p + i, gx * p + j]) for i in range(p) for j in range(p) for c in range(C)]
                )
        out.append(patches)
    return out


def loop_normalise(patch: list[float]) -> list[float]:
    n = len(patch)
    mean = sum(patch) / n
    var = sum((v - mean) ** 2 for v in patch) / (n - 1)
    return [(v - mean) / (var + 1e-6) ** 0.5 for v in patch]


def loop_masked_ids(seed: int, num_patches: int, mask_ratio: float) -> list[int]:
    """Removed patch ids in ascending-noise order, the noise drawn from the sample's seed."""
    noise = torch.rand(num_patches, generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(num_patches), key=lambda i: noise[i])
    return order[int(num_patches * (1 - mask_ratio)) :]


def loop_mae_loss(
    images: torch.Tensor, pred_masked: torch.Tensor, masked_ids: list[list[int]], p: int, norm_pix: bool
) -> float:
    """Sum of per-patch MSEs over removed patches divided by their number."""
    patches = loop_patches(images, p)
    total, count = 0.0, 0
    for b, ids in enumerate(masked_ids):
        for row, pid in enumerate(ids):
            target = loop_normalise(patches[b][pid]) if norm_pix else patches[b][pid]
            pred = pred_masked[b][row].tolist()
            total += sum((x - y) ** 2 for x, y in zip(pred, target)) / len(target)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_loops(norm_pix: bool) -> None:
    g = torch.Generator().manual_seed(1)
    p, C = 2, 3
    images = torch.randn(2, C, 4, 6, generator=g)  # 2 x 3 patches of 2 x 2 x 3 values
    masked_ids = [[4, 0, 5], [1, 2, 3]]
    ids = torch.tensor(masked_ids)
    pred = torch.randn(2, 3, p * p * C, generator=g)
    got = mae_loss(pred, gather_tokens(patchify(images, p), ids), norm_pix)
    want = loop_mae_loss(images, pred, masked_ids, p, norm_pix)
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_forward_loss_matches_independent_formulation(norm_pix: bool) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(MAEConfig.tiny(), norm_pix_loss=norm_pix)
    model = build_method(cfg).eval()
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    seeds = [7, 11]
    captured = {}
    model.decoder.register_forward_hook(lambda module, args, out: captured.setdefault("pred", out))
    loss = model({"image": images, "seed": torch.tensor(seeds)})["loss"]
    masked_ids = [loop_masked_ids(s, cfg.num_patches, cfg.mask_ratio) for s in seeds]
    want = loop_mae_loss(images, captured["pred"].detach(), masked_ids, cfg.patch_size, norm_pix)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_masks_do_not_depend_on_batch_split() -> None:
    torch.manual_seed(0)
    model = MAE(MAEConfig.tiny()).eval()
    images = torch.randn(4, 3, 32, 32)
    seeds = torch.tensor([3, 1, 4, 1_000_000_007])
    full = {"image": images, "seed": seeds}
    halves = [{"image": images[i : i + 2], "seed": seeds[i : i + 2]} for i in (0, 2)]
    whole = model.mask(full)
    parts = [model.mask(h) for h in halves]
    for field in whole._fields:
        assert torch.equal(getattr(whole, field), torch.cat([getattr(m, field) for m in parts])), field
    with torch.no_grad():
        loss_full = model(full)["loss"]
        loss_halves = torch.stack([model(h)["loss"] for h in halves]).mean()
    torch.testing.assert_close(loss_full, loss_halves)
    # Same seed, same mask; different seeds, different masks.
    assert torch.equal(model.mask(full).ids_keep, whole.ids_keep)
    assert not torch.equal(whole.mask[0], whole.mask[1])


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


def test_tiny_flavour_is_micro() -> None:
    cfg = MAEConfig.tiny()
    assert cfg.size == "micro" and cfg.vit.embed_dim == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 30, "patch_size": 8}, "not divisible by patch_size"),
        ({"mask_ratio": 0.0}, r"mask_ratio must be in \(0, 1\)"),
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \(0, 1\)"),
        ({"mask_ratio": 0.99, "img_size": 32, "patch_size": 8}, "both must be at least 1"),
        ({"size": "giant"}, "known presets: micro, tiny, small, base, large, huge"),
        ({"patch_size": 0}, "patch_size must be positive"),
        ({"decoder_num_heads": 5}, "not divisible by decoder_num_heads"),
        ({"decoder_dim": 0}, "must be positive"),
        ({"drop_path": 1.0}, r"drop_path must be in \[0, 1\)"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be positive"),
        ({"img_size": 0}, "img_size must be positive"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MAEConfig(**kwargs)
