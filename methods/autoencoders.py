"""Perceptual and feature-prediction autoencoders: the six procedures of Pihlgren et al.

"Improving image autoencoder embeddings with perceptual loss" (IJCNN 2020) and "Pretraining
image encoders without reconstruction via feature prediction loss" (ICPR 2020) compare six
ways to train a small convolutional (V)AE. A procedure is named *input - output - loss*:
I = image, F = features Φ(x) of a frozen loss network; PW = pixel-wise MSE(x̂, x),
PS = perceptual-similarity MSE(Φ(x̂), Φ(x)), FP = feature-prediction MSE(decoder output, Φ(x)).

==========  ===========  ===========  ==============================
method      encodes      decodes      loss
==========  ===========  ===========  ==============================
ae_iipw     image        image        MSE(x̂, x)
ae_iips     image        image        MSE(Φ(x̂), Φ(x))
ae_iffp     image        Φ-vector     MSE(decoder output, Φ(x))   (the ICPR proposal)
ae_fipw     Φ(x)         image        MSE(x̂, x)
ae_fips     Φ(x)         image        MSE(Φ(x̂), Φ(x))
ae_fffp     Φ(x)         Φ-vector     MSE(decoder output, Φ(x))
==========  ===========  ===========  ==============================

The embedding is μ; for F-* procedures it is
computed from Φ(x). With ``gamma > 0`` the model is a VAE: z is sampled by
reparameterisation and γ·KL is added, KL = -mean(1 + logσ² - μ² - σ²) over batch and latent
dimensions (no ½, as in the reference). With ``gamma = 0`` it is a plain autoencoder: z = μ.

Φ(x) is computed once per batch, without a graph (the loss network is frozen), and serves as
both encoder input and target. Only PS needs a graph through the loss network, and only
with respect to its input x̂. I-I-PW builds no loss network at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss_networks import LossNetwork, build_loss_network, check_loss_network_name
from .registry import MethodConfig, register_method
from .seeding import per_sample_noise


@dataclass(frozen=True)
class Procedure:
    """What a procedure encodes, what it decodes, and what its loss compares."""

    encodes: Literal["image", "features"]
    decodes: Literal["image", "features"]
    loss: Literal["pw", "ps", "fp"]

    @property
    def uses_loss_network(self) -> bool:
        return self.encodes == "features" or self.loss != "pw"

    @property
    def label(self) -> str:
        """The papers' name: input - output - loss, e.g. ``I-F-FP``."""
        return f"{self.encodes[0].upper()}-{self.decodes[0].upper()}-{self.loss.upper()}"


PROCEDURES: dict[str, Procedure] = {
    "ae_iipw": Procedure("image", "image", "pw"),
    "ae_iips": Procedure("image", "image", "ps"),
    "ae_iffp": Procedure("image", "features", "fp"),
    "ae_fipw": Procedure("features", "image", "pw"),
    "ae_fips": Procedure("features", "image", "ps"),
    "ae_fffp": Procedure("features", "features", "fp"),
}

MAX_FEATURE_HIDDEN = 2048  # the reference's cap on the feature MLPs' hidden width


# ----------------------------------------------------------------------------- config


@dataclass
class AutoencoderConfig(MethodConfig):
    """One config for all six procedures; the procedure is the method ``name``.

    The defaults are the papers' architecture. Images are 64 + 16n pixels square: the
    image encoder is 4 x (Conv2d k4 s2, no padding, BatchNorm, ReLU) with
    ``encoder_channels``; the image decoder is Linear(z -> C0·g²) + ReLU with
    g = (img_size - 64) / 16 + 1, then 4 x ConvTranspose2d (kernels 5, 5, 6, 6, stride 2)
    C0 -> C1 -> C2 -> C3 -> in_chans, BatchNorm + ReLU after the first three and a sigmoid
    last, where ``decoder_channels`` = (C0, C1, C2, C3). Feature encoder: Linear(|Φ| -> H) +
    ReLU; feature decoder: Linear(z -> H) + ReLU + Linear(H -> |Φ|), linear output;
    H = ``feature_hidden``, or min(|Φ| // 2, 2048) when None.

    Images should arrive in [0, 1] (data mean 0, std 1): the image decoder ends in a sigmoid
    and the loss network normalises its input itself. I-I-PW builds no loss network, so it
    ignores the ``loss_network*`` fields.
    """

    img_size: int = 64
    in_chans: int = 3
    z: int = 64
    gamma: float = 0.0
    loss_network: str = "efficientnet_lite0"
    loss_network_weights: str | None = None
    loss_network_sigmoid: bool = True
    encoder_channels: tuple[int, ...] = (32, 64, 128, 256)
    decoder_channels: tuple[int, ...] = (1024, 128, 64, 32)
    feature_hidden: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in PROCEDURES:
            raise ValueError(f"unknown autoencoder procedure {self.name!r}; known: {', '.join(PROCEDURES)}")
        if self.img_size < 64 or (self.img_size - 64) % 16 != 0:
            raise ValueError(
                f"img_size must be 64 + 16n (64, 80, 96, ...) for the autoencoders' conv stacks, got {self.img_size}"
            )
        if self.z <= 0:
            raise ValueError(f"z (the latent size) must be positive, got {self.z}")
        if self.gamma < 0:
            raise ValueError(f"gamma (the KL weight) must be >= 0 (0 = plain autoencoder), got {self.gamma}")
        check_loss_network_name(self.loss_network)
        if self.loss_network_weights is not None and not self.loss_network_weights:
            raise ValueError("loss_network_weights must be a file path or null, got an empty string")
        if self.procedure.uses_loss_network and self.in_chans != 3:
            raise ValueError(
                f"{self.name} passes images through an ImageNet loss network, which takes 3 channels; "
                f"got in_chans {self.in_chans}"
            )
        for field in ("encoder_channels", "decoder_channels"):
            channels = getattr(self, field)
            if len(channels) != 4 or min(channels) <= 0:
                raise ValueError(f"{field} must be 4 positive channel counts (the 4-layer design), got {channels}")
        if self.feature_hidden is not None and self.feature_hidden <= 0:
            raise ValueError(f"feature_hidden must be positive or null (min(|Φ|/2, 2048)), got {self.feature_hidden}")

    @property
    def procedure(self) -> Procedure:
        return PROCEDURES[self.name]

    @property
    def variational(self) -> bool:
        return self.gamma > 0

    @classmethod
    def tiny(cls, **fields) -> AutoencoderConfig:
        """64 px with narrow layers and a small latent, but the real (offline) loss network."""
        tiny = dict(z=8, encoder_channels=(8, 8, 16, 16), decoder_channels=(32, 16, 8, 8), feature_hidden=32)
        return cls(**{**tiny, **fields})


# ----------------------------------------------------------------------------- parts


def conv_out_size(size: int, layers: int = 4) -> int:
    """Spatial size after ``layers`` unpadded kernel-4 stride-2 convolutions."""
    for _ in range(layers):
        size = (size - 4) // 2 + 1
    return size


class ImageEncoder(nn.Sequential):
    """4 x (Conv2d k4 s2 no padding, BatchNorm, ReLU), flattened: ``[B, C, S, S]`` -> ``[B, out_dim]``."""

    def __init__(self, in_chans: int, channels: tuple[int, ...], img_size: int) -> None:
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_chans, *channels[:-1]), channels):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Flatten())
        self.out_dim = channels[-1] * conv_out_size(img_size) ** 2


class ImageDecoder(nn.Module):
    """Linear + ReLU to ``C0 x g x g``, then 4 transposed convs (k 5, 5, 6, 6, s2) up to the image size."""

    def __init__(self, z: int, channels: tuple[int, ...], out_chans: int, img_size: int) -> None:
        super().__init__()
        self.grid = (img_size - 64) // 16 + 1
        self.width = channels[0]
        self.dense = nn.Linear(z, self.width * self.grid**2)
        layers: list[nn.Module] = []
        for i, (c_in, c_out, kernel) in enumerate(zip(channels, (*channels[1:], out_chans), (5, 5, 6, 6))):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=kernel, stride=2))
            layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)] if i < 3 else [nn.Sigmoid()]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        x = F.relu(self.dense(z)).view(z.shape[0], self.width, self.grid, self.grid)
        return self.deconv(x)


def normal_from_seeds(seeds: Tensor, n: int, device: torch.device | str) -> Tensor:
    """Standard normal noise ``[B, n]`` where row ``i`` depends only on ``seeds[i]``."""
    return per_sample_noise(seeds, n, device, "normal")


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """The reference's KL to N(0, I): mean over batch and latent dims, without the ½ factor."""
    mu, logvar = mu.float(), logvar.float()
    return -(1 + logvar - mu.square() - logvar.exp()).mean()


# ----------------------------------------------------------------------------- method


class Autoencoder(nn.Module):
    """A (variational) autoencoder trained by one of the six procedures (``cfg.name``).

    The loss network is a frozen submodule that keeps itself in eval mode (its ``train()``
    is a no-op), so putting this module in train mode leaves it alone.
    """

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        proc = self.procedure = cfg.procedure
        self.loss_network: LossNetwork | None = None
        feature_dim = hidden = 0
        if proc.uses_loss_network:
            self.loss_network = build_loss_network(cfg.loss_network, cfg.loss_network_weights, cfg.loss_network_sigmoid)
            feature_dim = self.loss_network.feature_dim(cfg.img_size)
            hidden = cfg.feature_hidden or min(feature_dim // 2, MAX_FEATURE_HIDDEN)
        self.feature_dim = feature_dim

        if proc.encodes == "image":
            self.encoder: nn.Module = ImageEncoder(cfg.in_chans, cfg.encoder_channels, cfg.img_size)
            encoded = self.encoder.out_dim
        else:
            self.encoder = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True))
            encoded = hidden
        self.mu = nn.Linear(encoded, cfg.z)
        # Only a VAE samples, so only a VAE has (and trains) a log-variance head.
        self.logvar = nn.Linear(encoded, cfg.z) if cfg.variational else None

        if proc.decodes == "image":
            self.decoder: nn.Module = ImageDecoder(cfg.z, cfg.decoder_channels, cfg.in_chans, cfg.img_size)
        else:
            self.decoder = nn.Sequential(
                nn.Linear(cfg.z, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, feature_dim)
            )
        self.embed_dim = cfg.z

    def features(self, images: Tensor) -> Tensor:
        """Φ(images) ``[B, |Φ|]`` as a constant: no graph through the frozen loss network."""
        assert self.loss_network is not None
        with torch.no_grad():
            return self.loss_network(images)

    def encode(self, source: Tensor) -> tuple[Tensor, Tensor | None]:
        """μ and (for a VAE) logσ² from the encoder's input (images, or Φ(x) for F-* procedures)."""
        h = self.encoder(source)
        return self.mu(h), (self.logvar(h) if self.logvar is not None else None)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]
        proc = self.procedure
        # Φ(x) once per batch: the F-* encoder input and the PS/FP target alike.
        target_features = self.features(images) if self.loss_network is not None else None
        mu, logvar = self.encode(target_features if proc.encodes == "features" else images)
        z = mu
        if logvar is not None:
            if "seed" in batch:
                noise = normal_from_seeds(batch["seed"], mu.shape[1], mu.device)
            else:
                noise = torch.randn(mu.shape, device=mu.device)
            z = mu + noise * (0.5 * logvar).exp()
        out = self.decoder(z)

        if proc.loss == "pw":
            rec = F.mse_loss(out.float(), images.float())
        elif proc.loss == "ps":
            # The graph runs through the frozen network to x̂ only: its weights need no gradient.
            rec = F.mse_loss(self.loss_network(out).float(), target_features.float())
        else:
            rec = F.mse_loss(out.float(), target_features.float())
        metrics = {"rec_loss": rec.detach()}
        loss = rec
        if logvar is not None:
            kl = kl_divergence(mu, logvar)
            loss = rec + self.cfg.gamma * kl
            metrics["kl"] = kl.detach()
        return {"loss": loss, **metrics}

    def reconstruct(self, images: Tensor) -> Tensor:
        """The decoder's output for z = μ: an image ``[B, C, S, S]`` or a Φ-vector ``[B, |Φ|]``."""
        return self.decoder(self.embed(images))

    def embed(self, images: Tensor) -> Tensor:
        """The embedding μ ``[B, z]`` (for F-* procedures, of Φ(images))."""
        return self.encode(self.features(images) if self.procedure.encodes == "features" else images)[0]


for _name in PROCEDURES:  # one method per procedure, all built from AutoencoderConfig
    register_method(_name, config=AutoencoderConfig)(Autoencoder)
