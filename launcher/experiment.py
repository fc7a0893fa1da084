"""The experiment of one run: its sections, each owned by the part that uses it.

``method`` is the method's own config (``methods/``), ``data`` belongs to ``launcher/data``,
``optim`` and ``train`` to the trainer, ``eval`` to ``launcher/evaluate.py``. Merged in order:
the dataclass defaults, an experiment file (only what differs from them), ``key=value``
overrides; the result is written to ``RUN/config.yaml``, the run's one source of truth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from launcher.config import build_dataclass, parse_override, read_yaml, set_dotted
from launcher.data import CHANNELS, DataConfig
from launcher.errors import ConfigError
from launcher.evaluate import EvalConfig
from launcher.methods import MethodConfig, UnknownMethodError, get_method, method_names
from launcher.optim import OptimConfig, TrainConfig


@dataclass
class ExperimentConfig:
    """One run: each section is owned by the part that uses it (methods/, data/, trainer, evaluate)."""

    method: MethodConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.method.in_chans != CHANNELS:  # caught here, not at the first step in a written run directory
            raise ValueError(
                f"method.in_chans is {self.method.in_chans}, but every data set is read as RGB images ({CHANNELS} "
                f"channels; a greyscale file is converted): set method.in_chans={CHANNELS}, or fine-tune from an "
                f"encoder of RGB images"
            )

    def data_sets(self) -> list[DataConfig]:
        """Every data set the run reads: training, then evaluation."""
        return [self.data] + ([self.eval.data] if self.eval.data is not None else [])


# ----------------------------------------------------------------------------- loading


def load_experiment(path: Path | None, overrides: list[str] = (), method: str | None = None) -> ExperimentConfig:
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
        raise ConfigError("an experiment must be a mapping of sections (method, data, optim, train, eval)")
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
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; allowed: method, {', '.join(sections)}")
    evaluation = raw.get("eval")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("data"), dict):
        # eval.data lists what differs from data: the rest is inherited.
        raw["eval"] = {**evaluation, "data": {**(raw.get("data") or {}), **evaluation["data"]}}
    hints = get_type_hints(ExperimentConfig)
    built = {key: build_dataclass(hints[key], raw.get(key) or {}, key) for key in sections}
    try:
        return ExperimentConfig(method=method_cfg, **built)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def default_experiment(kind: str, method: str, local: bool) -> Path:
    """The experiment a bare ``launch pretrain METHOD`` uses: the small local one on this machine."""
    stem = f"{method}_local" if local else f"{method}_vit_base"
    from launcher.shipped import shipped_experiment

    return shipped_experiment(f"{kind}/{stem}")
