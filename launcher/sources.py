"""Where ``launch finetune`` / ``launch linprobe`` take their encoder from.

A source is a pretraining run directory (its newest valid checkpoint), one of its
``checkpoints/step_N`` directories, a weights file (e.g. the official MAE release), or a folder
that ``launch export`` wrote (its weights file). The
weights decide the architecture: for our own runs the ViT fields come from the run's
``config.yaml``, for a file they are read off the tensors' shapes. They become config
overrides placed before the user's own, so the resolved config records them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import checkpoint
from launcher.errors import ConfigError
from launcher.export import CONFIG_JSON as EXPORTED_CONFIG
from launcher.export import WEIGHTS as EXPORTED_WEIGHTS
from launcher.methods.pretrained import load_pretrained
from launcher.methods.vit import VIT_SIZES, ViTConfig
from launcher.runs import CONFIG, read_run_config


@dataclass
class Source:
    name: str  # for the default run directory name
    overrides: list[str]  # method.pretrained=..., method.size=..., ...
    run_config: dict[str, Any] | None = None  # the run's config.yaml, for a run or its checkpoint


def _size_name(width: int, depth: int) -> str:
    for name, size in VIT_SIZES.items():
        if (size.embed_dim, size.depth) == (width, depth):
            return name
    known = ", ".join(f"{n} ({s.embed_dim} wide, {s.depth} deep)" for n, s in VIT_SIZES.items())
    raise ConfigError(f"the checkpoint's ViT is {width} wide and {depth} deep, which is none of the presets: {known}")


def resolve_source(source: Path, command: str, recorded: dict[str, Any] | None = None) -> Source:
    """What ``launch finetune|linprobe SOURCE`` starts from, as config overrides.

    ``recorded`` is the method section of the run directory's own config, when it exists: the
    source was resolved once, when that run started, and is reused as it was recorded (the
    source run may have moved on, or pruned that checkpoint, since).
    """
    source = Path(source)
    if (source / EXPORTED_CONFIG).is_file() and (source / EXPORTED_WEIGHTS).is_file():  # `launch export`'s folder
        source = source / EXPORTED_WEIGHTS
    if recorded is not None and recorded.get("name") == command and recorded.get("pretrained"):
        pretrained = Path(recorded["pretrained"])
        if pretrained == source.resolve() or source.resolve() in pretrained.parents:
            keys = ("pretrained", "pretrained_encoder", *ViTConfig.ARCHITECTURE)
            return Source(
                source.stem if source.is_file() else source.name,
                [f"method.{key}={recorded[key]}" for key in keys if key in recorded],
            )
        raise ConfigError(
            f"the run directory was started from {pretrained}, not from {source}; pass that source "
            f"to resume it, or another --run-dir to start a new run"
        )
    if (source / CONFIG).is_file():  # a run directory
        run_config = read_run_config(source)
        run_dir, ckpt = source, checkpoint.latest_valid(source)
        if run_config["method"]["name"] == command:
            return Source(source.name, [], run_config)
        if ckpt is None:
            raise ConfigError(
                f"run {source} has no valid checkpoint yet; let its pretraining write one "
                f"(train.checkpoint_every) or pass a checkpoint file"
            )
    elif (
        source.is_dir()
        and len(parents := source.absolute().parents) > 1  # a name with no folder above it is no checkpoint
        and (parents[1] / CONFIG).is_file()
        and checkpoint.checkpoints_root(parents[1]) == parents[0]
    ):
        run_dir, ckpt = parents[1], source
        run_config = read_run_config(run_dir)
        problem = checkpoint.validate(ckpt)
        if problem:
            raise ConfigError(
                f"checkpoint {ckpt} is not valid ({problem}); pass the run directory to take its "
                f"newest valid checkpoint"
            )
        if run_config["method"]["name"] == command:
            raise ConfigError(
                f"{ckpt} is a checkpoint of a {command} run; pass the run directory {run_dir} "
                f"with --eval-only to evaluate its newest checkpoint"
            )
    elif source.is_file():
        try:
            pretrained = load_pretrained(source)
        except ValueError as e:
            raise ConfigError(f"cannot use {source} as a pretrained encoder: {e}") from None
        side = 1 if pretrained.pos_embed is None else round((pretrained.pos_embed.shape[-2] - 1) ** 0.5)
        overrides = [
            f"method.pretrained={source.resolve()}",
            f"method.size={_size_name(pretrained.width, pretrained.depth)}",
            f"method.patch_size={pretrained.patch_size}",
            f"method.in_chans={pretrained.in_chans}",
        ]
        if pretrained.pos_embed is not None:
            overrides.append(f"method.img_size={side * pretrained.patch_size}")
        return Source(source.stem, overrides)
    else:
        raise ConfigError(
            f"{source} is neither a run directory (with {CONFIG}), a checkpoint directory of one, "
            f"nor a weights file; pass one of those"
        )
    method = run_config["method"]
    missing = [key for key in ViTConfig.ARCHITECTURE if key not in method]
    if missing:
        raise ConfigError(
            f"run {run_dir} was trained with method {method['name']!r}, which has no ViT encoder "
            f"to {command} (its config lacks {', '.join(missing)})"
        )
    overrides = [
        f"method.pretrained={ckpt.resolve()}",
        *(f"method.{key}={method[key]}" for key in ViTConfig.ARCHITECTURE),
    ]
    return Source(f"{run_dir.name}", overrides, run_config)
