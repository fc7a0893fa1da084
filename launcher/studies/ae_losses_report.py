"""``launch report SWEEP``: a sweep's results as a Markdown table and PNG plots.

The table has the paper's shape: one row per procedure, one column per data set, each cell
the test score of the best predictor (accuracy or R²) as mean ± std over seeds, with the
autoencoder's wall-clock training time per epoch; one table per (z, γ) of the grid. Next to
the predictors stands the project's cheap probe on the same embeddings (``launcher/probe.py``:
ridge; LunarLander: mean R² over x, y, vx, vy, angle; classes: accuracy), so both papers'
encoders are judged on the same kind of evidence.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.methods.autoencoders import PROCEDURES


def label(procedure: str) -> str:
    return PROCEDURES[procedure].label if procedure in PROCEDURES else procedure


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(trials: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    """{(z, gamma): {procedure: {dataset: {score, score_std, seconds, n, score_name}}}}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for t in trials:
        c = t["config"]
        groups[(c["z"], c["gamma"], c["procedure"], c["dataset"])].append(t)
    table: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    for (z, gamma, procedure, dataset), runs in groups.items():
        score, score_std = _mean_std([r["score"] for r in runs])
        seconds, seconds_std = _mean_std([r["seconds_per_epoch"] for r in runs])
        probes = [r.get("probe_r2_mean", r.get("probe_accuracy")) for r in runs]
        probe, probe_std = _mean_std(probes) if None not in probes else (None, None)
        table[(z, gamma)][procedure][dataset] = {
            "score": score,
            "score_std": score_std,
            "probe": probe,
            "probe_std": probe_std,
            "seconds": seconds,
            "seconds_std": seconds_std,
            "n": len(runs),
            "score_name": runs[0]["score_name"],
        }
    return table


def markdown(table: dict[tuple, dict[str, dict[str, Any]]]) -> str:
    lines = []
    for (z, gamma), rows in sorted(table.items()):
        datasets = sorted({d for cells in rows.values() for d in cells})
        score_names = {d: c[d]["score_name"] for c in rows.values() for d in c}
        header = "".join(f" {d} {score_names[d]} | {d} ridge probe | {d} s/epoch |" for d in datasets)
        lines += [f"### z = {z}, γ = {gamma}", "", f"| procedure |{header}", "|---|" + "---|---|---|" * len(datasets)]
        ranked = sorted(rows, key=lambda p: -statistics.fmean(c["score"] for c in rows[p].values()))
        for procedure in ranked:
            cells = []
            for d in datasets:
                c = rows[procedure].get(d)
                if c is None:
                    cells += ["–", "–", "–"]
                    continue
                probe = "–" if c["probe"] is None else f"{c['probe']:.3f} ± {c['probe_std']:.3f}"
                cells += [
                    f"{c['score']:.3f} ± {c['score_std']:.3f} (n={c['n']})",
                    probe,
                    f"{c['seconds']:.2f} ± {c['seconds_std']:.2f}",
                ]
            lines.append(f"| {label(procedure)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table: dict[tuple, dict[str, dict[str, Any]]], out: Path) -> list[Path]:
    """One PNG per (data set, z, γ): score against training time per epoch, one point per procedure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (z, gamma), rows in sorted(table.items()):
        for dataset in sorted({d for cells in rows.values() for d in cells}):
            fig, ax = plt.subplots(figsize=(5, 4))
            for procedure, cells in sorted(rows.items()):
                if dataset in cells:
                    c = cells[dataset]
                    ax.errorbar(
                        c["seconds"], c["score"], xerr=c["seconds_std"], yerr=c["score_std"], fmt="o", capsize=3
                    )
                    ax.annotate(
                        label(procedure),
                        (c["seconds"], c["score"]),
                        textcoords="offset points",
                        xytext=(5, 5),
                        fontsize=8,
                    )
            name = next(c[dataset]["score_name"] for c in rows.values() if dataset in c)
            ax.set(
                xlabel="autoencoder training time per epoch (s)",
                ylabel=f"test {name} (best predictor)",
                title=f"{dataset}, z={z}, γ={gamma}",
            )
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out / f"{dataset}_z{z}_gamma{gamma}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def write_report(sweep_path: Path) -> Path:
    from launcher.tune.driver import read_trials

    trials = read_trials(sweep_path)
    if not trials:
        raise UserError(f"{sweep_path} holds no finished trials: run `launch tune ...` first, or check the path")
    table = summarise(trials)
    out = Path(sweep_path) / "report"
    out.mkdir(exist_ok=True)
    images = plot(table, out)
    text = (
        f"# Sweep {Path(sweep_path).name}: {len(trials)} finished trials\n\n"
        "Test score of the best predictor (chosen on validation) on frozen μ embeddings, mean ± std over "
        "seeds, and the autoencoder's wall-clock training time per epoch. Rows ranked by mean score.\n\n"
        + markdown(table)
        + "\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    )
    (out / "report.md").write_text(text)
    return out / "report.md"
