"""Trackers with the real packages and no server: W&B offline, MLflow on a local file store.

A run stopped part-way and resumed must leave one tracker run holding every logged step, the
evaluation and the resolved config; a tracker that cannot start is refused before anything is written.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from launcher.experiment import experiment_from_dict
from launcher.runs import read_metrics
from launcher.tracking import TRACKERS_JSON, read_ids
from launcher.trainer import Trainer
from tests.helpers import finetune_experiment, launch, make_image_folder, tiny_experiment, write_yaml

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

BLOCK = 32768  # W&B's transaction log is LevelDB's log format: 32 KiB blocks of records with 7-byte headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every record of an offline W&B run file (``run-ID.wandb``), decoded with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> tuple[set[str], dict[int, dict[str, float]], dict]:
    """(run ids, step -> logged values, config) over every offline W&B file of ``run_dir``."""
    ids, steps, config = set(), {}, {}
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                steps.setdefault(int(values["_step"]), {}).update(values)
    return ids, steps, config


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "mlruns"


def test_a_resumed_run_logs_into_the_same_wandb_and_mlflow_runs(tmp_path: Path, offline: Path) -> None:
    from mlflow import MlflowClient

    images = make_image_folder(tmp_path / "images")
    raw = finetune_experiment(images)
    raw["train"].update(
        trackers=["tensorboard", "wandb", "mlflow"], mlflow_uri=offline.as_uri(), mlflow_experiment="tests"
    )
    cfg = experiment_from_dict(raw)
    run_dir = tmp_path / "run-resumed"
    first = Trainer(cfg, run_dir)
    first.fit(until_step=3)  # stops part-way with a checkpoint, as a preempted run does
    ids = read_ids(run_dir)
    second = Trainer(cfg, run_dir)
    assert second.resume()
    result = second.fit()
    assert result.finished and read_ids(run_dir) == ids  # the same tracker runs, not new ones

    logged = {m["step"]: m["loss"] for m in read_metrics(run_dir)}
    assert sorted(logged) == list(range(1, result.total_steps + 1))
    evaluation = json.loads((run_dir / "eval.json").read_text())

    run_ids, steps, config = wandb_history(run_dir)
    assert run_ids == {ids["wandb"]["id"]}
    assert {s: v["train/loss"] for s, v in steps.items() if "train/loss" in v} == pytest.approx(logged)
    assert steps[result.total_steps]["eval/acc1"] == pytest.approx(evaluation["acc1"])
    assert config["train"]["trackers"] == ["tensorboard", "wandb", "mlflow"] and config["method"]["name"] == "finetune"

    client = MlflowClient(tracking_uri=offline.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "tests"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.run_name == run_dir.name
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train.loss")}
    assert history == pytest.approx(logged)
    assert run.data.metrics["eval.acc1"] == pytest.approx(evaluation["acc1"])
    assert run.data.params["train.global_batch_size"] == str(cfg.train.global_batch_size)
    assert run.data.params["method.name"] == "finetune"


@pytest.mark.parametrize(
    "setting, environment, message",
    [
        ("train.mlflow_uri=file://{tmp}/a-file/mlruns", {"WANDB_MODE": "offline"}, "train.mlflow_uri"),
        ("train.mlflow_uri=nope://host", {"WANDB_MODE": "offline"}, "train.mlflow_uri"),
        ("", {"WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": "/nonexistent"}, "WANDB_API_KEY"),
    ],
    ids=["unwritable-file-store", "bad-mlflow-uri", "no-wandb-credentials"],
)
def test_a_tracker_that_cannot_start_exits_2_before_anything_is_written(
    tmp_path: Path, monkeypatch, capsys, setting: str, environment: dict, message: str
) -> None:
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    images = make_image_folder(tmp_path / "images")
    (tmp_path / "a-file").write_text("a file where the store's folder would be")
    experiment = write_yaml(tmp_path / "tiny.yaml", tiny_experiment("mae", images))
    run_dir = tmp_path / "run"
    args = ["train.trackers=[tensorboard,wandb,mlflow]", *([setting.format(tmp=tmp_path)] if setting else [])]
    code = launch("pretrain mae --local", "--experiment", experiment, "--run-dir", run_dir, *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists() and not (tmp_path / TRACKERS_JSON).exists()
