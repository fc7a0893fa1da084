"""Faults a run meets outside the happy path, made for real: a full disk, two processes on one run,
signals during data generation, a killed generator, bad images, torn files.

No traceback reaches the user; exit code 2 for what the user must fix, 0 for a run that stopped
cleanly and can resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from launcher import checkpoint
from launcher.experiment import experiment_from_dict
from launcher.runs import DiskFullError, read_metrics
from launcher.trainer import Trainer
from tests.helpers import REPO, tiny_experiment


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run)]


def launch_process(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs, remountable to another size: a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs here ({done.stderr.decode().strip()})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def resize(mount: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)


def test_a_full_disk_during_a_checkpoint_removes_it_keeps_the_last_and_the_run_resumes(
    small_disk: Path, image_folder: Path, tmp_path: Path
) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder, train={"checkpoint_every": 2}))
    straight = tmp_path / "straight"
    Trainer(cfg, straight).fit()
    one = sum(p.stat().st_size for p in checkpoint.latest_valid(straight).rglob("*") if p.is_file())
    rest = sum(p.stat().st_size for p in straight.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    resize(small_disk, rest + int(1.6 * one) + 64 * 1024)  # room for one checkpoint, not for two
    run = small_disk / "run"
    with pytest.raises(DiskFullError, match=r"no space left to write .*step_0000004.* MiB free.*needs about"):
        Trainer(cfg, run).fit()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]  # no partial one left
    assert checkpoint.validate(checkpoint.checkpoint_path(run, 2)) is None
    resize(small_disk, 64 * 2**20)  # space freed: the same command resumes
    resumed = Trainer(cfg, run)
    assert resumed.resume() and resumed.state.step == 2
    assert resumed.fit().finished
    assert losses(run) == losses(straight)


def test_a_full_disk_in_the_cli_is_one_paragraph_and_exit_2(small_disk: Path, image_folder: Path) -> None:
    experiment = small_disk.parent / "mae.yaml"
    experiment.write_text(yaml.safe_dump(tiny_experiment("mae", image_folder)))
    resize(small_disk, 48 * 1024)  # the config and logs fit, a checkpoint does not
    done = launch_process(
        "pretrain", "mae", "--experiment", str(experiment), "--run-dir", str(small_disk / "run"), cwd=small_disk.parent
    )
    _, err = done.communicate(timeout=300)
    assert done.returncode == 2, err
    assert "error: no space left to write" in err and "Traceback" not in err
    assert not list((small_disk / "run" / "checkpoints").glob(".tmp_*"))


# ----------------------------------------------------------------------------- two processes, one run


def test_a_second_process_on_a_run_directory_is_refused_naming_the_first(image_folder: Path, tmp_path: Path) -> None:
    experiment = tmp_path / "mae.yaml"
    cfg = tiny_experiment("mae", image_folder, train={"num_epochs": 400})  # long enough to be still running
    experiment.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    first = launch_process("pretrain", "mae", "--experiment", str(experiment), "--run-dir", str(run), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not read_metrics(run):
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = launch_process("pretrain", "mae", "--experiment", str(experiment), "--run-dir", str(run), cwd=tmp_path)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"is in use by PID {first.pid} on " in err and "Traceback" not in err
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err  # it stopped cleanly, at a step boundary
    assert "run the same command" in out
    # The holder is gone: the lock is free, whatever state it left.
    third = launch_process(
        "pretrain",
        "mae",
        "--experiment",
        str(experiment),
        "--run-dir",
        str(run),
        cwd=tmp_path,
    )
    time.sleep(0.5)
    third.send_signal(signal.SIGTERM)
    _, err = third.communicate(timeout=120)
    assert "is in use" not in err


# ----------------------------------------------------------------------------- torn and malformed files


def test_a_torn_metrics_line_is_dropped_on_resume(image_folder: Path, tmp_path: Path, caplog) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder, train={"checkpoint_every": 3}))
    run = tmp_path / "run"
    Trainer(cfg, run).fit(until_step=5)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # a crash in the middle of a write
    straight = tmp_path / "straight"
    Trainer(cfg, straight).fit()
    resumed = Trainer(cfg, run)
    assert resumed.resume() and resumed.state.step == 5
    resumed.fit()
    assert losses(run) == losses(straight)
    assert "not whole JSON" in caplog.text


@pytest.mark.parametrize("manifest", ["[1, 2]", '{"files": [1]}', '{"files": {"model.safetensors": 3}}'])
def test_a_manifest_of_the_wrong_shape_is_skipped_with_a_reason(
    image_folder: Path, tmp_path: Path, manifest: str, caplog
) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder, train={"checkpoint_every": 2}))
    run = tmp_path / "run"
    Trainer(cfg, run).fit(until_step=4)
    (checkpoint.checkpoint_path(run, 4) / checkpoint.MANIFEST).write_text(manifest)
    assert checkpoint.latest_valid(run) == checkpoint.checkpoint_path(run, 2)
    assert "skipping checkpoint" in caplog.text and "manifest" in caplog.text


def test_a_run_whose_checkpoints_are_gone_says_it_starts_over(image_folder: Path, tmp_path: Path) -> None:
    experiment = tmp_path / "mae.yaml"
    experiment.write_text(yaml.safe_dump(tiny_experiment("mae", image_folder)))
    run = tmp_path / "run"
    command = ["pretrain", "mae", "--experiment", str(experiment), "--run-dir", str(run)]
    first = launch_process(*command, cwd=tmp_path)
    first.communicate(timeout=300)
    for path in (run / "checkpoints").iterdir():
        (path / checkpoint.MANIFEST).unlink()
    again = launch_process(*command, cwd=tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "no valid checkpoint" in out and "starting over" in out


def test_the_lock_names_its_holder_and_is_free_once_it_has_exited(tmp_path: Path) -> None:
    from launcher.errors import RunDirError
    from launcher.runs import check_unlocked

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from launcher.runs import lock_run_dir; import time; lock_run_dir({str(run)!r}); "
            f"print('locked', flush=True); time.sleep(60)",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=rf"in use by PID {holder.pid} on "):
        check_unlocked(run)
    holder.kill()  # however it ends, the kernel releases the lock
    holder.wait()
    check_unlocked(run)


# ----------------------------------------------------------------------------- bad images


def spoil(folder: Path) -> list[Path]:
    """Two bad files in an image folder: a truncated JPEG and a text file named .jpg."""
    truncated = folder / "n00000000" / "img_0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = folder / "n00000001" / "img_2.jpg"
    text.write_text("not an image")
    return [truncated, text]


def test_bad_images_are_replaced_counted_and_resume_stays_exact(image_folder: Path, tmp_path: Path, caplog) -> None:
    bad = spoil(image_folder)
    cfg = experiment_from_dict(
        tiny_experiment("mae", image_folder, train={"num_epochs": 3, "checkpoint_every": 4}, data={"augment": "mae"})
    )
    straight = tmp_path / "straight"
    result = Trainer(cfg, straight).fit()
    assert result.finished
    assert all(str(path) in caplog.text for path in bad)  # each bad file named (once per process)
    interrupted = tmp_path / "resumed"
    Trainer(cfg, interrupted).fit(until_step=6)
    resumed = Trainer(cfg, interrupted)
    assert resumed.resume()
    resumed.fit()
    assert losses(interrupted) == losses(straight)  # the replacements are a function of (seed, epoch, index)
    assert resumed.state.bad_samples == Trainer(cfg, straight).state.bad_samples or resumed.state.bad_samples > 0


def test_too_many_bad_images_stop_the_run_with_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    spoil(image_folder)
    experiment = tmp_path / "mae.yaml"
    cfg = tiny_experiment("mae", image_folder, train={"num_epochs": 3}, data={"max_bad_samples": 1})
    experiment.write_text(yaml.safe_dump(cfg))
    done = launch_process(
        "pretrain", "mae", "--experiment", str(experiment), "--run-dir", str(tmp_path / "run"), cwd=tmp_path
    )
    _, err = done.communicate(timeout=300)
    assert done.returncode == 2 and "Traceback" not in err
    assert "more than data.max_bad_samples=1" in err and "launch data check" in err


def test_launch_data_check_lists_the_bad_files(image_folder: Path, tmp_path: Path) -> None:
    bad = spoil(image_folder)
    done = launch_process("data", "check", str(image_folder), "--workers", "2", cwd=tmp_path)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 2, err
    listed = [line.split(":")[0] for line in out.splitlines() if line.startswith("/")]
    assert sorted(listed) == sorted(map(str, bad))
    assert "2 of 36 images" in out


# ----------------------------------------------------------------------------- signals during data generation


def workers_of(pid: int) -> list[int]:
    """Processes started by ``pid`` (its generation workers) that are still alive, orphaned or not."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"LAUNCH_TEST_PARENT={pid}".encode() in environ and b"multiprocessing" in cmdline:
            found.append(int(proc.name))
    return found


def start_generation(tmp_path: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; os.environ['LAUNCH_TEST_PARENT'] = str(os.getpid()); "
            "from launcher.cli import main; sys.exit(main(sys.argv[1:]))",
            "data",
            "lunarlander",
            "--frames",
            "20000",
            "--workers",
            "2",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".{out.name}.partial-*")) or len(workers_of(process.pid)) < 2:
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    time.sleep(2)  # well into generation
    return process


def test_sigterm_during_generation_removes_the_partial_set_and_its_workers(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    process = start_generation(tmp_path, out)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err  # it stopped cleanly
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".frames.partial-*"))
    deadline = time.monotonic() + 10
    while workers_of(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers_of(process.pid)


def test_a_killed_generator_takes_its_workers_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    process = start_generation(tmp_path, out)
    workers = workers_of(process.pid)
    process.kill()
    process.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while (
        any(
            Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
            for w in workers
            if Path(f"/proc/{w}").exists()
        )
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not workers_of(process.pid), "workers outlived their killed parent"
    assert list(tmp_path.glob(".frames.partial-*"))  # SIGKILL leaves its partial output...
    done = launch_process("data", "lunarlander", "--frames", "50", "--workers", "1", "--out", str(out), cwd=tmp_path)
    done.communicate(timeout=120)
    assert done.returncode == 0 and out.is_dir()
    assert not list(tmp_path.glob(".frames.partial-*"))  # ...which the next run removes
