"""``launch export``: an encoder this project trained, in timm's ``vision_transformer`` layout.

The file is safetensors with timm's keys (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.*``, ``norm.*``): the encoder's blocks already are timm's ``Block``, and the position
embedding (fixed 2-D sin-cos for pretraining, learnt when fine-tuned) is written with its cls
row. A JSON sidecar (``FILE.json``) says how to build the model that takes it::

    timm.create_model(meta["timm_model"], pretrained=True, num_classes=0,
                      pretrained_cfg_overlay={"file": "encoder.safetensors"}, **meta["timm_kwargs"])

An exported file is also a source of ``launch finetune`` (it reads like an official MAE file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from launcher import checkpoint
from launcher.errors import ConfigError
from launcher.runs import CONFIG, read_run_config, writing

TIMM_SIZES = {"tiny": "vit_tiny", "small": "vit_small", "base": "vit_base", "large": "vit_large", "huge": "vit_huge"}


def checkpoint_of(source: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, the run's config) of a run directory (its newest valid one) or checkpoint."""
    source = Path(source)
    if (source / CONFIG).is_file():
        config = read_run_config(source)
        found = checkpoint.latest_valid(source)
        if found is None:
            raise ConfigError(
                f"run {source} has no valid checkpoint to export yet; let it train until it writes one "
                f"(train.checkpoint_every), or pass another run"
            )
        return found, config
    run_dir = source.parents[1] if len(source.parents) > 1 else source
    if source.is_dir() and (run_dir / CONFIG).is_file() and checkpoint.checkpoints_root(run_dir) == source.parent:
        config = read_run_config(run_dir)
        problem = checkpoint.validate(source)
        if problem:
            raise ConfigError(
                f"checkpoint {source} is not valid ({problem}); pass its run directory to take the newest valid one"
            )
        return source, config
    raise ConfigError(
        f"{source} is neither a run directory (with {CONFIG}) nor one of its checkpoints/step_N; pass one of those"
    )


def timm_model(method: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The timm model name and the keyword arguments that build this encoder."""
    from methods.vit import vit_size

    size, patch, img = method["size"], method["patch_size"], method["img_size"]
    preset = vit_size(size)
    base = TIMM_SIZES.get(size)
    if base is not None and (patch, img) in ((16, 224), (14, 224), (8, 224), (32, 224)):
        return f"{base}_patch{patch}_{img}", {"in_chans": method.get("in_chans", 3), "mlp_ratio": method["mlp_ratio"]}
    # No registered timm name for this size: build on ViT-Ti's with every dimension given.
    return "vit_tiny_patch16_224", {
        "img_size": img,
        "patch_size": patch,
        "embed_dim": preset.embed_dim,
        "depth": preset.depth,
        "num_heads": preset.num_heads,
        "in_chans": method.get("in_chans", 3),
        "mlp_ratio": method["mlp_ratio"],
    }


def timm_state_dict(state: dict[str, torch.Tensor], method: dict[str, Any], which: str) -> dict[str, torch.Tensor]:
    """The encoder of a checkpoint's state dict under timm's keys, with its position embedding."""
    from methods.pretrained import extract_encoder
    from methods.vit import sincos_pos_embed

    try:
        encoder = extract_encoder(state, which)
    except ValueError as e:
        raise ConfigError(f"cannot export this checkpoint's encoder: {e}") from None
    out = dict(encoder.state)
    side = method["img_size"] // method["patch_size"]
    if "pos_embed" in state:  # a fine-tuned classifier learnt its positions
        out["pos_embed"] = state["pos_embed"].reshape(1, -1, encoder.width)
    else:  # pretraining's fixed sin-cos positions, cls row zero, as the encoder builds them
        out["pos_embed"] = sincos_pos_embed((side, side), encoder.width).unsqueeze(0)
    if out["cls_token"].ndim == 2:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def check_writable(out: Path) -> None:
    """Refuse an ``out`` whose nearest existing folder is a file or not this user's to write, before any work."""
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = "is not writable by this user" if folder.is_dir() else "is a file, not a folder"
        raise ConfigError(
            f"cannot write --out {out}: {folder} {why}; nothing was written. Pass an --out in a folder you can write"
        )


def export(source: Path, out: Path, which: str = "student") -> tuple[Path, Path]:
    """Write ``out`` (safetensors) and ``out.json``; refuses to overwrite either."""
    from safetensors.torch import save_file

    from methods.pretrained import read_state_dict

    out = Path(out)
    meta_path = out.with_suffix(".json")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out} must end in .safetensors (timm reads the format by its suffix)")
    existing = [p for p in (out, meta_path) if p.exists()]
    if existing:
        raise ConfigError(
            f"{', '.join(map(str, existing))} exists; nothing was written. Pass another --out, or remove it first"
        )
    check_writable(out)
    ckpt, config = checkpoint_of(source)
    method = config["method"]
    missing = [k for k in ("size", "patch_size", "img_size", "mlp_ratio") if k not in method]
    if missing:
        raise ConfigError(
            f"run of method {method.get('name')!r} has no ViT encoder to export (no {', '.join(missing)})"
        )
    state = timm_state_dict(read_state_dict(ckpt), method, which)
    name, kwargs = timm_model(method)
    data = config.get("data", {})
    meta = {
        "timm_model": name,
        "timm_kwargs": kwargs,
        "img_size": method["img_size"],
        "patch_size": method["patch_size"],
        "mean": data.get("mean"),
        "std": data.get("std"),
        "method": method["name"],
        "encoder": which,
        "checkpoint": str(ckpt.resolve()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with writing(out, cleanup=tmp):
        save_file(state, str(tmp), metadata={"format": "pt"})
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(out)
    return out, meta_path
