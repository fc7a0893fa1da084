"""Read a pretrained ViT encoder out of a checkpoint: our own runs, or the official MAE release.

Each method of this project knows where its encoder lies in its checkpoints (its
``encoder_state``, ``protocol.HasEncoder``); a run's recorded ``method.name`` picks it. A file
without its run (no name) is tried against each pretraining method's layout, then read as the
official MAE release (``mae_pretrain_vit_base.pth`` and the ``checkpoint-N.pth`` files of its
scripts): ``{"model": {...}}`` with timm ``VisionTransformer`` keys at the top level
(``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``, and for
fine-tuned files ``fc_norm.*`` and ``head.*``). Its decoder keys are ignored.

Our ``ViTEncoder`` uses timm's ``Block``, so block keys are the same in all layouts. What
differs is the position embedding: ours is rebuilt at construction, while an official file
carries the one it was trained with, which is returned separately for the caller to use.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .protocol import EncoderChoice, HasEncoder, HasTeacher
from .registry import get_method, pretraining_methods

ENCODER_KEYS = re.compile(r"^(cls_token|patch_embed\.proj\.(weight|bias)|blocks\.\d+\..+|norm\.(weight|bias))$")
HEAD_KEYS = re.compile(r"^(fc_norm|head)\.(weight|bias)$")
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class PretrainedEncoder:
    """An encoder's weights in ``ViTEncoder`` key names, plus what else the file held."""

    state: dict[str, Tensor]
    source: str  # e.g. "pcae teacher" or "official MAE"
    pos_embed: Tensor | None = None  # [1, 1 + N, D] with a cls row, official files only
    head: dict[str, Tensor] | None = None  # fc_norm.* / head.* of a fine-tuned official file

    @property
    def width(self) -> int:
        return self.state["patch_embed.proj.weight"].shape[0]

    @property
    def depth(self) -> int:
        return 1 + max(int(k.split(".")[1]) for k in self.state if k.startswith("blocks."))

    @property
    def patch_size(self) -> int:
        return self.state["patch_embed.proj.weight"].shape[-1]

    @property
    def in_chans(self) -> int:
        return self.state["patch_embed.proj.weight"].shape[1]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors``/``.pth``/``.bin`` file, or of a checkpoint directory's model file."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).is_file()]
        if not found:
            raise ValueError(f"{path} is a directory without a model file ({' or '.join(MODEL_FILES)})")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"pretrained weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # The MAE scripts also pickle their argparse namespace next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors, or one under 'model')")
    return data


def _has_encoder(state: dict[str, Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state)


def _run_encoder(state: dict[str, Tensor], which: EncoderChoice, method: str) -> tuple[str, dict[str, Tensor]]:
    """(source, weights) of the encoder of a run of ``method``, by that method's ``encoder_state``."""
    cls = get_method(method).cls
    if not issubclass(cls, HasEncoder):
        raise ValueError(f"method {method!r} has no encoder to take out of its checkpoints")
    source = f"{method} {which}" if issubclass(cls, HasTeacher) else method
    return source, cls.encoder_state(state, which)


def _layout_of(state: dict[str, Tensor]) -> str | None:
    """The pretraining method whose layout holds an encoder in ``state`` (a file read without its run)."""
    return next((m for m in pretraining_methods() if _has_encoder(get_method(m).cls.encoder_state(state))), None)


def extract_encoder(
    state: dict[str, Tensor], which: EncoderChoice = "student", method: str | None = None
) -> PretrainedEncoder:
    """The encoder of a run of ``method`` (None: a pretraining method's layout, or an official MAE file)."""
    method = method or _layout_of(state)
    if method is not None:
        source, inner = _run_encoder(state, which, method)
    elif "blocks.0.attn.qkv.weight" in state:
        if which == "teacher":
            raise ValueError("an official MAE checkpoint has no EMA teacher; take the student (the encoder)")
        source, inner = "official MAE", state
    else:
        sample = ", ".join(sorted(state)[:6])
        raise ValueError(
            f"unrecognised checkpoint layout (first keys: {sample}); expected a run of this project "
            f"({', '.join(pretraining_methods())}) or an official MAE file (blocks.*, patch_embed.*)"
        )
    encoder = {k: v for k, v in inner.items() if ENCODER_KEYS.match(k)}
    if not _has_encoder(encoder):
        raise ValueError(f"the {source} weights have no patch embedding or no blocks")
    head = {k: v for k, v in inner.items() if HEAD_KEYS.match(k)} or None
    pos_embed = inner.get("pos_embed") if source == "official MAE" else None
    return PretrainedEncoder(encoder, source, pos_embed, head)


def load_pretrained(path: str | Path, which: EncoderChoice = "student") -> PretrainedEncoder:
    return extract_encoder(read_state_dict(path), which)
