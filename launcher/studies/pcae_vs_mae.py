"""PCAE against MAE at equal cost (``launch study pcae-vs-mae``): probe quality against wall time.

Both methods pretrain the same encoder, from the same initialisation, on the same data, for
the same wall-time budget. The budget is turned into a number of steps per method once, from
a side-by-side timing of both methods' training steps (as ``launch bench pretrain`` times
them), and recorded in ``STUDY/plan.json``: later runs of the study reuse it, so its points are
a function of the seeds. At fixed fractions of each run the encoder is probed on held-out data
(``launcher/probe.py``), next to the same probe of the encoder at its random initialisation and
of raw pixels. ``STUDY/points.jsonl`` holds every point, ``STUDY/report.md`` the table and
``STUDY/quality.png`` the curves. A killed study resumes: finished points are kept, each run
resumes from its newest checkpoint.

A study file (``experiments/study/*.yaml``) holds one experiment shared by both methods (the
encoder, data, optimiser and batch), what differs per method (``methods``), the seeds, the
budget, the fractions and the probe.
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
from launcher.probe import ProbeConfig, ProbeScore, ProbeSet, describe, target_names
from launcher.stopping import StopRequest

log = logging.getLogger(__name__)

STUDY_FILE = "study.yaml"
PLAN = "plan.json"
POINTS = "points.jsonl"
METHODS = ("pcae", "mae")


@dataclass
class StudyConfig:
    name: str
    experiment: dict[str, Any]  # one experiment for both methods; its method section has no name
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"pcae": {}, "mae": {}})
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_s: float = 300.0  # wall time of each pretraining run (one method, one seed)
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # of each run's steps, where the encoder is probed
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    calibration_steps: int = 3  # timed steps per method for the plan, after one untimed

    def __post_init__(self) -> None:
        from launcher.studies.ae_losses import check_directory_name

        check_directory_name(self.name, "study")
        if set(self.methods) != set(METHODS):
            raise ValueError(f"methods must give the overrides of exactly {', '.join(METHODS)}")
        if not self.seeds or self.budget_s <= 0 or self.calibration_steps < 1:
            raise ValueError("a study needs seeds, a positive budget_s and calibration_steps >= 1")
        if not self.fractions or sorted(self.fractions) != list(self.fractions) or not 0 < self.fractions[0]:
            raise ValueError("fractions must be increasing, in (0, 1]")
        if self.fractions[-1] != 1.0:
            raise ValueError("the last fraction must be 1.0: the end of the budget")

    def experiment_of(self, method: str, seed: int, num_steps: int | None = None) -> Any:
        """The pretraining experiment of one method and seed (``num_steps``: the planned length)."""
        from launcher.experiment import experiment_from_dict

        raw = json.loads(json.dumps(self.experiment))  # a deep copy of plain data
        raw["method"] = {**raw.get("method", {}), **self.methods[method], "name": method}
        raw.setdefault("train", {})["seed"] = seed
        if num_steps is not None:
            raw["train"]["num_steps"] = num_steps
        return experiment_from_dict(raw)

    def check_same_encoder(self) -> None:
        """Both methods must train the same encoder: the overrides may not touch its fields."""
        from methods.vit import ViTConfig

        fields = (*ViTConfig.ARCHITECTURE, "drop_path")
        touched = sorted({key for overrides in self.methods.values() for key in overrides if key in fields})
        if touched:
            raise ConfigError(
                f"methods.* may not set the encoder's {', '.join(touched)}: both methods pretrain "
                f"the same encoder; set them once in experiment.method"
            )
        pcae, mae = (self.experiment_of(m, self.seeds[0]).method for m in METHODS)
        if any(getattr(pcae, key) != getattr(mae, key) for key in fields):
            raise ConfigError(
                "PCAE's and MAE's defaults differ in the encoder (drop_path: 0.25 for PCAE); "
                "set experiment.method.drop_path so both train the same one"
            )


def load_study(path: Path) -> StudyConfig:
    study = build_dataclass(StudyConfig, read_yaml(path), "study")
    study.check_same_encoder()
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
    """Time both methods' training steps side by side on one real batch; the steps the budget buys."""
    from launcher.bench.compute import Contender, count_flops, describe_machine, step, time_alternating
    from launcher.cpu_allocator import keep_freed_memory
    from launcher.data import open_dataset
    from launcher.data.sampling import SeededDataset, collate
    from launcher.data.transforms import build_transform
    from launcher.trainer import build_optimizer
    from methods import build_method

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    cfg = study.experiment_of(METHODS[0], study.seeds[0])
    base = open_dataset(cfg.data, cfg.method.img_size)
    dataset = SeededDataset(base, build_transform(cfg.data, cfg.method.img_size), cfg.train.seed)
    batch = collate([dataset[(i, 0)] for i in range(cfg.train.micro_batch_size)])
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = device.type == "cuda"
    contenders = []
    for method in METHODS:
        method_cfg = study.experiment_of(method, study.seeds[0])
        torch.manual_seed(method_cfg.train.seed)
        model = build_method(method_cfg.method).to(device).train()
        contender = Contender(method, model, build_optimizer(model, method_cfg.optim), 0.0, [])
        contender.flops_per_step = count_flops(contender, batch, device, autocast)
        contenders.append(contender)
    time_alternating(contenders, lambda c: step(c, batch, device, autocast), device, 1, study.calibration_steps)
    # A step of the runs is `accumulation` micro-batches on each of the job's processes.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    plan: dict[str, Any] = {"budget_s": study.budget_s, "machine": describe_machine(device), "methods": {}}
    for c in contenders:
        seconds = statistics.median(c.times) * accumulation
        steps = max(1, int(study.budget_s / seconds))
        plan["methods"][c.name] = {
            "seconds_per_step": seconds,
            "flops_per_step": c.flops_per_step * accumulation,
            "steps": steps,
            "probe_steps": sorted({max(1, round(f * steps)) for f in study.fractions}),
        }
    return plan


# ----------------------------------------------------------------------------- the study


class Study:
    """One study directory: its config, plan, points, and the runs that make them."""

    def __init__(self, study: StudyConfig, directory: Path) -> None:
        self.cfg, self.directory = study, Path(directory)

    def check(self) -> bool:
        """Refuse a directory of something else; True if it holds this study already (it resumes)."""
        path = self.directory
        if path.exists() and not (path / STUDY_FILE).exists() and any(path.iterdir()):
            raise ConfigError(f"{path} exists but is not a study of this tool; pass another --study-dir")
        if (path / STUDY_FILE).exists() and read_yaml(path / STUDY_FILE) != to_dict(self.cfg):
            raise ConfigError(
                f"{path} holds a study with a different configuration (budget, seeds, experiment...); "
                f"pass another --study-dir, or the same settings to resume it"
            )
        return (path / STUDY_FILE).exists()

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / STUDY_FILE).write_text(json.dumps(to_dict(self.cfg), indent=2))  # JSON is YAML

    def prepare_data(self) -> None:
        from launcher.data import prepare

        cfg = self.cfg.experiment_of(METHODS[0], self.cfg.seeds[0])
        for data in (cfg.data, self.cfg.probe.data):
            prepare(data, cfg.method.img_size)

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
        log.info("timing both methods side by side to turn the %.0f s budget into steps", self.cfg.budget_s)
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
        from launcher.embeddings import pooled_patch_tokens
        from launcher.trainer import Trainer
        from methods import build_method

        stop = stop or StopRequest()
        self.prepare_data()
        plan = self.plan()
        say(describe_plan(plan))
        cfg0 = self.cfg.experiment_of(METHODS[0], self.cfg.seeds[0])
        probe = ProbeSet(self.cfg.probe, cfg0.method.img_size)
        done = {(p["encoder"], p["seed"], p["step"]) for p in self.points()}
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        main = is_main_rank()  # every rank trains; rank 0 alone probes and writes the points
        if main and ("pixels", None, 0) not in done:
            self.add_point(self._point("pixels", None, 0, 0.0, 0.0, probe.score_pixels()))
        for seed in self.cfg.seeds:
            for method in METHODS:
                if stop.requested:
                    return False
                steps = plan["methods"][method]["steps"]
                cfg = self.cfg.experiment_of(method, seed, steps)
                if main and ("random init", seed, 0) not in done:  # the same initialisation for both methods
                    torch.manual_seed(seed)
                    initial = build_method(cfg.method).to(device).eval()
                    self.add_point(
                        self._point(
                            "random init",
                            seed,
                            0,
                            0.0,
                            0.0,
                            probe.score(pooled_patch_tokens(initial, probe.cfg.grid), device),
                        )
                    )
                    done.add(("random init", seed, 0))
                todo = [s for s in plan["methods"][method]["probe_steps"] if (method, seed, s) not in done]
                if not todo:
                    continue
                trainer = Trainer(cfg, self.directory / "runs" / f"{method}-seed{seed}", stop)
                trainer.resume()
                for target in todo:
                    result = trainer.fit(until_step=target)
                    if result.step < target:
                        return False  # stopped by a signal: resume later
                    if not main:
                        continue
                    model = trainer.accelerator.unwrap_model(trainer.model).eval()
                    flops = plan["methods"][method]["flops_per_step"] * result.step
                    point = self._point(
                        method,
                        seed,
                        result.step,
                        result.train_seconds,
                        flops,
                        probe.score(pooled_patch_tokens(model, probe.cfg.grid), device),
                    )
                    if hasattr(model, "teacher_patch_tokens"):  # PCAE's EMA teacher, as a diagnostic
                        encode = pooled_patch_tokens(model, probe.cfg.grid, model.teacher_patch_tokens)
                        teacher = probe.score(encode, device)
                        point["teacher"] = teacher.to_dict(probe.names)
                    model.train()
                    self.add_point(point)
                    say(
                        f"{method} seed {seed}: step {result.step}/{steps}, {result.train_seconds:.0f} s, "
                        f"probe mean R² {point['r2']['mean']:.3f}"
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
    lines = [f"plan: {plan['budget_s']:.0f} s of training per run, timed on {plan['machine']}"]
    for method, entry in plan["methods"].items():
        lines.append(
            f"  {method}: {entry['seconds_per_step']:.3f} s/step -> {entry['steps']} steps, "
            f"{entry['flops_per_step'] / 1e12:.2f} TFLOP/step; probed at steps {entry['probe_steps']}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def summarise(points: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per encoder, per step: mean and std over seeds of the headline R², seconds and FLOPs."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for p in points:
        groups.setdefault((p["encoder"], p["step"]), []).append(p)
    curves: dict[str, list[dict[str, float]]] = {}
    for (encoder, step), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        scores = [r["r2"]["mean"] for r in runs]
        curves.setdefault(encoder, []).append(
            {
                "step": step,
                "n": len(runs),
                "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "seconds": statistics.fmean(r["seconds"] for r in runs),
                "flops": statistics.fmean(r["flops"] for r in runs),
            }
        )
    return curves


def first_reach(curve: list[dict[str, float]], level: float) -> float | None:
    """The wall time at which a curve first reaches ``level``, linearly interpolated (None: never)."""
    previous = {"seconds": 0.0, "mean": curve[0]["mean"]} if curve else None
    for point in curve:
        if point["mean"] >= level:
            if previous is None or point["mean"] == previous["mean"] or previous is point:
                return point["seconds"]
            share = (level - previous["mean"]) / (point["mean"] - previous["mean"])
            return previous["seconds"] + min(max(share, 0.0), 1.0) * (point["seconds"] - previous["seconds"])
        previous = point
    return None


def write_report(directory: Path) -> Path:
    """``STUDY/report.md`` and ``STUDY/quality.png`` from ``STUDY/points.jsonl``."""
    study = Study(load_study(directory / STUDY_FILE), directory)
    points, plan = study.points(), json.loads((directory / PLAN).read_text())
    if not points:
        raise ConfigError(f"{directory} has no probe points yet: run `launch study pcae-vs-mae` first")
    curves = summarise(points)
    names = target_names(study.cfg.probe.data.name, study.cfg.probe.targets)
    headline = ", ".join(names[t] for t in study.cfg.probe.headline)
    lines = [
        f"# PCAE vs MAE at equal wall time: {directory.name}",
        "",
        describe_plan(plan),
        "",
        f"Probe: ridge on frozen embeddings (patch tokens over {study.cfg.probe.grid}x{study.cfg.probe.grid} "
        f"cells) of held-out episodes; test R², the mean over {headline}; mean ± std over seeds.",
        "",
        "| encoder | step | wall time (s) | TFLOP | mean R² | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for encoder in ("pcae", "mae", "random init", "pixels"):
        for c in curves.get(encoder, []):
            lines.append(
                f"| {encoder} | {c['step']} | {c['seconds']:.0f} | {c['flops'] / 1e12:.1f} | "
                f"{c['mean']:.3f} ± {c['std']:.3f} | {c['n']} |"
            )
    final = {m: curves[m][-1] for m in METHODS if m in curves}
    if len(final) == 2:
        reached = first_reach(curves["pcae"], final["mae"]["mean"])
        lines += [
            "",
            f"MAE's final score, {final['mae']['mean']:.3f} after {final['mae']['seconds']:.0f} s: "
            + (
                f"PCAE first reaches it after {reached:.0f} s ({reached / final['mae']['seconds']:.2f} of MAE's time)."
                if reached is not None
                else f"PCAE does not reach it within its budget (its best: "
                f"{max(c['mean'] for c in curves['pcae']):.3f})."
            ),
        ]
        if curves.get("random init"):
            # The comparison that says whether either learnt anything: a gain over the same encoder
            # untrained, in units of the seeds' spread.
            init = curves["random init"][-1]
            gains = ", ".join(
                f"{m.upper()} {final[m]['mean'] - init['mean']:+.3f} (seed std {final[m]['std']:.3f})" for m in METHODS
            )
            lines.append(
                f"Against the same encoder at its random initialisation ({init['mean']:.3f} ± {init['std']:.3f}): "
                f"{gains}. A gain within the seeds' spread is no gain."
            )
    lines += [
        "",
        "Per target (final points, mean over seeds):",
        "",
        "```",
        describe(_final_scores(points, study), names, study.cfg.probe.headline),
        "```",
        "",
        "![quality](quality.png)",
        "",
    ]
    (directory / "report.md").write_text("\n".join(lines))
    plot(curves, directory / "quality.png", headline)
    return directory / "report.md"


def _final_scores(points: list[dict[str, Any]], study: Study) -> dict[str, ProbeScore]:
    names = target_names(study.cfg.probe.data.name, study.cfg.probe.targets)
    last = {
        encoder: max(p["step"] for p in points if p["encoder"] == encoder) for encoder in {p["encoder"] for p in points}
    }
    scores = {}
    for encoder in ("pcae", "mae", "random init", "pixels"):
        if encoder not in last:
            continue
        runs = [p for p in points if p["encoder"] == encoder and p["step"] == last[encoder]]
        r2 = {t: statistics.fmean(p["r2"][names[t]] for p in runs) for t in study.cfg.probe.targets}
        scores[encoder] = ProbeScore(r2, study.cfg.probe.headline)
    return scores


def plot(curves: dict[str, list[dict[str, float]]], out: Path, headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "seconds", "training wall time (s)"), (axes[1], "flops", "training FLOPs")):
        for method, color in (("pcae", "tab:blue"), ("mae", "tab:orange")):
            curve = curves.get(method, [])
            if not curve:
                continue
            xs = [c[key] for c in curve]
            mean, std = [c["mean"] for c in curve], [c["std"] for c in curve]
            ax.plot(xs, mean, "o-", color=color, label=method.upper())
            ax.fill_between(
                xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color, alpha=0.2
            )
        for baseline, style in (("random init", "--"), ("pixels", ":")):
            if baseline in curves:
                c = curves[baseline][0]
                ax.axhline(c["mean"], color="gray", linestyle=style, label=f"{baseline} ({c['mean']:.3f})")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"probe test R², mean over {headline}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run_locally(study: Study, out) -> int:
    """The study on this machine: Ctrl-C or SIGTERM stops at the next step boundary, resumable."""
    import signal

    from launcher.stopping import install_stop_handlers

    stop = StopRequest()
    install_stop_handlers(stop, (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2))
    study.write()

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    if not study.run(stop, say):
        say(f"stopped; run the same command to resume the study in {study.directory}")
        return 0
    report = write_report(study.directory)
    say(report.read_text())
    say(f"written to {report} and {study.directory / 'quality.png'}")
    return 0
