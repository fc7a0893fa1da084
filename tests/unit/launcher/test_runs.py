"""Run directories: a damaged ``RUN/config.yaml`` and a run directory this user cannot write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    launch,
    launch_as_another_user,
    make_image_folder,
    readable_by_all,
    tiny_experiment,
    write_yaml,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(experiment file, run directory) of a tiny MAE run trained to its end from the command line."""
    tmp = tmp_path_factory.mktemp("runs")
    experiment = write_yaml(tmp / "mae.yaml", tiny_experiment("mae", make_image_folder(tmp / "images")))
    assert launch(f"pretrain mae --experiment {experiment} --run-dir {tmp / 'run'}") == 0
    return experiment, tmp / "run"


DAMAGE = {
    "empty": (b"", "is empty"),
    "a list": (b"- method\n- data\n", "holds a list, not a mapping"),
    "no method": (b"data: {name: imagefolder}\ntrain: {seed: 0}\n", "has no method.name"),
    "binary": (bytes(range(256)), "is not UTF-8 text"),
}
COMMANDS = {
    "export": "export {run} --out {tmp}/encoder",
    "finetune": "finetune {run} --run-dir {tmp}/ft",
    "finetune --run-dir": "finetune {source} --run-dir {run}",
    "resume": "resume {run}",
    "pretrain --run-dir": "pretrain mae --experiment {experiment} --run-dir {run}",
    "status": "status {run}",
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_config_is_one_paragraph_and_changes_nothing(
    finished, tmp_path: Path, capsys, damage: str, command: str
) -> None:
    experiment, source = finished
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "launch.json").write_text(json.dumps({"cluster": "c", "jobs": []}))  # `launch resume` wants one
    content, problem = DAMAGE[damage]
    (run / "config.yaml").write_bytes(content)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert launch(COMMANDS[command].format(run=run, tmp=tmp_path, experiment=experiment, source=source)) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'} {problem}" in err and "Traceback" not in err
    assert "--dry-run" in err and f"> {run / 'config.yaml'}" in err  # how to write it again
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (run / "config.yaml").read_bytes() == content


def test_the_advice_for_an_empty_run_config_writes_it_again(finished, tmp_path: Path, capsys, monkeypatch) -> None:
    experiment, source = finished
    run = tmp_path / "run"
    shutil.copytree(source, run)
    original = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text("")
    command = f"pretrain mae --experiment {experiment} --run-dir {run}"
    assert launch(command) == 2
    err = capsys.readouterr().err
    assert "the command that started the run" in err and "without --run-dir" in err
    # As the message says: the same command with --dry-run and no --run-dir prints the config to keep.
    monkeypatch.chdir(tmp_path)
    assert launch(f"pretrain mae --experiment {experiment} --dry-run") == 0
    (run / "config.yaml").write_text(capsys.readouterr().out)
    assert yaml.safe_load((run / "config.yaml").read_text()) == original
    assert launch(command) == 0
    assert "(resuming)" in capsys.readouterr().out
    assert not (run / "config_history.yaml").exists()  # nothing changed


def test_status_of_every_run_shows_the_others_when_one_is_damaged(
    finished, shared_tmp: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    profile = {"partition": "p", "runs_dir": str(shared_tmp), "max_nodes": 1, "time_min": 10}
    write_yaml(clusters / "c.yaml", profile)
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(clusters))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no sacct: the state is unknown, the rest is shown
    for name in ("good", "damaged"):
        shutil.copytree(finished[1], shared_tmp / name)
        (shared_tmp / name / "launch.json").write_text(json.dumps({"cluster": "c", "jobs": []}))
    (shared_tmp / "damaged" / "config.yaml").write_text("")
    assert launch("status") == 2
    captured = capsys.readouterr()
    assert f"{shared_tmp / 'good'}: job None on c NOT SUBMITTED, step 8" in captured.out
    assert f"{shared_tmp / 'damaged'}: {shared_tmp / 'damaged' / 'config.yaml'} is empty" in captured.err


@pytest.fixture
def shared_run(finished, shared_tmp: Path) -> tuple[Path, Path]:
    """(experiment, run) copied into a folder every user may read and only root may write."""
    experiment, source = finished
    images = shared_tmp / "images"
    shutil.copytree(yaml.safe_load(experiment.read_text())["data"]["root"], images)
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["data"]["root"] = str(images)
    experiment = write_yaml(shared_tmp / "mae.yaml", config)
    run = shared_tmp / "run"
    shutil.copytree(source, run)
    write_yaml(run / "config.yaml", config)
    profile = {"partition": "p", "runs_dir": str(shared_tmp), "max_nodes": 1, "time_min": 10}
    resources = {"cluster": "c", "nodes": 1, "gpus_per_node": 0, "partition": "p", "time_min": 10}
    (run / "launch.json").write_text(json.dumps({"cluster": "c", "profile": profile, "resources": resources}))
    readable_by_all(shared_tmp)
    return experiment, run


@pytest.mark.parametrize(
    "command, unwritable",
    [("pretrain --run-dir", "the run directory"), ("pretrain --run-dir", "its lock"), ("resume", "the run directory")],
)
def test_resuming_a_run_this_user_cannot_write_is_one_paragraph(shared_run, command: str, unwritable: str) -> None:
    experiment, run = shared_run
    if unwritable == "its lock":
        run.chmod(0o777)  # the folder is anyone's; the lock file a previous owner left is not
        (run / ".lock").write_text("")
        (run / ".lock").chmod(0o644)
    before = sorted(p.name for p in run.iterdir())
    args = ["resume", run] if command == "resume" else ["pretrain", "mae", "--experiment", experiment, "--run-dir", run]
    result = launch_as_another_user(*args)
    assert result.returncode == 2, result.stderr
    blocked = run if unwritable == "the run directory" else run / ".lock"
    assert f"cannot resume the run in {run}: {blocked} is not writable by this user" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before
