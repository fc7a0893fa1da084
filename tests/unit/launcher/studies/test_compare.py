"""Contenders compared (the PCAE-vs-MAE study): a plan from timing, points that are a function of the seeds, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from launcher.errors import ConfigError
from launcher.methods import build_method
from launcher.studies.compare import PLAN, POINTS, Study, load_study
from launcher.studies.compare_report import write_report


def tiny_study(tmp_path: Path, **changes) -> Path:
    frames = {"name": "lunarlander", "augment": "none", "num_workers": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}
    study = {
        "name": "tiny",
        "budget_s": 1,
        "seeds": [0, 1],
        "fractions": [0.5, 1.0],
        "experiment": {
            "method": {
                "size": "micro",
                "img_size": 32,
                "patch_size": 8,
                "decoder_dim": 32,
                "decoder_depth": 1,
                "decoder_num_heads": 2,
                "drop_path": 0.0,
            },
            "data": {**frames, "root": str(tmp_path / "train"), "generate_frames": 96},
            "optim": {"warmup_epochs": 0.5},
            "train": {"num_epochs": 1, "global_batch_size": 16, "micro_batch_size": 16, "log_every": 1},
        },
        "contenders": {"pcae": "pcae method.decoder_drop_path=0.0", "mae": "mae"},
        "probe": {
            "data": {
                **frames,
                "root": str(tmp_path / "probe"),
                "generate_frames": 600,
                "generate_seed": 5,
            },
            "targets": [0, 1, 2, 3, 4],
            "pixels": 8,
        },
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def recorded_plan(directory: Path) -> None:
    """The plan as a calibration would record it, with fixed step counts."""
    directory.mkdir(parents=True, exist_ok=True)
    method = {"seconds_per_step": 0.1, "flops_per_step": 1e9, "steps": 4, "probe_steps": [2, 4]}
    plan = {"budget_s": 1, "machine": "test", "methods": {"pcae": method, "mae": method}}
    (directory / PLAN).write_text(json.dumps(plan))


def test_both_methods_start_from_the_same_encoder(tmp_path: Path) -> None:
    study = load_study(tiny_study(tmp_path))
    encoders = []
    for method in ("pcae", "mae"):
        torch.manual_seed(0)
        model = build_method(study.experiment_of(method, 0).method)
        encoders.append(model.student if method == "pcae" else model.encoder)
    for (name, a), (_, b) in zip(encoders[0].state_dict().items(), encoders[1].state_dict().items()):
        assert torch.equal(a, b), name


def test_a_contender_that_changes_the_encoder_gets_its_own_random_init(tmp_path: Path) -> None:
    contenders = {"pcae": "pcae", "pcae-p4": "pcae method.patch_size=4", "mae": "mae method.mask_ratio=0.5"}
    study = load_study(tiny_study(tmp_path, contenders=contenders))
    assert [study.init_label(c) for c in contenders] == ["random init", "random init (patch_size=4)", "random init"]


def test_a_bad_contender_fails_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="contender 'slow' .*momentum"):
        load_study(tiny_study(tmp_path, contenders={"slow": "pcae method.momentum=2"}))
    with pytest.raises(ConfigError, match="contender 'x' .*unknown"):
        load_study(tiny_study(tmp_path, contenders={"x": "nosuchmethod"}))


def test_the_calibration_turns_the_budget_into_steps_per_method(tmp_path: Path) -> None:
    study = Study(load_study(tiny_study(tmp_path, budget_s=2)), tmp_path / "study")
    study.prepare_data()
    plan = study.plan()
    assert json.loads((tmp_path / "study" / PLAN).read_text()) == plan
    for method in ("pcae", "mae"):
        entry = plan["methods"][method]
        assert entry["steps"] == max(1, int(2 / entry["seconds_per_step"]))
        assert entry["flops_per_step"] > 0 and entry["probe_steps"][-1] == entry["steps"]


def points_of(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / POINTS).read_text().splitlines()]


@pytest.mark.slow  # three short studies, one killed: 20 s
def test_points_are_a_function_of_the_seeds_and_a_killed_study_resumes(tmp_path: Path, monkeypatch) -> None:
    cfg = load_study(tiny_study(tmp_path))
    first = Study(cfg, tmp_path / "first")
    recorded_plan(first.directory)
    assert first.run()
    points = points_of(first.directory)
    # pixels, then per seed: random init, PCAE at steps 2 and 4, MAE at 2 and 4
    assert [(p["encoder"], p["seed"], p["step"]) for p in points][:6] == [
        ("pixels", None, 0),
        ("random init", 0, 0),
        ("pcae", 0, 2),
        ("pcae", 0, 4),
        ("mae", 0, 2),
        ("mae", 0, 4),
    ]
    assert len(points) == 1 + 2 * 5 and "teacher" in points[2]

    # The same plan, killed after its first PCAE point, then run again: the same numbers.
    second = Study(cfg, tmp_path / "second")
    recorded_plan(second.directory)

    class Killed(Exception):
        pass

    def die_after_first_pcae_point(text: str) -> None:
        if text.startswith("pcae seed 0: step 2/"):
            raise Killed

    with pytest.raises(Killed):
        second.run(say=die_after_first_pcae_point)
    assert len(points_of(second.directory)) == 3
    from launcher.trainer import Trainer

    steps = []
    original = Trainer._train_step
    monkeypatch.setattr(Trainer, "_train_step", lambda self, *a: steps.append(1) or original(self, *a))
    assert second.run()
    assert len(steps) == 2 * 4 * 2 - 2  # everything but PCAE seed 0's first two steps, trained once already
    strip = lambda ps: [{k: v for k, v in p.items() if k != "seconds"} for p in ps]  # noqa: E731
    assert strip(points_of(second.directory)) == strip(points)


def test_the_report_has_the_table_the_plot_and_the_verdict(tmp_path: Path) -> None:
    study = Study(load_study(tiny_study(tmp_path, seeds=[0])), tmp_path / "study")
    recorded_plan(study.directory)
    study.write()
    assert study.run()
    report = write_report(study.directory).read_text()
    assert "| pcae | 4 |" in report and "| mae | 4 |" in report and "| random init | 0 |" in report
    assert "MAE's final score" in report and (study.directory / "quality.png").stat().st_size > 10_000
    assert "| pcae teacher | 4 |" in report and "against its random init" in report


def test_the_command_line_dry_runs_locally_and_on_slurm(tmp_path: Path, shared_tmp: Path, monkeypatch, capsys) -> None:
    from tests.helpers import launch

    monkeypatch.setenv("PATH", str(shared_tmp))  # no SLURM: the dry run still renders the script
    experiment = tiny_study(tmp_path)
    assert (
        launch(
            "study pcae-vs-mae --dry-run --budget 90s --seeds 0 --experiment", experiment, "--study-dir", tmp_path / "s"
        )
        == 0
    )
    assert "study tiny from" in capsys.readouterr().out and not (tmp_path / "s").exists()
    assert (
        launch(
            "study pcae-vs-mae --dry-run --cluster local-test --nodes 1 --experiment",
            experiment,
            "--study-dir",
            shared_tmp / "s",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "# study tiny from" in out and "#SBATCH --nodes=1\n" in out and not (shared_tmp / "s").exists()
    assert launch("study pcae-vs-mae --dry-run --cluster local-test --nodes 3 --experiment", experiment) == 2
    assert "not a multiple of train.micro_batch_size x processes (16 x 3)" in capsys.readouterr().err
    assert launch("study pcae-vs-mae --budget soon --experiment", experiment) == 2
    assert "--budget 'soon' is not a wall time" in capsys.readouterr().err


def test_a_study_resumes_with_more_seeds_but_refuses_other_settings(tmp_path: Path) -> None:
    directory = tmp_path / "study"
    Study(load_study(tiny_study(tmp_path, seeds=[0])), directory).write()
    assert Study(load_study(tiny_study(tmp_path, seeds=[0, 1, 2])), directory).check()
    with pytest.raises(ConfigError, match="different configuration"):
        Study(load_study(tiny_study(tmp_path, seeds=[0], budget_s=2)), directory).check()
