"""The six perceptual / feature-prediction autoencoder procedures train on CPU and fail clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.methods import UnknownMethodError, build_method, get_method
from launcher.methods.autoencoders import (
    PROCEDURES,
    AutoencoderConfig,
    ImageDecoder,
    ImageEncoder,
    normal_from_seeds,
)
from launcher.methods.loss_networks import LossNetworkUnavailable

NAMES = list(PROCEDURES)


def make_batch(img_size: int = 64, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, img_size, img_size, generator=generator)  # data mean 0, std 1
    return {"image": images, "seed": torch.arange(batch_size, dtype=torch.int64) + 100}


def build(name: str, **overrides: object) -> tuple[nn.Module, AutoencoderConfig]:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_method(name).tiny(), **overrides)
    return build_method(cfg), cfg


def test_registered() -> None:
    for name in NAMES:
        assert get_method(name).make_config().name == name


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step(name: str) -> None:
    # A VAE, so the log-variance head trains too; test_methods covers the plain tiny flavours.
    gamma = 0.5
    model, cfg = build(name, gamma=gamma)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert bool(frozen) == cfg.procedure.uses_loss_network
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(make_batch())
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    assert ("kl" in out) == (gamma > 0)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    if model.loss_network is not None:
        assert not any(m.training for m in model.loss_network.modules())


@pytest.mark.parametrize("name", ["ae_fips", "ae_iffp"])  # between them: every encoder and decoder
def test_output_shapes_at_96(name: str) -> None:
    model, cfg = build(name, img_size=96)
    model.eval()
    images = make_batch(96, batch_size=3)["image"]
    with torch.no_grad():
        out = model.reconstruct(images)
        z = model.embed(images)
    expected = (3, 3, 96, 96) if cfg.procedure.decodes == "image" else (3, model.loss_network.feature_dim(96))
    assert out.shape == expected
    assert z.shape == (3, cfg.z)


@pytest.mark.parametrize("img_size", [64, 80, 96])
def test_paper_architecture_sizes(img_size: int) -> None:
    cfg = AutoencoderConfig(name="ae_iipw", img_size=img_size)
    encoder = ImageEncoder(3, cfg.encoder_channels, img_size)
    decoder = ImageDecoder(cfg.z, cfg.decoder_channels, 3, img_size)
    side = {64: 2, 80: 3, 96: 4}[img_size]
    assert encoder.out_dim == 256 * side**2
    assert encoder(torch.rand(2, 3, img_size, img_size)).shape == (2, encoder.out_dim)
    g = (img_size - 64) // 16 + 1
    sizes, x = [g], decoder.dense(torch.rand(2, cfg.z)).view(2, 1024, g, g)
    for layer in decoder.deconv:
        x = layer(x)
        if isinstance(layer, nn.ConvTranspose2d):
            sizes.append(x.shape[-1])
    assert sizes == [g, 2 * g + 3, 4 * g + 9, 8 * g + 22, img_size]  # 1-5-13-30-64 at 64 px
    assert isinstance(decoder.deconv[-1], nn.Sigmoid)


def test_feature_mlp_width_is_half_phi_capped() -> None:
    model = build_method(get_method("ae_fffp").make_config())  # default widths, efficientnet_lite0
    assert model.feature_dim == 2560
    assert model.encoder[0].out_features == 1280 and model.decoder[0].out_features == 1280
    assert model.decoder[-1].out_features == 2560


def test_kl_term_and_seeded_noise() -> None:
    gamma = 0.5
    model, cfg = build("ae_iffp", gamma=gamma)
    model.train()
    batch = make_batch(batch_size=3)
    first, second = model(batch), model(batch)
    assert torch.equal(first["loss"], second["loss"])  # same seeds, same noise
    torch.testing.assert_close(first["loss"], first["rec_loss"] + gamma * first["kl"])
    other = model({**batch, "seed": batch["seed"] + 1})
    assert not torch.equal(other["loss"], first["loss"])
    # Independent formulation: the reference's KL is twice the analytic KL to N(0, I), averaged.
    with torch.no_grad():
        mu, logvar = model.encode(batch["image"])
        analytic = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
        )
    torch.testing.assert_close(first["kl"], 2 * analytic.mean())


def test_noise_rows_depend_only_on_their_seed() -> None:
    seeds = torch.tensor([5, 6, 7])
    whole = normal_from_seeds(seeds, 4, "cpu")
    torch.testing.assert_close(whole[1:], normal_from_seeds(seeds[1:], 4, "cpu"))
    assert not torch.equal(whole[0], whole[1])


def test_plain_autoencoder_has_no_logvar_head() -> None:
    model, _ = build("ae_iipw")
    assert model.logvar is None and model.loss_network is None
    model.eval()
    images = make_batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(model.embed(images), model.encode(images)[0])


def test_feature_procedures_embed_phi() -> None:
    model, _ = build("ae_fipw")
    model.eval()
    images = make_batch()["image"]
    with torch.no_grad():
        expected = model.mu(model.encoder(model.loss_network(images)))
        torch.testing.assert_close(model.embed(images), expected)


def test_unknown_procedure() -> None:
    with pytest.raises(UnknownMethodError, match="ae_iffp"):
        get_method("ae_iifp")
    with pytest.raises(ValueError, match="ae_iipw, ae_iips"):
        AutoencoderConfig(name="ae_nope")


@pytest.mark.parametrize("img_size", [32, 72, 100])
def test_img_size_must_be_64_plus_16n(img_size: int) -> None:
    with pytest.raises(ValueError, match=r"64 \+ 16n"):
        get_method("ae_iffp").make_config(img_size=img_size)


def test_unknown_loss_network_lists_known() -> None:
    with pytest.raises(ValueError, match="alexnet, efficientnet_lite0"):
        get_method("ae_iips").make_config(loss_network="vgg16")


def test_bad_fields() -> None:
    config = get_method("ae_iips").make_config
    for bad in (
        dict(z=0),
        dict(gamma=-0.1),
        dict(in_chans=1),
        dict(encoder_channels=(8, 8)),
        dict(feature_hidden=0),
        dict(loss_network_weights=""),
    ):
        with pytest.raises(ValueError):
            config(**bad)
    get_method("ae_iipw").make_config(in_chans=1)  # no loss network, so any channel count


def test_alexnet_weights_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = get_method("ae_iips").make_config(loss_network="alexnet")
    with pytest.raises(LossNetworkUnavailable, match="alexnet-owt-7be5be79.pth"):
        build_method(cfg)
    build_method(get_method("ae_iipw").make_config(loss_network="alexnet"))  # I-I-PW needs no loss network


def test_perceptual_step_under_autocast() -> None:
    model, _ = build("ae_iips")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(make_batch())["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.loss_network.parameters())
