"""The package as a user gets it: a wheel, installed into an environment of its own, used away from the checkout.

The new environment sees the project's dependencies through a ``.pth`` file (installing torch
again would take minutes), but ``launcher`` (with ``launcher.methods``) comes only from the
wheel: the commands run in a folder outside the repository, so nothing of the checkout is
importable. The wheel installs no top-level package of a generic name such as ``methods``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_image_folder, tiny_experiment

REPO = Path(__file__).resolve().parents[2]


def copy_source(source: Path) -> Path:
    """The files git knows of (committed or not, ignored ones left out), copied into ``source``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():  # a file deleted but not yet committed is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    return source


def new_environment(env: Path) -> Path:
    """A virtual environment that sees the project's dependencies (a ``.pth`` file), not the project."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    (purelib / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the project's wheel installed (no editable install, no checkout)."""
    root = tmp_path_factory.mktemp("install")
    source = copy_source(root / "source")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], check=True)
    (wheel,) = (root / "dist").glob("launch_encoders-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("launcher/experiments/pretrain/pcae_local.yaml", "launcher/clusters/local-test.yaml"):
        assert shipped in names, f"{shipped} is not in the wheel"
    assert not [n for n in names if n.startswith("tests/")]
    env = new_environment(root / "env")
    subprocess.run([*pip, "--python", env / "bin" / "python", "install", "--no-deps", wheel], check=True)
    return env


def run(installed: Path, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([installed / "bin" / "launch", *args], cwd=cwd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


pytestmark = pytest.mark.slow


def test_the_installed_package_comes_from_the_wheel_and_lists_its_experiments(installed: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.util, launcher, launcher.methods; print(launcher.__file__, launcher.methods.__file__, "
        "importlib.util.find_spec('methods'))"
    )
    where = subprocess.run(
        [installed / "bin" / "python", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where[:2]) and where[2] == "None", where
    names = run(installed, ["experiments"], tmp_path).stdout.split()
    assert {"pretrain/pcae_local", "pretrain/pcae_vit_base", "pretrain/mae_local", "study/pcae_vs_mae_local"} <= set(
        names
    )
    out = run(installed, ["pretrain", "pcae", "--dry-run"], tmp_path).stdout
    assert f"# experiment: {installed}" in out and "pretrain/pcae_local.yaml" in out
    out = run(
        installed, ["pretrain", "mae", "--experiment", "pretrain/mae_vit_base", "--dry-run", "data.root=/"], tmp_path
    )
    assert "size: base" in out.stdout


def test_a_profile_of_ones_own_drives_a_dry_run_submission(installed: Path, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "mine.yaml").write_text(
        "partition: gpu\nruns_dir: /var/tmp/launch-never\nmax_nodes: 8\ntime_min: 600\ngpus_per_node: 4\n"
        "cpus_per_task: 8\nsetup: ['module load cuda']\n"
    )
    # no SLURM on PATH: the dry run renders the profile without checking it against a cluster
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path), "LAUNCH_CLUSTERS": str(profiles)}
    out = run(
        installed,
        ["pretrain", "pcae", "--cluster", "mine", "--nodes", "4", "--dry-run", "data.root=/"],
        tmp_path,
        env=env,
    ).stdout
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=4", "module load cuda"):
        assert line in out, line
    assert str(installed / "bin" / "python") in out  # the job runs the environment's own interpreter
    assert run(installed, ["cluster", "show", "mine"], tmp_path, env=env).stdout.startswith(
        f"# mine: {profiles / 'mine.yaml'}"
    )


def test_a_tiny_pretraining_runs_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images")
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(tiny_experiment("pcae", images, train={"num_epochs": 1})))
    run(installed, ["pretrain", "pcae", "--experiment", str(experiment), "--run-dir", "runs/tiny"], tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(0 < m["loss"] < 10 for m in lines if "loss" in m), lines
    assert (tmp_path / "runs" / "tiny" / "checkpoints").is_dir()


def test_the_readme_install_line_installs_and_launch_version_answers(tmp_path: Path) -> None:
    """The README's line as written, its git URL swapped for a file URL of this checkout."""
    text = (REPO / "README.md").read_text()
    line = re.search(r"^pip install .*git\+https://\S+\"", text, re.M).group(0)
    words = shlex.split(line)
    (requirement,) = [w for w in words if " @ " in w]
    name, _, url = requirement.partition(" @ ")
    source = copy_source(tmp_path / "source")
    env = new_environment(tmp_path / "env")
    # The dependencies are there already (.pth); pip still checks the requirement's name against the project's.
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", env / "bin" / "python"]
        + ["install", "--no-deps", "--no-build-isolation", f"{name} @ {source.as_uri()}"],
        check=True,
    )
    assert url.startswith("git+") and words[:2] == ["pip", "install"]
    away = tmp_path / "elsewhere"
    away.mkdir()
    out = run(env, ["--version"], away)
    version = subprocess.run(
        [env / "bin" / "python", "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        cwd=away,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out.stdout.strip() == f"launch {version}"
