"""No value that reaches the sbatch script can add a command to it or hide a directive from sbatch.

Each case renders the script through ``launch pretrain ... --dry-run``, then runs it with bash and a
stand-in ``srun`` that records its arguments: the injected command must not run, every ``#SBATCH``
line must come before the first line sbatch stops at, and sbatch's own reading of each directive
(its quoting rules, not the shell's) must give back the value as typed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import launch

# Each would run `touch pwned` in the script's folder if it were not quoted.
QUOTED = [
    "x; touch pwned #",
    "x && touch pwned",
    "x | touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "x' ; touch pwned ; '",
    'x" ; touch pwned ; "',
    "x #touch pwned",
    "Zürich-日本 é",
]
# No quoting holds these in an #SBATCH line: refused, naming the field.
REFUSED = ["acct\ntouch pwned #", "acct\rtouch pwned", "a\x1bb", "a\x7fb", "a\tb", "a\\b", "a\x0btouch pwned"]
# Where a value comes from: a profile field, a flag, a path or a file name.
FIELDS = ["account", "qos", "constraint", "partition", "--partition", "runs_dir", "--run-dir", "experiment name"]
MESSAGES = {
    "account": "account in cluster profile",
    "qos": "qos in cluster profile",
    "constraint": "constraint in cluster profile",
    "partition": "the partition (--partition, or partition in cluster profile",
    "--partition": "the partition (--partition, or partition in cluster profile",
}


def sbatch_directives(script: str) -> tuple[list[list[str]], list[str]]:
    """The arguments sbatch reads from each #SBATCH line, and every #SBATCH line of the script.

    sbatch's rules (src/sbatch/opt.c): lines split at '\\n' only; a line that starts with #SBATCH is a
    directive; a blank line or one whose first non-space character is '#' is skipped; any other line
    ends the directives. In a directive a backslash escapes the next character (inside quotes too),
    single and double quotes group, and an unquoted '#' starts a comment.
    """
    directives: list[list[str]] = []
    reading = True
    for line in script.split("\n"):
        if not reading:
            continue
        if line.startswith("#SBATCH"):
            directives.append(_sbatch_arguments(line[len("#SBATCH") :]))
        elif line.strip() and not line.lstrip().startswith("#"):
            reading = False
    every = [line for line in script.split("\n") if "#SBATCH" in line]
    return directives, every


def _sbatch_arguments(text: str) -> list[str]:
    arguments, i = [], 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            break
        argument, quote, escaped = [], "", False
        while i < len(text) and (quote or not text[i].isspace()):
            c = text[i]
            i += 1
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
                continue
            elif quote:
                if c == quote:
                    quote = ""
                    continue
            elif c in "\"'":
                quote = c
                continue
            elif c == "#":
                return [*arguments, "".join(argument)] if argument else arguments
            argument.append(c)
        assert not quote, f"sbatch would stop: unmatched {quote} in {text!r}"
        arguments.append("".join(argument))
    return arguments


def render(tmp: Path, field: str, value: str, monkeypatch) -> tuple[int, Path]:
    """``launch pretrain pcae --cluster PROFILE --dry-run`` with ``value`` in ``field``: (exit code, run dir)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no sbatch or sinfo: the dry run asks no cluster
    profile = yaml.safe_load((Path(__file__).parents[4] / "slurm" / "clusters" / "local-test.yaml").read_text())
    profile["runs_dir"] = str(tmp / "runs")
    experiment = tmp / "pcae.yaml"
    experiment.write_text("optim: {blr: 1.0e-3}\n")
    run_dir = tmp / "runs" / "run"
    flags = [f"data.root={tmp}"]
    if field in ("account", "qos", "constraint", "partition"):
        profile[field] = value
    elif field == "--partition":
        flags += ["--partition", value]
    elif field == "runs_dir":
        profile["runs_dir"] = str(tmp / value)
        run_dir = tmp / value / "run"
    elif field == "--run-dir":
        run_dir = tmp / "runs" / value
    elif field == "experiment name":
        experiment = tmp / f"{value}.yaml"
        experiment.write_text("optim: {blr: 1.0e-3}\n")
    (tmp / "profile.yaml").write_text(yaml.safe_dump(profile, allow_unicode=True))
    if field != "experiment name":
        flags += ["--run-dir", str(run_dir)]
    code = launch(f"pretrain pcae --cluster {tmp / 'profile.yaml'} --dry-run --experiment", experiment, *flags)
    return code, run_dir


def run_script(script: str, tmp: Path) -> list[str]:
    """Run the script with bash in ``tmp`` and a stand-in srun; the arguments srun got."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > srun.args\n')
    srun.chmod(0o755)
    (tmp / "job.sbatch").write_text(script)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp)}
    subprocess.run(["bash", "job.sbatch"], cwd=tmp, env=env, check=True, capture_output=True, timeout=60)
    return (tmp / "srun.args").read_text().split("\0")[:-1]


@pytest.mark.parametrize("value", QUOTED)
@pytest.mark.parametrize("field", FIELDS)
def test_a_value_with_shell_syntax_stays_one_word_of_the_script(
    shared_tmp: Path, monkeypatch, capsys, field: str, value: str
) -> None:
    monkeypatch.chdir(shared_tmp)
    code, run_dir = render(shared_tmp, field, value, monkeypatch)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    script = captured.out.split("# sbatch script\n", 1)[1]
    srun_args = run_script(script, shared_tmp)
    assert not (shared_tmp / "pwned").exists(), f"an injected command ran:\n{script}"
    directives, every = sbatch_directives(script)
    assert len(directives) == len(every), f"sbatch would not read every #SBATCH line:\n{script}"
    read = dict(
        argument.removeprefix("--").split("=", 1) for line in directives for argument in line if "=" in argument
    )
    if field == "experiment name":
        run_dir = Path(next(line for line in captured.out.splitlines() if line.startswith("# run directory: "))[17:])
        assert run_dir.name.startswith(f"pretrain-{value}-")
    folder = run_dir.resolve() / "slurm" / "sub1"
    assert read["output"] == f"{folder}/%j_0_log.out"
    assert srun_args[srun_args.index("--output") + 1] == f"{folder}/%j_%t_log.out"
    assert srun_args[-1] == str(folder)
    if field in MESSAGES:
        assert read[field.removeprefix("--")] == value
    assert not (shared_tmp / "runs").exists() or not any((shared_tmp / "runs").iterdir())


@pytest.mark.parametrize(
    "field, value",
    [(field, value) for field in FIELDS for value in REFUSED]
    # A setup line is a command: a tab or a backslash is shell syntax there, a line break is not.
    + [("setup", value) for value in REFUSED if value not in ("a\tb", "a\\b")],
)
def test_a_value_that_would_end_a_line_is_refused_naming_the_field(
    shared_tmp: Path, monkeypatch, capsys, field: str, value: str
) -> None:
    if field == "setup":
        code, run_dir = _render_setup(shared_tmp, value, monkeypatch)
    else:
        code, run_dir = render(shared_tmp, field, value, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert "\n" not in err.strip(), "one paragraph"
    expected = MESSAGES.get(field) or ("a setup line of cluster profile" if field == "setup" else "the job's directory")
    assert expected in err
    assert not run_dir.exists() and not (shared_tmp / "pwned").exists()


def _render_setup(tmp: Path, line: str, monkeypatch) -> tuple[int, Path]:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    profile = yaml.safe_load((Path(__file__).parents[4] / "slurm" / "clusters" / "local-test.yaml").read_text())
    profile.update(runs_dir=str(tmp / "runs"), setup=["module load x", line])
    (tmp / "profile.yaml").write_text(yaml.safe_dump(profile))
    run_dir = tmp / "runs" / "run"
    code = launch(f"pretrain pcae --cluster {tmp / 'profile.yaml'} --dry-run data.root={tmp} --run-dir", run_dir)
    return code, run_dir


def test_a_percent_sign_in_the_run_directory_is_refused(shared_tmp: Path, monkeypatch, capsys) -> None:
    code, run_dir = render(shared_tmp, "--run-dir", "100%done", monkeypatch)
    assert code == 2 and "holds '%', which SLURM reads as a pattern" in capsys.readouterr().err
    assert not run_dir.exists()
