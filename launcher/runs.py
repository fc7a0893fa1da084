"""Run directories: the resolved config, logs and metrics of one run.

``RUN/config.yaml`` is the resolved experiment; ``RUN/metrics.jsonl`` one JSON line per
logged step; ``RUN/eval.json`` the newest evaluation (``RUN/eval.jsonl`` all of them);
``RUN/tb/`` TensorBoard events; ``RUN/logs/rank_K.log`` every rank's log;
``RUN/checkpoints/`` see ``checkpoint.py``. A run directory belongs to one config:
starting the same config in it again resumes; a different config is refused, except for the
settings a diverged run needs changed (``CHANGEABLE_ON_RESUME``): those take effect from the
checkpoint it resumes from, and ``RUN/config_history.yaml`` records each change and its step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from launcher.config import dump_yaml, load_yaml, to_dict, yaml_problem
from launcher.errors import RunDirError, UserError

if TYPE_CHECKING:
    from launcher.experiment import ExperimentConfig

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
LOCK = ".lock"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
EVAL_HISTORY = "eval.jsonl"
CONFIG_HISTORY = "config_history.yaml"
# What a resume may change: none of it is in a checkpoint's state (the lr is a function of the step,
# clipping and precision act in the loop, the last decides only whether a resume may be inexact), so it
# takes effect from the resumed step on.
CHANGEABLE_ON_RESUME = (
    "optim.blr",
    "optim.min_lr",
    "optim.clip_grad",
    "train.mixed_precision",
    "train.allow_inexact_resume",
)


def default_run_dir(command: str, experiment: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{command}-{experiment}-{stamp}"


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """``RUN/config.yaml``: a mapping with a method name, or a ``RunDirError`` saying how to write it again.

    The file is the run's one record of its config, written (atomically) when the run started:
    one that is empty, unreadable or of the wrong shape was damaged since, and every command that
    continues the run (resume, export, finetune, status) stops here rather than guessing.
    """
    path = Path(run_dir) / CONFIG
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 text (byte {e.start}: {e.reason})"
    except OSError as e:
        problem = f"cannot be read ({e.strerror})"
    except yaml.YAMLError as e:
        problem = f"is not valid YAML ({yaml_problem(e)})"
    else:
        if data is None:
            problem = "is empty"
        elif not isinstance(data, dict):
            problem = f"holds a {type(data).__name__}, not a mapping of sections (method, data, optim, train, eval)"
        elif not isinstance(data.get("method"), dict) or not data["method"].get("name"):
            problem = "has no method.name"
        else:
            return data
    raise RunDirError(
        f"{path} {problem}: it should hold the run's resolved config, and nothing was done without it. Write it "
        f"again: the command that started the run, with --dry-run added and without --run-dir, prints that config "
        f"(for a SLURM run also drop --cluster and its flags and name its experiment with --experiment; add the "
        f"KEY=VALUE changes {CONFIG_HISTORY} lists, if any), so `launch ... --dry-run > {path}` restores it. Then "
        f"run your command again."
    )


def check_run_dir(run_dir: Path, cfg: ExperimentConfig, writable: bool = True) -> bool:
    """Whether ``run_dir`` already holds this config (a resume); raise if it holds another.

    ``writable=False`` leaves out whether this user can create it (``check_writable``), which a
    dry run for another machine lists instead of refusing.
    """
    run_dir = Path(run_dir)
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RunDirError(
            f"cannot use the run directory {run_dir}: {blocking} is a file, not a directory. Pass a --run-dir "
            f"that is a directory or does not exist yet."
        )
    existing = run_dir / CONFIG
    if existing.is_file():
        changes = _differences(read_run_config(run_dir), to_dict(cfg))
        diffs = [f"{key}: {a!r} -> {b!r}" for key, a, b in changes if key not in CHANGEABLE_ON_RESUME]
        if diffs:
            raise RunDirError(
                f"run directory {run_dir} belongs to a different config ({'; '.join(diffs[:5])}"
                f"{'; ...' if len(diffs) > 5 else ''}). Nothing was changed. To resume it, run the "
                f"same config (only {', '.join(CHANGEABLE_ON_RESUME)} may change on a resume); to start a "
                f"new run, pass another --run-dir."
            )
        blocked = first_unwritable(run_dir)
        if blocked is not None:
            raise cannot_resume(run_dir, blocked)
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run directory {run_dir} exists, is not empty and has no {CONFIG}: it is not a run "
            f"of this tool. Pass another --run-dir."
        )
    if writable:
        check_writable(run_dir)
    return False


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory this user cannot create (or write, when it exists)."""
    run_dir = Path(run_dir)
    parent = run_dir if run_dir.exists() else next(p for p in run_dir.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RunDirError(
            f"cannot write the run directory {run_dir}: {parent} is not writable. Pass a --run-dir you can write to."
        )


# Files a resume opens for writing where they are (the rest it replaces, or makes anew, in their folders).
WRITTEN_IN_PLACE = (LOCK, ".launch.lock", EVAL_HISTORY)


def first_unwritable(run_dir: Path) -> Path | None:
    """The first folder of ``run_dir``, or file a resume writes in place, that this user cannot write."""
    for folder, _, files in os.walk(run_dir):
        here = Path(folder)
        if not os.access(here, os.W_OK | os.X_OK):
            return here
        in_place = files if here.name == "logs" else [f for f in files if f in WRITTEN_IN_PLACE]
        blocked = next((here / f for f in in_place if not os.access(here / f, os.W_OK)), None)
        if blocked is not None:
            return blocked
    return None


def cannot_resume(run_dir: Path, blocked: Path, doing: str = "resume the run in") -> RunDirError:
    return RunDirError(
        f"cannot {doing} {run_dir}: {blocked} is not writable by this user, and a run writes its lock, "
        f"checkpoints, metrics and logs there. Make the run writable again (its owner can `chmod -R u+w "
        f"{run_dir}`), or copy it to a folder you can write and resume the copy."
    )


def recorded_method(run_dir: Path | None) -> dict | None:
    """The method section of ``run_dir``'s config, when it holds a run already."""
    if run_dir is None or not (Path(run_dir) / CONFIG).is_file():
        return None
    return read_run_config(run_dir)["method"]


def resume_note(run_dir: Path, resuming: bool) -> str:
    """What starting ``run_dir`` will do, for the user: resume it, or start over (say why)."""
    from launcher import checkpoint

    if not resuming:
        return ""
    if checkpoint.latest_valid(run_dir, quiet=True, hashes=False) is None:  # the trainer verifies it
        return " (it holds this config but no valid checkpoint: starting over from step 0)"
    return " (resuming)"


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Write ``cfg`` as the run's config; a change on resume (``check_run_dir`` allowed it) is recorded.

    ``RUN/config_history.yaml`` lists each change: the step it took effect at (the checkpoint the
    run resumes from) and every setting's old and new value. Writing the same config is a no-op.
    """
    from launcher import checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG
    changes = _differences(read_run_config(run_dir), to_dict(cfg)) if path.is_file() else []
    if path.is_file() and not changes:
        return
    if changes:
        newest = checkpoint.latest_valid(run_dir, quiet=True)
        step = checkpoint.read_trainer_state(newest)["step"] if newest is not None else 0
        history_path = run_dir / CONFIG_HISTORY
        history = yaml.safe_load(history_path.read_text()) if history_path.is_file() else []
        entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        history.append({**entry, "changes": {key: {"from": a, "to": b} for key, a, b in changes}})
        tmp = run_dir / f".{CONFIG_HISTORY}.tmp"
        with writing(history_path, cleanup=tmp):
            tmp.write_text(yaml.safe_dump(history, sort_keys=False))
            os.replace(tmp, history_path)
        log.info("from step %d: %s", step, "; ".join(f"{key} {a!r} -> {b!r}" for key, a, b in changes))
    tmp = run_dir / f".{CONFIG}.tmp"
    with writing(path, cleanup=tmp):
        tmp.write_text(dump_yaml(cfg))
        os.replace(tmp, path)


_HELD_LOCKS: dict[Path, int] = {}  # run directory -> the descriptor whose flock this process holds


def lock_run_dir(run_dir: Path) -> None:
    """Make this process the owner of ``run_dir`` until it exits: an exclusive lock on ``RUN/.lock``.

    ``flock`` is released by the kernel however the process ends, so a lock whose holder is gone
    is never stale. The file says who holds it (PID, host, SLURM job) for the message of whoever
    is refused. A SLURM job's rank 0 holds it for all of the job's ranks. Locking a directory
    this process holds already is a no-op.
    """
    import fcntl

    path = (Path(run_dir) / LOCK).resolve()
    if path in _HELD_LOCKS:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:  # check_run_dir refuses this before anything starts; another host may differ
        raise cannot_resume(run_dir, path, "train in") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(
            f"run directory {run_dir} is in use by {lock_holder(run_dir)}: two processes must not train into one "
            f"run. Wait for it to end (or stop it: Ctrl-C, kill, `launch cancel`), or pass another --run-dir."
        ) from None
    job = os.environ.get("SLURM_JOB_ID")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), **({"slurm_job": job} if job else {})}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(owner) + "\n").encode())
    _HELD_LOCKS[path] = fd


def lock_holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, in words, from what its holder wrote."""
    try:
        owner = json.loads((Path(run_dir) / LOCK).read_text())
        where = f"PID {owner['pid']} on {owner['host']}"
        return f"SLURM job {owner['slurm_job']} ({where})" if "slurm_job" in owner else where
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def check_unlocked(run_dir: Path) -> None:
    """Refuse a run directory another process is training in (before a submission, say); takes no lock."""
    import fcntl

    path = Path(run_dir) / LOCK
    if not path.exists() or path.resolve() in _HELD_LOCKS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirError(
            f"run directory {run_dir} is in use by {lock_holder(run_dir)}; wait for it to end or stop it, "
            f"or pass another --run-dir"
        ) from None
    finally:
        os.close(fd)


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to the console; every rank logs to ``RUN/logs/rank_K.log``."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_launcher", False):
            root.removeHandler(handler)
            handler.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / f"rank_{rank}.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._launcher = True  # type: ignore[attr-defined]
        root.addHandler(handler)


class DiskFullError(UserError):
    """A write into the run directory failed for want of space."""


def disk_full(path: Path, error: BaseException, needed_bytes: int | None = None) -> DiskFullError:
    """The error to raise when writing ``path`` failed with ``error``: what is free, what is needed."""
    free = shutil.disk_usage(next(p for p in (Path(path), *Path(path).parents) if p.exists())).free
    need = f"; it needs about {needed_bytes / 2**20:.0f} MiB" if needed_bytes else ""
    return DiskFullError(
        f"no space left to write {path} ({type(error).__name__}: {error}): {free / 2**20:.0f} MiB free on its "
        f"filesystem{need}. Free some space (older runs, checkpoints), then run the same command to resume: "
        f"the earlier checkpoints are intact."
    )


@contextlib.contextmanager
def writing(path: Path, cleanup: Path | None = None, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into a ``DiskFullError``; remove ``cleanup`` on any failure."""
    try:
        yield
    except Exception as e:  # torch and safetensors say "no space" in errors of their own types
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True) if cleanup.is_dir() else cleanup.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, e, needed_bytes) from None
        raise


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or the error it arose from, says a device or file-size limit is full.

    torch and safetensors say it in their own words (torch's zip writer fails a second time while
    it unwinds, so the first error is in the chain).
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        text = str(error)
        if any(
            words in text
            for words in (
                "No space left",
                "os error 28",
                "File too large",
                "Disk quota",
                "iostream error",
                "file write failed",
            )
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def read_json_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file, and the number of lines dropped: a torn (half-written) line
    and everything after it, as a crash in the middle of a write leaves them."""
    records, lines = [], Path(path).read_text().splitlines() if Path(path).exists() else []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            return records, len(lines) - k
    return records, 0


class MetricsLog:
    """Appends one JSON line per logged step; on resume drops lines past the checkpoint (and a torn one)."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / METRICS
        if self.path.exists():
            records, torn = read_json_lines(self.path)
            if torn:
                log.warning(
                    "%s ends in %d line(s) that are not whole JSON (a crash mid-write); dropped them", self.path, torn
                )
            kept = [json.dumps(r) for r in records if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            with writing(self.path, cleanup=tmp):
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
        self.file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        with writing(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # a full disk already raised on write; the file is truncated to whole lines on resume


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The whole records of ``RUN/metrics.jsonl`` (a torn last line is left out)."""
    return read_json_lines(Path(run_dir) / METRICS)[0]


def write_eval(run_dir: Path, record: dict[str, Any]) -> None:
    """Record an evaluation: ``eval.json`` (replaced atomically) and a line of ``eval.jsonl``."""
    tmp = run_dir / f".{EVAL}.tmp"
    with writing(run_dir / EVAL, cleanup=tmp):
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, run_dir / EVAL)
        with open(run_dir / EVAL_HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / EVAL
    return json.loads(path.read_text()) if path.is_file() else None


def describe_eval(record: dict[str, Any] | None) -> str:
    """One line for an evaluation record (``read_eval``)."""
    if record is None:
        return "no evaluation recorded"
    shown = {k: v for k, v in record.items() if k not in ("step", "epoch", "seconds")}
    return f"evaluation at step {record['step']} ({record['seconds']:.1f} s): " + ", ".join(
        f"{k} {v:.4g}" for k, v in shown.items()
    )


def last_evaluated_step(run_dir: Path) -> int | None:
    record = read_eval(run_dir)
    return None if record is None else record["step"]
