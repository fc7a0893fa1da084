"""MAE maths against independent formulations, seed-driven masking, config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from launcher.methods import build_method
from launcher.methods.mae import MAE, MAEConfig, mae_loss
from launcher.methods.vit import (
    gather_tokens,
    patchify,
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
        ({"size": "giant"}, "known presets: micro, mini, tiny, small, base, large, huge"),
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
