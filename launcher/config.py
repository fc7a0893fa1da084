"""Typed experiment configs: dataclass defaults <- experiment YAML <- dotted CLI overrides.

An experiment file holds only what differs from the defaults below (and from the
method's own config dataclass in ``methods/``). Every key is checked: an unknown key
or a value of the wrong type is a ``ConfigError`` naming the key and what it allows.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from launcher.errors import ConfigError
from methods import MethodConfig, UnknownMethodError, get_method, method_names

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = REPO_ROOT / "experiments"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Which data set to read and how to augment it."""

    name: Literal["imagefolder", "lunarlander", "stl10", "svhn"] = "imagefolder"
    root: str = ""  # checked when the data set is opened, so experiments can leave it to the CLI
    split: str = "train"  # stl10: train/test/unlabeled; svhn: train/test/extra; others: unused
    # mae: random resized crop + flip (pretraining); randaug: MAE's fine-tuning augmentation
    # (timm's random resized crop, flip, RandAugment `rand_augment`, random erasing `reprob`).
    augment: Literal["mae", "randaug", "flip", "none"] = "mae"
    min_crop_scale: float = 0.2
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    # Evaluation: resize to img_size / eval_crop_pct, then centre-crop img_size (ImageNet: 0.875).
    eval_crop_pct: float = 1.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_workers: int = 8
    # LunarLander only: when > 0 and `root` holds no data set, generate this many frames there
    # (with this seed: give the sets of one study different seeds).
    generate_frames: int = 0
    generate_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"data.min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("data.mean and data.std need one value per channel, std > 0")
        if not 0.0 < self.eval_crop_pct <= 1.0 or not 0.0 <= self.reprob <= 1.0:
            raise ValueError("data.eval_crop_pct must be in (0, 1] and data.reprob in [0, 1]")
        if self.num_workers < 0 or self.generate_frames < 0:
            raise ValueError("data.num_workers and data.generate_frames must be >= 0")


@dataclass
class OptimConfig:
    """AdamW (or LARS) with a per-step linear warmup and half-cosine decay."""

    name: Literal["adamw", "lars"] = "adamw"  # lars: MAE's linear probe (momentum, trust 0.001)
    blr: float = 1.5e-4  # lr = blr * global_batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: float | None = None
    layer_decay: float | None = None  # layer-wise lr decay (MAE fine-tuning: 0.65); needs a ViT method
    momentum: float = 0.9  # lars only

    def __post_init__(self) -> None:
        if self.blr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError("optim.blr must be > 0; optim.min_lr and optim.weight_decay >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError("optim.clip_grad must be > 0, or null to turn clipping off")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1], or null, got {self.layer_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")


@dataclass
class TrainConfig:
    """The loop: how long, how big, how often to log and checkpoint."""

    num_epochs: int = 400
    global_batch_size: int = 4096  # summed over processes and accumulation steps
    micro_batch_size: int = 64  # per process per forward pass
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = 20
    checkpoint_every: int = 1000  # optimizer steps; a checkpoint is also written at the end
    num_checkpoints_kept: int = 2

    def __post_init__(self) -> None:
        for key in ("num_epochs", "global_batch_size", "micro_batch_size", "log_every",
                    "checkpoint_every", "num_checkpoints_kept"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )


@dataclass
class ProbeConfig:
    """A ridge-regression probe of labels on frozen embeddings, run after pretraining."""

    enabled: bool = False
    targets: tuple[int, ...] = (0, 1)  # label columns to predict (LunarLander: x, y)
    num_samples: int = 4000
    test_fraction: float = 0.2
    # Average the patch tokens over a grid x grid layout of cells and concatenate them, which
    # keeps where things are (a global mean forgets it); 0 uses the method's own embed().
    grid: int = 2
    # A linprobe experiment (absolute, or relative to the repository root) run on the encoder after
    # pretraining, as `launch linprobe RUN --experiment ...` would; "" for none.
    linprobe: str = ""

    def __post_init__(self) -> None:
        if not self.targets or self.num_samples <= 0 or not 0.0 < self.test_fraction < 1.0:
            raise ValueError("probe needs targets, num_samples > 0 and test_fraction in (0, 1)")
        if self.grid < 0:
            raise ValueError(f"probe.grid must be >= 0, got {self.grid}")
        if self.linprobe and not (REPO_ROOT / self.linprobe).is_file():
            raise ValueError(f"probe.linprobe {self.linprobe} is not an experiment file under {REPO_ROOT}")


@dataclass
class EvalConfig:
    """Evaluation of a fine-tuned or probed model on a held-out set, at the end of training.

    ``data`` holds only the keys that differ from the experiment's ``data`` section (e.g.
    ``split: test`` or another ``root``); unset, there is no evaluation.
    """

    data: DataConfig | None = None
    every_epochs: int = 0  # also evaluate every this many epochs; 0: only at the end
    batch_size: int = 256  # per process

    def __post_init__(self) -> None:
        if self.every_epochs < 0 or self.batch_size <= 0:
            raise ValueError("eval.every_epochs must be >= 0 and eval.batch_size > 0")


@dataclass
class ExperimentConfig:
    method: MethodConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- loading


def load_experiment(
    path: Path | None, overrides: list[str] = (), method: str | None = None
) -> ExperimentConfig:
    """Merge the dataclass defaults, an experiment file and ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    raw.setdefault("method", {})
    if not isinstance(raw["method"], dict):
        raise ConfigError("'method' must be a mapping with at least a 'name' key")
    if method is not None:
        named = raw["method"].get("name")
        if named is not None and named != method:
            raise ConfigError(
                f"the experiment file is for method {named!r} but the command asks for {method!r}; "
                f"pick an experiment for {method!r} or drop the method argument"
            )
        raw["method"]["name"] = method
    return experiment_from_dict(raw)


def experiment_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError("an experiment must be a mapping of sections (method, data, optim, train, probe, eval)")
    raw = dict(raw)
    method_raw = dict(raw.pop("method", {}) or {})
    name = method_raw.get("name")
    if not name:
        raise ConfigError(f"method.name is required; known methods: {', '.join(method_names())}")
    try:
        entry = get_method(name)
    except UnknownMethodError as e:
        raise ConfigError(str(e)) from None
    method_cfg = build_dataclass(entry.config, method_raw, "method")
    sections = {f.name: f.type for f in dataclasses.fields(ExperimentConfig) if f.name != "method"}
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(
            f"unknown section(s) {sorted(unknown)}; allowed: method, {', '.join(sections)}"
        )
    evaluation = raw.get("eval")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("data"), dict):
        # eval.data lists what differs from data: the rest is inherited.
        raw["eval"] = {**evaluation, "data": {**(raw.get("data") or {}), **evaluation["data"]}}
    hints = get_type_hints(ExperimentConfig)
    built = {key: build_dataclass(hints[key], raw.get(key) or {}, key) for key in sections}
    return ExperimentConfig(method=method_cfg, **built)


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist; see {EXPERIMENTS_DIR} for the shipped ones")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. optim.blr=1e-4)")
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys and values of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(raw) - fields
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in sorted(unknown))}; "
            f"{prefix} allows: {', '.join(sorted(fields))}"
        )
    kwargs = {key: coerce(hints[key], value, f"{prefix}.{key}") for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"invalid {prefix}: {e}") from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"invalid {prefix}: {e}") from None


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; widen int to float and list to tuple."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is dict:
        key_type, value_type = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {coerce(key_type, k, key): coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        item_type = get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {item_type.__name__}, got {value!r}")
        return tuple(coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key} must be a {name}, got {value!r} ({type(value).__name__})")


# ----------------------------------------------------------------------------- saving


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-YAML form of a config (nested dicts, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def default_experiment(kind: str, method: str, local: bool) -> Path:
    """The experiment a bare ``launch pretrain METHOD`` uses: the small local one on this machine."""
    stem = f"{method}_local" if local else f"{method}_vit_base"
    return EXPERIMENTS_DIR / kind / f"{stem}.yaml"
