"""Checkpoint directories: sealed, validated, pruned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher import checkpoint


def write_checkpoint(run_dir: Path, step: int, payload: bytes = b"weights") -> Path:
    tmp = checkpoint.temporary_path(run_dir, step)
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(payload)
    final = checkpoint.checkpoint_path(run_dir, step)
    checkpoint.seal(tmp, final, {"step": step, "epoch": 0, "step_in_epoch": step})
    return final


def test_seal_makes_a_valid_checkpoint_and_removes_the_temporary(tmp_path: Path) -> None:
    final = write_checkpoint(tmp_path, 5)
    assert checkpoint.validate(final) is None
    assert not checkpoint.temporary_path(tmp_path, 5).exists()
    assert checkpoint.read_trainer_state(final)["step"] == 5


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "model.safetensors").write_bytes(b"weightz"), "checksum"),
        (lambda p: (p / "model.safetensors").write_bytes(b"w"), "bytes"),
        (lambda p: (p / "model.safetensors").unlink(), "missing"),
        (lambda p: (p / checkpoint.MANIFEST).unlink(), "no manifest"),
        (lambda p: (p / checkpoint.MANIFEST).write_text("{"), "unreadable"),
    ],
)
def test_damaged_newest_checkpoint_is_skipped(tmp_path: Path, damage, reason: str, caplog) -> None:
    good = write_checkpoint(tmp_path, 10)
    newest = write_checkpoint(tmp_path, 20)
    damage(newest)
    assert reason in checkpoint.validate(newest)
    assert checkpoint.latest_valid(tmp_path) == good
    assert "skipping checkpoint" in caplog.text


def test_half_written_temporary_is_never_listed(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)
    checkpoint.temporary_path(tmp_path, 20).mkdir(parents=True)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000010"]


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 10):
        write_checkpoint(tmp_path, step)
    checkpoint.temporary_path(tmp_path, 11).mkdir()
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000010", "step_0000003"]
    assert not checkpoint.temporary_path(tmp_path, 11).exists()


def test_every_file_of_a_checkpoint_is_readable_like_the_rest_of_the_run(tmp_path: Path) -> None:
    tmp, final = checkpoint.temporary_path(tmp_path, 3), checkpoint.checkpoint_path(tmp_path, 3)
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"weights")
    (tmp / "model.safetensors").chmod(0o600)  # as safetensors writes it
    checkpoint.seal(tmp, final, {"step": 3})
    mask = os.umask(0)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in final.iterdir())


def test_a_checkpoint_is_hashed_once_when_sealed_and_once_at_resume(tmp_path: Path, monkeypatch) -> None:
    """Saving never re-reads the previous checkpoint, and building a trainer and resuming verify the
    newest one once, not once for the model's initialisation and again for the resume."""
    from launcher.experiment import experiment_from_dict
    from launcher.trainer import Trainer
    from tests.helpers import make_image_folder, tiny_experiment

    hashed: list[Path] = []
    sha256 = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(Path(path)) or sha256(path))
    images = make_image_folder(tmp_path / "images", per_class=8)
    raw = tiny_experiment("pcae", images, train={"num_epochs": 1, "checkpoint_every": 1, "num_checkpoints_kept": 3})
    run = tmp_path / "run"
    Trainer(experiment_from_dict(raw), run).fit()  # 3 steps, 3 checkpoints
    sealed = [p for p in hashed if p.parent.name.startswith(checkpoint.TMP_PREFIX)]
    assert len(sealed) == len(hashed) == len(set(hashed)), "a file was hashed twice, or after its seal"
    assert sorted({p.parent.name for p in sealed}) == [f".tmp_step_000000{k}" for k in (1, 2, 3)]

    hashed.clear()
    trainer = Trainer(experiment_from_dict(raw), run)
    assert trainer.resume() and trainer.state.step == 3
    newest = checkpoint.checkpoint_path(run, 3)
    assert sorted(hashed) == sorted(p for p in newest.iterdir() if p.name != checkpoint.MANIFEST)
