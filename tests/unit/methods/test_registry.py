"""Every registered method's tiny flavour trains on CPU: finite loss, gradients where they belong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.methods import MethodConfig, build_method, get_method, method_names


def make_batch(cfg: MethodConfig, batch_size: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
    labels = torch.arange(batch_size) % 2  # class labels, for the classifiers
    return {"image": images, "label": labels, "seed": torch.arange(batch_size, dtype=torch.int64) + 100}


def build_tiny(name: str) -> tuple[nn.Module, MethodConfig]:
    torch.manual_seed(0)
    cfg = get_method(name).tiny()
    assert cfg.name == name
    return build_method(cfg), cfg


def test_registry_has_mae_and_pcae() -> None:
    assert {"mae", "pcae"} <= set(method_names())


@pytest.mark.parametrize("name", method_names())
def test_forward_backward(name: str) -> None:
    model, cfg = build_tiny(name)
    model.train()
    out = model(make_batch(cfg))
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    for key, value in out.items():
        assert value.ndim == 0, key
        if key != "loss":
            assert not value.requires_grad, f"{key} should be detached"
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    nonfinite = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not nonfinite, nonfinite
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad


@pytest.mark.parametrize("name", method_names())
def test_forward_without_seed(name: str) -> None:
    model, cfg = build_tiny(name)
    batch = make_batch(cfg)
    del batch["seed"]
    assert torch.isfinite(model(batch)["loss"])


@pytest.mark.parametrize("name", method_names())
def test_embed_shape(name: str) -> None:
    model, cfg = build_tiny(name)
    model.eval()
    batch = make_batch(cfg, batch_size=3)
    with torch.no_grad():
        z = model.embed(batch["image"])
    width = cfg.z if hasattr(cfg, "z") else cfg.vit.embed_dim  # autoencoders embed with μ
    assert z.shape == (3, width)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("name", method_names())
def test_on_step_end_is_optional_and_callable(name: str) -> None:
    model, _ = build_tiny(name)
    hook = getattr(model, "on_step_end", None)
    if hook is not None:
        hook(1, 10)
