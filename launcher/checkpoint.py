"""Checkpoint directories: atomic writes, validation, finding the newest good one, pruning.

A checkpoint is ``RUN/checkpoints/step_XXXXXXX/``: Accelerate's state (model,
optimizer, scaler, every rank's RNG) plus ``trainer_state.json``. It is written under
a temporary name and renamed into place once complete; its ``manifest.json``, written
last, records each file's size and SHA-256, so a truncated or altered checkpoint is
recognised and skipped instead of loaded. Each file is hashed once, when the checkpoint is
sealed, by the rank that wrote it; ``validate`` reads every byte again, so a resume runs it on
one rank only (the trainer shares the verdict).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp_"


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"{PREFIX}{step:07d}"


def temporary_path(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"{TMP_PREFIX}{PREFIX}{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def written_by(tmp: Path, rank: int) -> list[str]:
    """The files of a checkpoint being written into ``tmp`` that ``rank`` wrote (Accelerate's ``save_state``:
    every rank its RNG state ``random_states_K.pkl``, the main process everything else)."""
    if rank > 0:
        return [name for name in (f"random_states_{rank}.pkl",) if (tmp / name).is_file()]
    others = re.compile(r"random_states_([1-9]\d*)\.pkl")
    names = (str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return sorted(name for name in names if not others.fullmatch(name) and name != MANIFEST)


def describe(tmp: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of files this process wrote into ``tmp``, made durable first and given the mode
    of any file this process creates (safetensors writes 0600). The one time a checkpoint is hashed."""
    mode = 0o666 & ~current_umask()
    files = {}
    for name in names:
        path = tmp / name
        path.chmod(mode)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def seal(tmp: Path, final: Path, trainer_state: dict, files: dict[str, dict] | None = None) -> None:
    """Finish a checkpoint written into ``tmp``: state, manifest, fsync, rename to ``final``.

    ``files`` are the entries the ranks made of the files they wrote (``describe``); by default this
    process describes every file in ``tmp``.
    """
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    if files is None:
        files = describe(tmp, sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    else:
        files = {**files, **describe(tmp, [TRAINER_STATE])}
    manifest = tmp / MANIFEST
    with open(manifest, "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def recorded_size(path: Path) -> int | None:
    """The bytes a sealed checkpoint's manifest records (nothing is read but the manifest), or None."""
    try:
        return sum(entry["size"] for entry in json.loads((path / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def validate(path: Path, hashes: bool = True) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is; ``hashes=False`` checks the
    manifest and the sizes only (a glance, for messages: nothing but the manifest is read)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (the write never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__}: {e})"
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and {"size", "sha256"} <= set(entry) for entry in files.values()
    ):
        return "malformed manifest (files must map each name to its size and sha256)"
    if TRAINER_STATE not in files:
        return "no trainer state"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {expected['size']}"
        if hashes and _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Sealed checkpoint directories, newest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def latest_valid(run_dir: Path, quiet: bool = False, hashes: bool = True) -> Path | None:
    """The newest checkpoint that passes validation; broken ones are skipped with a warning."""
    for path in list_checkpoints(run_dir):
        problem = validate(path, hashes)
        if problem is None:
            return path
        if not quiet:
            log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, and stale temporary directories."""
    for old in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    root = checkpoints_root(run_dir)
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
