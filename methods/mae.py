"""MAE: masked autoencoders that reconstruct the pixels of randomly masked patches (He et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .protocol import EncoderChoice
from .registry import register_method
from .vit import MaskedViTConfig, Masking, batch_noise, gather_tokens, patchify, random_masking, strip_prefix


@dataclass(kw_only=True)
class MAEConfig(MaskedViTConfig):
    """MAE with a ViT encoder; defaults are the reference ViT-B/16 recipe (8 x 512 decoder)."""

    name: str = "mae"
    norm_pix_loss: bool = True


def mae_loss(pred: Tensor, target_patches: Tensor, norm_pix_loss: bool) -> Tensor:
    """Mean per-patch MSE between predictions and pixel patches ``[B, m, p*p*C]`` of the removed patches.

    With ``norm_pix_loss`` each target patch is standardised by its own mean and (unbiased)
    variance first, as in the reference. Computed in fp32.
    """
    # In fp32 whatever the autocast dtype of the decoder: bf16 targets would round the pixels.
    pred, target = pred.float(), target_patches.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    # Every sample removes the same number of patches, so the mean over all elements is the
    # mean over removed patches of the per-patch MSE.
    return (pred - target).square().mean()


@register_method("mae", config=MAEConfig)
class MAE(nn.Module):
    """Encode the visible patches (+ cls), decode the removed ones, regress their pixels."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = cfg.build_encoder()
        self.decoder = cfg.build_decoder(out_dim=cfg.patch_size**2 * cfg.in_chans)

    def mask(self, batch: dict[str, Tensor]) -> Masking:
        """The masking this batch gets (a function of ``batch["seed"]`` when present)."""
        num_patches = self.encoder.num_patches
        return random_masking(num_patches, self.cfg.mask_ratio, batch_noise(batch, num_patches))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]
        masking = self.mask(batch)
        latent = self.encoder(images, masking.ids_keep)
        pred = self.decoder(latent, masking.ids_keep, masking.ids_masked)
        target = gather_tokens(patchify(images, self.cfg.patch_size), masking.ids_masked)
        return {"loss": mae_loss(pred, target, self.cfg.norm_pix_loss)}

    @staticmethod
    def encoder_state(state: dict[str, Tensor], which: EncoderChoice = "student") -> dict[str, Tensor]:
        """The encoder's weights (``encoder.*``) of an MAE checkpoint."""
        if which == "teacher":
            raise ValueError("this is an MAE checkpoint, which has no EMA teacher; take the student (the encoder)")
        return strip_prefix(state, "encoder.")

    def patch_tokens(self, images: Tensor, depth: int | None = None) -> Tensor:
        """The encoder's normalised patch tokens for all patches, in grid order ``[B, N, D]``
        (after its first ``depth`` blocks: an inner layer for a probe)."""
        return self.encoder(images, depth=depth)[:, self.encoder.num_prefix_tokens :]

    def embed(self, images: Tensor) -> Tensor:
        """Mean of the encoder's normalised patch tokens over all patches ``[B, D]``."""
        return self.patch_tokens(images).mean(dim=1)
