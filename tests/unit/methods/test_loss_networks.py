"""Frozen loss networks: AlexNet, EfficientNet-Lite0 from its package, generic cuts."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from launcher.methods.loss_networks import (
    LossNetworkUnavailable,
    build_loss_network,
    check_loss_network_name,
    efficientnet_lite0,
    efficientnet_lite0_weights_file,
    load_state_dict_file,
)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return build_loss_network("efficientnet_lite0")


def test_efficientnet_lite0_package_weights_map_onto_timm() -> None:
    packaged = load_state_dict_file(efficientnet_lite0_weights_file())
    expected = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(packaged) == len(expected) == 296
    assert [t.shape for t in packaged.values()] == [t.shape for t in expected.values()]
    loaded = efficientnet_lite0().state_dict()
    for (key, want), got in zip(packaged.items(), loaded.values()):
        assert torch.equal(want, got), key


def test_efficientnet_lite0_is_frozen_and_stays_in_eval(lite0: nn.Module) -> None:
    assert all(not p.requires_grad for p in lite0.parameters())
    parent = nn.Sequential(nn.Linear(2, 2), lite0)
    parent.train()
    assert parent[0].training and not lite0.training
    assert not any(m.training for m in lite0.modules())


def test_efficientnet_lite0_shapes_and_sigmoid(lite0: nn.Module) -> None:
    assert lite0.output_shape(64) == (40, 8, 8) and lite0.feature_dim(64) == 2560
    assert lite0.output_shape(96) == (40, 12, 12) and lite0.feature_dim(96) == 5760
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = lite0(images)
    assert features.shape == (2, 2560)
    assert features.min() >= 0 and features.max() <= 1  # blocks.2 is a linear bottleneck: it saturates


def test_efficientnet_lite0_folded_batchnorm_matches_timm(lite0: nn.Module) -> None:
    # Independent formulation: timm's own (unfolded) modules up to blocks.2, mean = std = 0.5.
    model = efficientnet_lite0()
    reference = nn.Sequential(model.conv_stem, model.bn1, model.blocks[:3])
    images = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        expected = reference((images - 0.5) / 0.5).sigmoid().flatten(1)
        torch.testing.assert_close(lite0(images), expected, atol=1e-4, rtol=1e-4)


def test_cut_layer_and_sigmoid_switch() -> None:
    net = build_loss_network("efficientnet_lite0:blocks.1", sigmoid=False)
    assert net.output_shape(64) == (24, 16, 16)
    with torch.no_grad():
        assert net(torch.rand(1, 3, 64, 64)).min() < 0  # no sigmoid: signed features
    with pytest.raises(ValueError, match="blocks.6"):
        build_loss_network("efficientnet_lite0:blocks.9")


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="alexnet, efficientnet_lite0"):
        build_loss_network("vgg_perceptual")
    for bad in ("timm:resnet18", "alexnet:features.4:x", "efficientnet_lite0:"):
        with pytest.raises(ValueError, match="unknown loss network"):
            check_loss_network_name(bad)


def test_alexnet_missing_weights_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(LossNetworkUnavailable) as info:
        build_loss_network("alexnet")
    message = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "efficientnet_lite0" in message
    with pytest.raises(LossNetworkUnavailable, match="does-not-exist.pth"):
        build_loss_network("alexnet", weights=str(tmp_path / "does-not-exist.pth"))


def test_alexnet_from_torchvision_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    features = alexnet(weights=None).features  # stands in for the ImageNet file: same format
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, cache / "alexnet-owt-7be5be79.pth")
    net = build_loss_network("alexnet")
    assert not net.normalize and net.sigmoid  # the paper's Φ: raw [0, 1] input, sigmoid on
    assert net.output_shape(64) == (192, 7, 7) and net.feature_dim(96) == 192 * 11 * 11
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(images), features[:5](images).sigmoid().flatten(1))


@pytest.mark.parametrize(
    ("spec", "shape"), [("timm:resnet18:layer2", (128, 8, 8)), ("torchvision:resnet18:layer1", (64, 16, 16))]
)
def test_generic_backbones(spec: str, shape: tuple[int, int, int]) -> None:
    net = build_loss_network(spec)
    assert net.output_shape(64) == shape
    assert net.normalize and not any(p.requires_grad for p in net.parameters())


def test_generic_unknown_layer_lists_layers() -> None:
    with pytest.raises(ValueError, match="layer2"):
        build_loss_network("timm:resnet18:block9")


def test_autocast_uses_a_precast_copy_with_autocast_results(lite0: nn.Module) -> None:
    keys = set(lite0.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = lite0(images)
        expected = lite0.body(torch.addcmul(lite0.shift, images, lite0.scale)).sigmoid().flatten(1)
    assert features.dtype == torch.bfloat16
    torch.testing.assert_close(features, expected)
    assert all(p.dtype == torch.float32 for p in lite0.parameters())  # the copy is not a submodule
    assert set(lite0.state_dict()) == keys and lite0._cast_body is not None
    lite0.load_state_dict(lite0.state_dict())
    assert lite0._cast_body is None  # new weights: the copy is made again
