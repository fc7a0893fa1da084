"""The fine-tuning/probe ViT: token reduction per stage, official MAE weights, regression heads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from launcher.methods import build_method
from launcher.methods.classifier import ClassifierConfig, LinearProbeConfig, ViTClassifier
from launcher.methods.pretrained import load_pretrained

TINY = {"size": "micro", "img_size": 32, "patch_size": 8}


def block_input_lengths(model: ViTClassifier, images: torch.Tensor) -> list[int]:
    lengths: list[int] = []
    hooks = [
        block.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
        for block in model.encoder.blocks
    ]
    model.eval()
    with torch.no_grad():
        model.predict(images)
    for hook in hooks:
        hook.remove()
    return lengths


def timm_vit(global_pool: str, num_classes: int = 5) -> VisionTransformer:
    """The architecture of MAE's models_vit (timm's VisionTransformer) at the tiny size."""
    torch.manual_seed(1)
    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=num_classes,
        global_pool=global_pool,
        fc_norm=global_pool == "avg",
        qkv_bias=True,
    )
    for p in model.parameters():  # non-trivial values everywhere, positions included
        nn.init.normal_(p, std=0.2)
    return model


def test_token_counts_per_stage_vit_b16() -> None:
    cfg = ClassifierConfig(keep_ratio=0.7, num_classes=10)
    assert cfg.resolved_drop_positions == (0, 4, 8)
    assert cfg.token_counts == (196, 137, 95, 66)
    torch.manual_seed(0)
    lengths = block_input_lengths(build_method(cfg), torch.randn(1, 3, 224, 224))
    # cls + patches: block 0 sees all, then three stages of reduced sequences
    assert lengths == [197] + [138] * 4 + [96] * 4 + [67] * 3


def test_no_reduction_at_keep_ratio_one_and_explicit_positions() -> None:
    lengths = block_input_lengths(build_method(ClassifierConfig(**TINY, num_classes=3)), torch.randn(2, 3, 32, 32))
    assert lengths == [17, 17, 17]
    cfg = ClassifierConfig(**TINY, num_classes=3, keep_ratio=0.5, num_drop_stages=1, drop_positions=[1])
    assert block_input_lengths(build_method(cfg), torch.randn(2, 3, 32, 32)) == [17, 17, 9]


def test_an_official_mae_finetuned_checkpoint_gives_the_same_predictions(tmp_path: Path) -> None:
    reference = timm_vit("avg").eval()
    path = tmp_path / "mae_finetuned_vit_micro.pth"
    # The MAE scripts save the argparse namespace with the weights.
    torch.save({"model": reference.state_dict(), "epoch": 99, "args": argparse.Namespace(model="vit")}, path)
    pretrained = load_pretrained(path)
    assert pretrained.source == "official MAE" and pretrained.head is not None
    model = ViTClassifier(ClassifierConfig(**TINY, num_classes=5, pretrained=str(path), drop_path=0.0)).eval()
    model.initialize()  # the trainer does this for a run without a checkpoint
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(images), reference(images), rtol=1e-5, atol=1e-5)


def test_an_official_mae_pretrained_checkpoint_with_cls_pooling(tmp_path: Path) -> None:
    reference = timm_vit("token").eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    state.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32)})  # ignored
    path = tmp_path / "mae_pretrain_vit_micro.pth"
    torch.save({"model": state}, path)
    cfg = LinearProbeConfig(**TINY, num_classes=5, pretrained=str(path), head_batchnorm=False)
    model = ViTClassifier(cfg).eval()
    model.initialize()
    with torch.no_grad():
        images = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(
            model.features(images), reference.forward_head(reference.forward_features(images), pre_logits=True)
        )
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_pretrained_weights_of_another_size_fail_clearly(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"model": timm_vit("avg").state_dict()}, path)
    with pytest.raises(ValueError, match="width 32, depth 3.*set method.size"):
        ViTClassifier(
            ClassifierConfig(size="tiny", img_size=32, patch_size=8, num_classes=5, pretrained=str(path))
        ).initialize()
    with pytest.raises(ValueError, match="no EMA teacher"):
        load_pretrained(path, "teacher")


def test_regression_head_learns_standardised_targets_and_predicts_in_label_units() -> None:
    cfg = LinearProbeConfig(
        **TINY, task="regression", targets=(0, 1), target_mean=(0.5, -1.0), target_std=(2.0, 0.5), pool="grid"
    )
    model = build_method(cfg).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.randn(4, 8)
    with torch.no_grad():
        raw = model.head_outputs(images)
        torch.testing.assert_close(model.predict(images), raw * torch.tensor([2.0, 0.5]) + torch.tensor([0.5, -1.0]))
        loss = model({"image": images, "label": labels})["loss"]
        standardised = (labels[:, :2] - torch.tensor([0.5, -1.0])) / torch.tensor([2.0, 0.5])
        torch.testing.assert_close(loss, ((raw - standardised) ** 2).mean())
    with pytest.raises(ValueError, match="target_std needs one value per target column"):
        LinearProbeConfig(**TINY, task="regression", targets=(0, 1), target_std=(1.0,))


def test_pool_grid_0_is_one_cell_per_patch_at_any_image_size() -> None:
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    per_patch = build_method(ClassifierConfig(**TINY, num_classes=3, pool="grid", pool_grid=0)).eval()
    torch.manual_seed(0)
    four = build_method(ClassifierConfig(**TINY, num_classes=3, pool="grid", pool_grid=4)).eval()  # 4 x 4 patches
    encoder = per_patch.encoder
    with torch.no_grad():
        features = per_patch.features(images)
        torch.testing.assert_close(features, four.features(images))
        tokens = encoder.forward_tokens(encoder.prepend_cls(encoder.patch_embed(images)) + per_patch.pos_embed)
    assert features.shape == (2, 16 * encoder.embed_dim)
    torch.testing.assert_close(features, tokens[:, encoder.num_prefix_tokens :].flatten(1))
    with pytest.raises(ValueError, match="must divide the 4 patches per side"):
        ClassifierConfig(**TINY, pool="grid", pool_grid=3)


def test_moments_pooling_reads_the_kept_tokens_with_their_positions() -> None:
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    model = build_method(ClassifierConfig(**TINY, num_classes=3, pool="moments")).eval()
    encoder = model.encoder
    with torch.no_grad():
        features = model.features(images)
        tokens = encoder.forward_tokens(encoder.prepend_cls(encoder.patch_embed(images)) + model.pos_embed)
    patches = tokens[:, encoder.num_prefix_tokens :]  # 4 x 4 patches
    column = torch.linspace(-1, 1, 4).repeat(4)
    expected = torch.cat([patches.mean(1), (patches * column[:, None]).mean(1)], dim=1)
    assert features.shape == (2, 3 * encoder.embed_dim) and model.head.in_features == 3 * encoder.embed_dim
    torch.testing.assert_close(features[:, : 2 * encoder.embed_dim], expected)
    torch.manual_seed(0)
    reduced = build_method(ClassifierConfig(**TINY, num_classes=3, pool="moments", keep_ratio=0.5)).eval()
    with torch.no_grad():
        assert reduced.features(images).shape == features.shape  # the same head, whatever was dropped
