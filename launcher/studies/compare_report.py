"""``launch study compare`` report: a study's probe points as ``STUDY/report.md`` and ``STUDY/quality.png``.

Per encoder (each contender, its EMA teacher where it has one, the random inits and raw pixels)
and per probed step: the mean and spread over seeds of the headline R² against wall time and
FLOPs, with verdicts in words.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from launcher.errors import ConfigError
from launcher.probe import ProbeScore, describe, target_names
from launcher.studies.compare import PIXELS, PLAN, STUDY_FILE, Study, StudyConfig, describe_plan, load_study


def with_teachers(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points, plus one point "NAME teacher" for each probe of a contender's EMA teacher."""
    out = []
    for p in points:
        out.append(p)
        if "teacher" in p:
            out.append({**p, "encoder": f"{p['encoder']} teacher", "r2": p["teacher"]})
    return out


def summarise(points: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per encoder, per step: mean and std over seeds of the headline R², seconds and FLOPs."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for p in with_teachers(points):
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


def ordered_encoders(study: StudyConfig, curves: dict[str, Any]) -> list[str]:
    """Contenders (each followed by its teacher), then the random inits, then pixels: those with points."""
    names = [n for c in study.contenders for n in (c, f"{c} teacher")]
    inits = sorted({study.init_label(c) for c in study.contenders}, key=len)
    return [n for n in (*names, *inits, PIXELS) if n in curves]


def verdicts(study: StudyConfig, curves: dict[str, list[dict[str, float]]]) -> list[str]:
    """In words: each contender against its own random initialisation, and whether longer helped."""
    lines = []
    for name in study.contenders:
        init_curve = curves.get(study.init_label(name))
        if name not in curves or not init_curve:
            continue
        final, first, init = curves[name][-1], curves[name][0], init_curve[0]
        gain = final["mean"] - init["mean"]
        spread = max(final["std"], init["std"])
        if final["n"] < 2:
            word = "one seed: no spread to judge the gain by"
        elif abs(gain) <= 2 * spread:
            word = "within twice the seeds' spread: no clear change"
        else:
            word = "better than its initialisation" if gain > 0 else "worse than its initialisation"
        trend = ""
        if len(curves[name]) > 1:
            change = final["mean"] - first["mean"]
            trend = f"; from step {first['step']} to {final['step']} {change:+.3f}"
        lines.append(
            f"- {name}: {final['mean']:.3f} ± {final['std']:.3f} after {final['step']} steps, "
            f"{gain:+.3f} against its random init ({init['mean']:.3f} ± {init['std']:.3f}): {word}{trend}."
        )
    if {"pcae", "mae"} <= set(study.contenders) and "pcae" in curves and "mae" in curves:
        mae = curves["mae"][-1]
        reached = first_reach(curves["pcae"], mae["mean"])
        lines.append(
            f"- MAE's final score, {mae['mean']:.3f} after {mae['seconds']:.0f} s: "
            + (
                f"PCAE first reaches it after {reached:.0f} s ({reached / mae['seconds']:.2f} of MAE's time)."
                if reached is not None
                else f"PCAE does not reach it within its budget (its best: "
                f"{max(c['mean'] for c in curves['pcae']):.3f})."
            )
        )
    return lines


def write_report(directory: Path) -> Path:
    """``STUDY/report.md`` and ``STUDY/quality.png`` from ``STUDY/points.jsonl``."""
    study = Study(load_study(directory / STUDY_FILE), directory)
    points, plan = study.points(), json.loads((directory / PLAN).read_text())
    if not points:
        raise ConfigError(f"{directory} has no probe points yet: run `launch study` on it first")
    curves = summarise(points)
    names = target_names(study.cfg.probe.data.name, study.cfg.probe.targets)
    headline = ", ".join(names[t] for t in study.cfg.probe.headline)
    budget = "equal steps" if plan.get("steps") else "equal wall time"
    lines = [
        f"# Contenders at {budget}: {directory.name}",
        "",
        "Contenders: " + "; ".join(f"`{n}`: `{text}`" for n, text in study.cfg.contenders.items()),
        "",
        describe_plan(plan),
        "",
        f"Probe: ridge on frozen embeddings ({study.cfg.probe.describe_readout()}) of held-out episodes; "
        f"test R², the mean over {headline}; mean ± std over seeds.",
        "",
        "| encoder | step | wall time (s) | TFLOP | mean R² | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for encoder in ordered_encoders(study.cfg, curves):
        for c in curves[encoder]:
            lines.append(
                f"| {encoder} | {c['step']} | {c['seconds']:.0f} | {c['flops'] / 1e12:.1f} | "
                f"{c['mean']:.3f} ± {c['std']:.3f} | {c['n']} |"
            )
    lines += ["", "A gain within the seeds' spread is no gain.", "", *verdicts(study.cfg, curves)]
    lines += [
        "",
        "Per target (final points, mean over seeds):",
        "",
        "```",
        describe(_final_scores(points, study, curves), names, study.cfg.probe.headline, study.cfg.probe.data.name),
        "```",
        "",
        "![quality](quality.png)",
        "",
    ]
    (directory / "report.md").write_text("\n".join(lines))
    plot(curves, ordered_encoders(study.cfg, curves), directory / "quality.png", headline)
    return directory / "report.md"


def _final_scores(points: list[dict[str, Any]], study: Study, curves: dict[str, Any]) -> dict[str, ProbeScore]:
    names = target_names(study.cfg.probe.data.name, study.cfg.probe.targets)
    points = with_teachers(points)
    scores = {}
    for encoder in ordered_encoders(study.cfg, curves):
        last = curves[encoder][-1]["step"]
        runs = [p for p in points if p["encoder"] == encoder and p["step"] == last]
        r2 = {t: statistics.fmean(p["r2"][names[t]] for p in runs) for t in study.cfg.probe.targets}
        scores[encoder] = ProbeScore(r2, study.cfg.probe.headline)
    return scores


def plot(curves: dict[str, list[dict[str, float]]], encoders: list[str], out: Path, headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    trained = [e for e in encoders if curves[e][-1]["step"] > 0]
    baselines = [e for e in encoders if e not in trained]
    colours = plt.get_cmap("tab10")
    for ax, key, label in ((axes[0], "seconds", "training wall time (s)"), (axes[1], "flops", "training FLOPs")):
        for i, encoder in enumerate(trained):
            curve = curves[encoder]
            xs = [c[key] for c in curve]
            mean, std = [c["mean"] for c in curve], [c["std"] for c in curve]
            style = "o--" if encoder.endswith(" teacher") else "o-"
            ax.plot(xs, mean, style, color=colours(i % 10), label=encoder)
            ax.fill_between(
                xs,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=colours(i % 10),
                alpha=0.15,
            )
        for j, baseline in enumerate(baselines):
            c = curves[baseline][0]
            ax.axhline(
                c["mean"], color="gray", linestyle=("--", ":", "-.")[min(j, 2)], label=f"{baseline} ({c['mean']:.3f})"
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"probe test R², mean over {headline}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
