"""Named contenders at equal cost (``launch study``): probe quality against wall time.

A contender is a method plus overrides (``pcae``, ``pcae method.momentum=0.99``, ``mae``): the
shipped PCAE-vs-MAE study has two, an ablation as many as it asks. Every contender pretrains on
the same data, from the same initialisation where the encoders agree, for the same budget:
either the same wall time (``budget_s``, turned into a number of steps per contender once, from
a side-by-side timing of their training steps, as ``launch bench pretrain`` times them) or the
same number of steps (``steps``). The plan is recorded in ``STUDY/plan.json``: later runs of the
study reuse it, so its points are a function of the seeds. At fixed fractions of each run the
encoder (and PCAE's EMA teacher) is probed on held-out data (``launcher/probe.py``), next to the
same probe of the encoder at its random initialisation and of raw pixels. ``STUDY/points.jsonl``
holds every point, ``STUDY/report.md`` the table and ``STUDY/quality.png`` the curves
(``compare_report.py``). A killed
study resumes: finished points are kept, each run resumes from its newest checkpoint.

A study file (``experiments/study/*.yaml``) holds one experiment shared by every contender (the
encoder, data, optimiser and batch), the contenders (name: "METHOD key=value ..."), the seeds,
the budget, the fractions and the probe.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from launcher.config import build_dataclass, read_yaml, to_dict
from launcher.errors import ConfigError
from launcher.methods.registry import pretraining_methods
from launcher.probe import ProbeConfig, ProbeScore, ProbeSet, target_names
from launcher.stopping import StopRequest

log = logging.getLogger(__name__)

STUDY_FILE = "study.yaml"
PLAN = "plan.json"
POINTS = "points.jsonl"
RANDOM_INIT, PIXELS = "random init", "pixels"


@dataclass
class StudyConfig:
    name: str
    experiment: dict[str, Any]  # one experiment for every contender; its method section has no name
    # name -> "METHOD key=value ...": the method and the overrides of the experiment it trains with
    contenders: dict[str, str] = field(default_factory=lambda: {name: name for name in pretraining_methods()})
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_s: float = 300.0  # wall time of each pretraining run (one contender, one seed)
    steps: int = 0  # if > 0: every contender trains this many steps instead (equal steps, not equal time)
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # of each run's steps, where the encoder is probed
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    calibration_steps: int = 3  # timed steps per contender for the plan, after one untimed

    def __post_init__(self) -> None:
        from launcher.studies.ae_losses import check_directory_name

        check_directory_name(self.name, "study")
        if not self.contenders:
            raise ValueError("contenders must name at least one, e.g. {pcae: pcae, mae: mae}")
        for name in self.contenders:
            check_directory_name(name, "contender")
            if name in (RANDOM_INIT, PIXELS):
                raise ValueError(f"a contender may not be named {name!r}: that name is a baseline's")
        if not self.seeds or not math.isfinite(self.budget_s) or self.budget_s <= 0 or self.calibration_steps < 1:
            raise ValueError("a study needs seeds, a positive finite budget_s and calibration_steps >= 1")
        if self.steps < 0:
            raise ValueError("steps must be >= 0 (0: the budget in wall time, budget_s)")
        if not self.fractions or sorted(self.fractions) != list(self.fractions) or not 0 < self.fractions[0]:
            raise ValueError("fractions must be increasing, in (0, 1]")
        if self.fractions[-1] != 1.0:
            raise ValueError("the last fraction must be 1.0: the end of the budget")

    def experiment_of(self, contender: str, seed: int, num_steps: int | None = None) -> Any:
        """The pretraining experiment of one contender and seed (``num_steps``: the planned length)."""
        from launcher.config import parse_override, set_dotted
        from launcher.experiment import experiment_from_dict

        method, *overrides = self.contenders[contender].split()
        raw = json.loads(json.dumps(self.experiment))  # a deep copy of plain data
        raw["method"] = {**raw.get("method", {}), "name": method}
        for override in overrides:
            set_dotted(raw, *parse_override(override))
        raw.setdefault("train", {})["seed"] = seed
        if num_steps is not None:
            raw["train"]["num_steps"] = num_steps
        return experiment_from_dict(raw)

    def check_contenders(self) -> None:
        """Every contender's experiment must load and pretrain an encoder (a bad one fails before anything runs)."""
        for name, text in self.contenders.items():
            if not text.split():
                raise ConfigError(f"contender {name!r} names no method: give 'METHOD key=value ...'")
            try:
                method = self.experiment_of(name, self.seeds[0]).method.name
            except ConfigError as e:
                raise ConfigError(f"contender {name!r} ({text}): {e}") from None
            if method not in pretraining_methods():
                raise ConfigError(
                    f"contender {name!r} ({text}): {method} pretrains no encoder to probe; "
                    f"pretraining methods: {', '.join(pretraining_methods())}"
                )

    def init_label(self, contender: str) -> str:
        """The random-init baseline of a contender: one per distinct encoder among the contenders.

        Contenders that train the same architecture start from the same weights (same seed) and
        share "random init"; one whose overrides change the encoder (its patch size, say) gets
        its own, named after what differs from the first contender's.
        """
        from launcher.methods.vit import ViTConfig

        first = self.experiment_of(next(iter(self.contenders)), self.seeds[0]).method
        own = self.experiment_of(contender, self.seeds[0]).method
        fields = ViTConfig.ARCHITECTURE
        differs = [f"{k}={getattr(own, k)}" for k in fields if getattr(own, k, None) != getattr(first, k, None)]
        return f"{RANDOM_INIT} ({', '.join(differs)})" if differs else RANDOM_INIT


def load_study(path: Path) -> StudyConfig:
    study = build_dataclass(StudyConfig, read_yaml(path), "study")
    study.check_contenders()
    return study


def parse_budget(text: str) -> float:
    """``--budget``: seconds, or with a unit: 90s, 15m, 2h."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise ConfigError(f"--budget {text!r} is not a wall time: seconds, or 90s, 15m, 2h") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--budget {text!r} is not a positive, finite wall time: give seconds, or 90s, 15m, 2h")
    return value


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError("--seeds needs at least one seed, each >= 0")
    return seeds


# ----------------------------------------------------------------------------- the plan


def calibrate(study: StudyConfig) -> dict[str, Any]:
    """Time every contender's training steps side by side on a real batch; the steps the budget buys.

    With ``study.steps`` set, every contender trains that many steps, and the timing only says
    what they cost.
    """
    from launcher.bench.compute import Contender, count_flops, describe_machine, step, time_alternating
    from launcher.cpu_allocator import keep_freed_memory
    from launcher.data import open_dataset
    from launcher.data.sampling import SeededDataset, collate
    from launcher.data.transforms import build_transform
    from launcher.methods import build_method
    from launcher.optim import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    autocast = device.type == "cuda"
    contenders, batches = [], {}
    for name in study.contenders:
        cfg = study.experiment_of(name, study.seeds[0])
        base = open_dataset(cfg.data, cfg.method.img_size)
        dataset = SeededDataset(base, build_transform(cfg.data, cfg.method.img_size), cfg.train.seed)
        batch = collate([dataset[(i, 0)] for i in range(cfg.train.micro_batch_size)])
        batches[name] = {k: v.to(device) for k, v in batch.items()}
        torch.manual_seed(cfg.train.seed)
        model = build_method(cfg.method).to(device).train()
        contender = Contender(name, model, build_optimizer(model, cfg.optim), 0.0, [])
        contender.flops_per_step = count_flops(contender, batches[name], device, autocast)
        contenders.append(contender)
    time_alternating(
        contenders, lambda c: step(c, batches[c.name], device, autocast), device, 1, study.calibration_steps
    )
    # A step of the runs is `accumulation` micro-batches on each of the job's processes.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan: dict[str, Any] = {"budget_s": study.budget_s, "machine": describe_machine(device), "methods": {}}
    if study.steps:
        plan["steps"] = study.steps
    for c in contenders:
        train = study.experiment_of(c.name, study.seeds[0]).train
        accumulation = train.global_batch_size // (train.micro_batch_size * world)
        seconds = statistics.median(c.times) * accumulation
        steps = study.steps or max(1, int(study.budget_s / seconds))
        plan["methods"][c.name] = {
            "seconds_per_step": seconds,
            "flops_per_step": c.flops_per_step * accumulation,
            "steps": steps,
            "probe_steps": sorted({max(1, round(f * steps)) for f in study.fractions}),
        }
    return plan


# ----------------------------------------------------------------------------- the study


def same_but_seeds(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """A study's points are per seed, so a study may be resumed with other seeds: the rest must match."""
    return {k: v for k, v in recorded.items() if k != "seeds"} == {k: v for k, v in wanted.items() if k != "seeds"}


class Study:
    """One study directory: its config, plan, points, and the runs that make them."""

    def __init__(self, study: StudyConfig, directory: Path) -> None:
        self.cfg, self.directory = study, Path(directory)

    def check(self) -> bool:
        """Refuse a directory of something else; True if it holds this study already (it resumes)."""
        path = self.directory
        if path.exists() and not (path / STUDY_FILE).exists() and any(path.iterdir()):
            raise ConfigError(f"{path} exists but is not a study of this tool; pass another --study-dir")
        if (path / STUDY_FILE).exists() and not same_but_seeds(read_yaml(path / STUDY_FILE), to_dict(self.cfg)):
            raise ConfigError(
                f"{path} holds a study with a different configuration (budget, experiment, contenders...); "
                f"pass another --study-dir, or the same settings to resume it (other --seeds add to it)"
            )
        return (path / STUDY_FILE).exists()

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / STUDY_FILE).write_text(json.dumps(to_dict(self.cfg), indent=2))  # JSON is YAML

    def prepare_data(self) -> None:
        """Every contender's data sets, then the probe's, before anything trains."""
        from launcher.local import prepare_data

        *others, last = (self.cfg.experiment_of(name, self.cfg.seeds[0]) for name in self.cfg.contenders)
        for cfg in others:
            prepare_data(cfg)
        prepare_data(last, self.cfg.probe.data)

    def plan(self, wait_s: float = 1800.0) -> dict[str, Any]:
        """The recorded plan, or a new one: rank 0 times the methods, the other ranks wait for its file."""
        path = self.directory / PLAN
        deadline = time.monotonic() + wait_s
        while not is_main_rank() and not path.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0 wrote no {path} in {wait_s:.0f} s; see its log")
            time.sleep(1.0)
        if path.is_file():
            return json.loads(path.read_text())
        log.info("timing %d contenders side by side for the plan", len(self.cfg.contenders))
        plan = calibrate(self.cfg)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=2) + "\n")
        tmp.replace(path)
        return plan

    def points(self) -> list[dict[str, Any]]:
        path = self.directory / POINTS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]

    def add_point(self, point: dict[str, Any]) -> None:
        with open(self.directory / POINTS, "a") as f:
            f.write(json.dumps(point) + "\n")

    def run(self, stop: StopRequest | None = None, say=lambda text: None) -> bool:
        """Every run and probe point not yet done; False if a stop request interrupted it."""
        from launcher.methods import build_method
        from launcher.trainer import Trainer

        stop = stop or StopRequest()
        self.prepare_data()
        plan = self.plan()
        say(describe_plan(plan))
        first = self.cfg.experiment_of(next(iter(self.cfg.contenders)), self.cfg.seeds[0])
        probe = ProbeSet(self.cfg.probe, first.method.img_size)
        done = {(p["encoder"], p["seed"], p["step"]) for p in self.points()}
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        main = is_main_rank()  # every rank trains; rank 0 alone probes and writes the points
        if main and (PIXELS, None, 0) not in done:
            self.add_point(self._point(PIXELS, None, 0, 0.0, 0.0, probe.score_pixels()))
        for seed in self.cfg.seeds:
            for name in self.cfg.contenders:
                if stop.requested:
                    return False
                steps = plan["methods"][name]["steps"]
                cfg = self.cfg.experiment_of(name, seed, steps)
                init = self.cfg.init_label(name)
                if main and (init, seed, 0) not in done:  # contenders of one encoder share its initialisation
                    torch.manual_seed(seed)
                    initial = build_method(cfg.method).to(device).eval()
                    self.add_point(self._point(init, seed, 0, 0.0, 0.0, probe.score(probe.encoder(initial), device)))
                    done.add((init, seed, 0))
                todo = [s for s in plan["methods"][name]["probe_steps"] if (name, seed, s) not in done]
                if not todo:
                    continue
                trainer = Trainer(cfg, self.directory / "runs" / f"{name}-seed{seed}", stop)
                trainer.resume()
                for target in todo:
                    result = trainer.fit(until_step=target)
                    if result.step < target:
                        return False  # stopped by a signal: resume later
                    if not main:
                        continue
                    model = trainer.accelerator.unwrap_model(trainer.model).eval()
                    flops = plan["methods"][name]["flops_per_step"] * result.step
                    score = probe.score(probe.encoder(model), device)
                    point = self._point(name, seed, result.step, result.train_seconds, flops, score)
                    point["init"] = init
                    if hasattr(model, "teacher_patch_tokens"):  # PCAE's EMA teacher, as a diagnostic
                        teacher = probe.score(probe.encoder(model, model.teacher_patch_tokens), device)
                        point["teacher"] = teacher.to_dict(probe.names)
                    model.train()
                    self.add_point(point)
                    say(
                        f"{name} seed {seed}: step {result.step}/{steps}, {result.train_seconds:.0f} s, "
                        f"probe mean R² {point['r2']['mean']:.3f}"
                        + (f" (teacher {point['teacher']['mean']:.3f})" if "teacher" in point else "")
                    )
        return True

    def _point(
        self, encoder: str, seed: int | None, step: int, seconds: float, flops: float, score: ProbeScore
    ) -> dict[str, Any]:
        return {
            "encoder": encoder,
            "seed": seed,
            "step": step,
            "seconds": seconds,
            "flops": flops,
            "r2": score.to_dict(target_names(self.cfg.probe.data.name, self.cfg.probe.targets)),
        }


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def describe_plan(plan: dict[str, Any]) -> str:
    budget = f"{plan['steps']} steps" if plan.get("steps") else f"{plan['budget_s']:.0f} s of training"
    lines = [f"plan: {budget} per run, timed on {plan['machine']}"]
    for name, entry in plan["methods"].items():
        lines.append(
            f"  {name}: {entry['seconds_per_step']:.3f} s/step -> {entry['steps']} steps, "
            f"{entry['flops_per_step'] / 1e12:.2f} TFLOP/step; probed at steps {entry['probe_steps']}"
        )
    return "\n".join(lines)
