"""launch data shard and data.name=shards: WebDataset tars with one index, read by offset; a killed
conversion resumes without rewriting a finished shard; foreign folders are refused."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launcher.data import DataConfig, open_dataset
from launcher.data import shards as shards_module
from launcher.data.shards import INDEX, read_index, write_shards
from launcher.experiment import experiment_from_dict
from launcher.runs import read_metrics
from launcher.trainer import Trainer
from tests.helpers import launch, tiny_experiment
from tests.unit.launcher.data.test_decode import spoiled


def test_shards_hold_every_file_in_webdataset_form_and_the_index_finds_it(image_folder: Path, tmp_path: Path) -> None:
    assert (
        launch("data shard", image_folder, "--out", tmp_path / "shards", "--shard-size", "0.02", "--workers", "1") == 0
    )
    folder = open_dataset(DataConfig(name="imagefolder", root=str(image_folder)), 32)
    sharded = open_dataset(DataConfig(name="shards", root=str(tmp_path / "shards")), 32)
    assert len(sharded) == len(folder) == 36 and sharded.classes == folder.classes
    assert len(sharded.shards) > 2  # 20 KB each
    for index, (path, label) in enumerate(folder.samples):
        encoded, got = sharded.encoded(index)
        assert encoded.data == Path(path).read_bytes() and int(got) == label
    with tarfile.open(sharded.shards[0]) as tar:  # what a WebDataset reader sees: KEY.EXT beside KEY.cls
        names = tar.getnames()
        assert names[:4] == ["000000000.jpg", "000000000.cls", "000000001.png", "000000001.cls"]
        assert tar.extractfile("000000001.cls").read() == b"0"


def test_pre_resizing_keeps_the_shortest_side_at_most_max_side(tmp_path: Path) -> None:
    root = spoiled(tmp_path / "images")  # 120 x 90 images, a PNG, a CMYK, a grey and two broken files
    total, unreadable = write_shards(root, tmp_path / "shards", max_side=60, quality=80)
    assert (total, unreadable) == (13, 2)
    sharded = open_dataset(DataConfig(name="shards", root=str(tmp_path / "shards")), 32)
    sizes = []
    for index in range(total):
        try:
            image, _ = sharded[index]
            sizes.append(image.size)
        except Exception as e:  # the two broken files, stored as they were
            assert type(e).__name__ == "BadSample"
    assert len(sizes) == 11 and set(sizes) == {(80, 60)}


def stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*.tar"))}


def test_a_killed_conversion_resumes_without_rewriting_a_finished_shard(
    image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    write_shards(image_folder, tmp_path / "straight", shard_size_mb=0.02)
    finish = shards_module.finish_shard
    calls = []

    def killed_after_two(*args) -> None:
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between two shards; the third is half-written
        calls.append(args)
        finish(*args)

    monkeypatch.setattr(shards_module, "finish_shard", killed_after_two)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        write_shards(image_folder, out, shard_size_mb=0.02)
    assert (out / "shard-000002.tar.partial").is_file() and not (out / INDEX).exists()
    before = stats(out)
    assert list(before) == ["shard-000000.tar", "shard-000001.tar"]
    monkeypatch.setattr(shards_module, "finish_shard", finish)
    with pytest.raises(Exception, match="did not finish"):  # not readable until it is whole
        open_dataset(DataConfig(name="shards", root=str(out)), 32)

    assert launch("data shard", image_folder, "--out", out, "--shard-size", "0.02", "--workers", "2") == 0
    after = stats(out)
    assert {name: after[name] for name in before} == before  # finished shards untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())
    for name in after:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    (meta, arrays), (meta_straight, arrays_straight) = read_index(out), read_index(tmp_path / "straight")
    assert meta == meta_straight and all(np.array_equal(arrays[k], arrays_straight[k]) for k in arrays)
    assert launch("data shard", image_folder, "--out", out, "--shard-size", "0.02") == 0  # complete: nothing to do
    assert stats(out) == after


def test_foreign_folders_and_other_settings_are_refused_and_nothing_is_written(
    image_folder: Path, tmp_path: Path, capsys
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert launch("data shard", image_folder, "--out", foreign) == 2
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert "holds no shards of `launch data shard`" in capsys.readouterr().err

    assert launch("data shard", image_folder, "--out", tmp_path / "shards") == 0
    assert launch("data shard", image_folder, "--out", tmp_path / "shards", "--max-side", "32") == 2
    assert "max_side: None" in capsys.readouterr().err
    assert launch("data shard", tmp_path / "missing", "--out", tmp_path / "new") == 2
    assert launch("data shard", image_folder, "--out", tmp_path / "new", "--quality", "0") == 2
    assert not (tmp_path / "new").exists()
    assert json.loads((tmp_path / "shards" / "shards.json").read_text())["num_samples"] == 36


@pytest.mark.parametrize("method, decode", [("mae", "full"), ("pcae", "device")])
def test_shards_of_a_folder_with_bad_files_train_with_them_counted_and_replaced(
    method: str, decode: str, tmp_path: Path
) -> None:
    root = spoiled(tmp_path / "images")
    assert launch("data shard", root, "--out", tmp_path / "shards", "--max-side", "64", "--workers", "1") == 0
    raw = tiny_experiment(method, tmp_path / "shards", data={"name": "shards", "augment": "mae", "decode": decode})
    raw["train"].update(global_batch_size=4, micro_batch_size=2, num_epochs=2)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(json.dumps(raw))
    assert launch(f"pretrain {method} --local --experiment {experiment} --run-dir {tmp_path / 'run'}") == 0
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, 7)) and all(np.isfinite(m["loss"]) for m in metrics)
    trainer = Trainer(experiment_from_dict(raw), tmp_path / "run")
    assert trainer.resume() and trainer.state.bad_samples > 0


def test_a_cut_short_shard_is_a_bad_sample_not_a_crash(image_folder: Path, tmp_path: Path) -> None:
    write_shards(image_folder, tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    sharded = open_dataset(DataConfig(name="shards", root=str(tmp_path / "shards")), 32)
    assert isinstance(sharded[0][0], Image.Image)
    with pytest.raises(Exception, match="cut short") as caught:
        sharded[35]
    assert type(caught.value).__name__ == "BadSample" and torch.is_tensor(sharded.labels)
