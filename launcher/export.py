"""``launch export``: an encoder this project trained, as a folder timm builds and loads by itself.

The folder is timm's own layout for a model with its configuration (as on the Hugging Face hub):
``model.safetensors`` with timm's ``vision_transformer`` keys (``cls_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``; the encoder's blocks already are timm's
``Block``, and the position embedding, fixed 2-D sin-cos for pretraining or learnt when fine-tuned,
is written with its cls row) and ``config.json``: the architecture with every dimension (depth,
width, heads, patch and image size, MLP ratio, channels) and the pretrained config (input size,
mean/std, interpolation, crop) that ``timm.data.resolve_data_config`` reads. So::

    model = timm.create_model("local-dir:FOLDER", pretrained=True, num_classes=0)

builds exactly the exported encoder and loads it strictly: a missing or misshapen tensor is an
error, never a block left at random. ``config.json`` also says where the weights came from (under
``"launch"``). The folder is also a source of ``launch finetune`` (it reads like an official MAE
file).
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

WEIGHTS, CONFIG_JSON = "model.safetensors", "config.json"
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
    """The timm model name and the keyword arguments that build this encoder, every dimension given."""
    import timm

    from launcher.methods.vit import vit_size

    size, patch, img = method["size"], method["patch_size"], method["img_size"]
    preset = vit_size(size)
    name = f"{TIMM_SIZES.get(size, 'vit_tiny')}_patch{patch}_{img}"
    if not timm.is_model(name):
        name = "vit_tiny_patch16_224"  # no registered name for this size: the arguments below decide
    return name, {
        "img_size": img,
        "patch_size": patch,
        "embed_dim": preset.embed_dim,
        "depth": preset.depth,
        "num_heads": preset.num_heads,
        "mlp_ratio": method["mlp_ratio"],
        "in_chans": method.get("in_chans", 3),
    }


def timm_state_dict(state: dict[str, torch.Tensor], method: dict[str, Any], which: str) -> dict[str, torch.Tensor]:
    """The encoder of a checkpoint's state dict under timm's keys, with its position embedding.

    The run's recorded method (``method["name"]``) says where its encoder lies (its ``encoder_state``).
    """
    from launcher.methods.pretrained import extract_encoder
    from launcher.methods.vit import sincos_pos_embed

    try:
        encoder = extract_encoder(state, which, method["name"])
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


FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".json")


def check_writable(out: Path) -> None:
    """Refuse an ``out`` whose nearest existing folder is a file or not this user's to write, before any work."""
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = "is not writable by this user" if folder.is_dir() else "is a file, not a folder"
        raise ConfigError(
            f"cannot write --out {out}: {folder} {why}; nothing was written. Pass an --out in a folder you can write"
        )


def export(source: Path, out: Path, which: str = "student") -> Path:
    """Write the folder ``out`` (``model.safetensors`` and ``config.json``); refuses to overwrite it."""
    from safetensors.torch import save_file

    from launcher.methods.pretrained import read_state_dict

    out = Path(out)
    if out.suffix in FILE_SUFFIXES:
        raise ConfigError(
            f"--out {out} names a file; the export is a folder that timm loads as a whole "
            f'(timm.create_model("local-dir:FOLDER", pretrained=True)). Pass a folder name, e.g. --out '
            f"{out.with_suffix('')}"
        )
    if out.exists():
        raise ConfigError(f"{out} exists; nothing was written. Pass another --out, or remove it first")
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
    description = timm_config(name, kwargs, config.get("data", {}))
    description["launch"] = {"method": method["name"], "encoder": which, "checkpoint": str(ckpt.resolve())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with writing(out, cleanup=tmp):
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG_JSON).write_text(json.dumps(description, indent=2) + "\n")
        # As any file this process creates, so the group reads it on a shared filesystem (safetensors writes 0600).
        for path in (tmp / WEIGHTS, tmp / CONFIG_JSON):
            path.chmod(0o666 & ~checkpoint.current_umask())
        tmp.rename(out)
    return out


def timm_config(name: str, kwargs: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """timm's ``config.json``: how to build the model (``model_args``) and what it expects (``pretrained_cfg``)."""
    from launcher.data import DataConfig

    defaults = DataConfig()
    img = kwargs["img_size"]
    return {
        "architecture": name,
        "num_classes": 0,  # the encoder alone; pass num_classes=K to timm for a new head
        "num_features": kwargs["embed_dim"],
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [kwargs["in_chans"], img, img],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": data.get("eval_crop_pct", defaults.eval_crop_pct),
            "crop_mode": "center",
            "mean": list(data.get("mean") or defaults.mean),
            "std": list(data.get("std") or defaults.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
