"""The docs say what the code does: command lines that parse, figures that name their command,
profile keys the loader accepts, paths that exist.

Conventions these tests hold the docs to (README.md, docs/*.md, slurm/README.md):

- every ``launch ...`` command line, in a code block or in backticks, names subcommands and flags
  that ``launch`` has (``[--flag X]`` is an optional part, ``a|b`` alternatives, ``...`` elided);
- README.md stays under 200 lines: a guide, its long reports in docs/;
- every figure (a Markdown table or image) of README.md and docs/*.md names the command that
  produced it: the paragraph just above it (tables and images in between skipped) holds that
  command in backticks, ``launch ...``;
- the cluster profile keys are those of ``ClusterProfile``: slurm/README.md's table of keys is
  generated from the dataclass, and every example profile and every key the docs name loads.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import pytest
import yaml

from launcher.cli import build_parser
from launcher.config import field_comments
from launcher.errors import ConfigError
from launcher.shipped import clusters_dir
from launcher.slurm.profiles import ClusterProfile, parse_profile, profile_reference
from tests.helpers import REPO

SLURM_README = REPO / "slurm" / "README.md"


def docs() -> list[Path]:
    """The user's documentation: README.md, docs/*.md and slurm/README.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), SLURM_README]


def reports() -> list[Path]:
    """The documents whose figures are measurements: README.md and docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[str, list[str]]:
    """The prose of a Markdown text (fenced blocks blanked out) and its fenced blocks' contents."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "\n", text, flags=re.S | re.M)
    return prose, blocks


def code_spans(text: str) -> list[str]:
    """Inline code spans (``like this``), a line break inside one read as a space."""
    return [span.replace("\n", " ") for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]


# ----------------------------------------------------------------------------- command lines


def command_lines(text: str) -> list[str]:
    """Every ``launch ...`` command line of a Markdown text, as the words after ``launch``."""
    prose, blocks = split_fences(text)
    found = [span for span in code_spans(prose) + code_spans("\n".join(blocks)) if span.startswith("launch ")]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"`[^`]*`", " ", line.split(" #", 1)[0])  # a comment, prose quoted in a block
            for piece in re.split(r";|&&", line):
                match = re.match(r"\s*(?:\S*/)?(launch\s.*)", piece)
                if match:
                    found.append(match.group(1))
    return [" ".join(line.split()[1:]) for line in found if line.split()[1:]]


def variants(line: str) -> list[list[str]]:
    """The words of a documented command line, one list per choice of its ``a|b`` alternatives."""
    words = [w for w in line.replace("[", " ").replace("]", " ").split() if w != "..."]
    return [list(choice) for choice in itertools.product(*(w.split("|") for w in words))]


def answers_alone(parser: argparse.ArgumentParser) -> set[str]:
    """The flags that answer without a subcommand (``launch --version``, ``--help``)."""
    alone = (argparse._VersionAction, argparse._HelpAction)
    return {s for a in parser._actions if isinstance(a, alone) for s in a.option_strings}


def command_problem(words: list[str]) -> str | None:
    """What in ``launch WORDS`` the command line does not have (help-level: subcommands and flags), or None."""
    parser = build_parser()
    words = list(words)
    while True:
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not commands:
            break
        if words[:1] and words[0] in answers_alone(parser):
            return None
        if not words or words[0].startswith("-"):
            return f"`{parser.prog}` needs one of {', '.join(commands[0].choices)}"
        name = words.pop(0)
        if name not in commands[0].choices:
            return f"`{parser.prog}` has no command {name!r}; it has {', '.join(commands[0].choices)}"
        parser = commands[0].choices[name]
    flags = {s for a in parser._actions for s in a.option_strings}
    for word in words:
        if word.startswith("-") and not re.match(r"-\d", word) and word.split("=")[0] not in flags:
            return f"`{parser.prog}` has no flag {word.split('=')[0]}; it has {', '.join(sorted(flags))}"
    positionals = [a for a in parser._actions if not a.option_strings]
    if positionals and positionals[0].choices and words and not words[0].startswith("-"):
        if words[0] not in positionals[0].choices:
            return f"`{parser.prog}` takes {', '.join(positionals[0].choices)}, not {words[0]!r}"
    return None


def test_the_checker_finds_commands_and_refuses_what_launch_does_not_have() -> None:
    text = (
        "Run `launch pretrain pcae --nodes 4` or:\n\n```bash\nbash setup.sh && .venv/bin/launch status RUN  # note\n"
        "launch finetune RUN --cluster C \\\n    --nodes 4 data.root=X; launch cluster show [NAME]\n"
        "launcher/   cli.py   the `launch` command\n```\n"
    )
    assert command_lines(text) == [
        "pretrain pcae --nodes 4",
        "status RUN",
        "finetune RUN --cluster C --nodes 4 data.root=X",
        "cluster show [NAME]",
    ]
    assert variants("export R [--encoder student|teacher]") == [
        ["export", "R", "--encoder", "student"],
        ["export", "R", "--encoder", "teacher"],
    ]
    for line in command_lines(text):
        assert command_problem(variants(line)[0]) is None, line
    assert "no flag --nodez" in command_problem("pretrain pcae --nodez 4".split())
    assert "no command 'pretrian'" in command_problem("pretrian pcae".split())
    assert "needs one of lunarlander, shard, check" in command_problem(["data"])
    assert command_problem(["--version"]) is None and command_problem(["status", "--help"]) is None
    assert "needs one of" in command_problem(["--verison"])
    assert "not 'ae-loss'" in command_problem("tune ae-loss".split())


@pytest.mark.parametrize("path", docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_line_parses(path: Path) -> None:
    lines = command_lines(path.read_text())
    problems = [
        f"`launch {line}`: {problem}"
        for line in lines
        for words in variants(line)
        if (problem := command_problem(words)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_the_docs_hold_command_lines() -> None:
    """The checks above see the README's commands (so they cannot pass by finding none)."""
    lines = command_lines((REPO / "README.md").read_text())
    assert "pretrain pcae --local" in lines and len(lines) >= 2


# ----------------------------------------------------------------------------- figures


def figures(text: str) -> list[tuple[str, str]]:
    """Each figure (table or image) of a Markdown text with its caption: the paragraph just above it."""
    prose, _ = split_fences(text)
    found, caption = [], ""
    for block in re.split(r"\n\s*\n", prose):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        text_lines = list(itertools.takewhile(lambda line: not line.startswith(("|", "![")), lines))
        if text_lines:
            caption = " ".join(text_lines)
        if len(text_lines) < len(lines):
            found.append((lines[len(text_lines)], caption))
    return found


def test_the_figure_convention_is_checked() -> None:
    text = "Intro.\n\n**Speed** (`launch bench pretrain`):\n\n| a | b |\n|---|---|\n\n![plot](x.png)\n\nTwo:\n| c |\n"
    assert figures(text) == [
        ("| a | b |", "**Speed** (`launch bench pretrain`):"),
        ("![plot](x.png)", "**Speed** (`launch bench pretrain`):"),
        ("| c |", "Two:"),
    ]
    assert not figure_commands("Two:") and figure_commands("(`launch bench pretrain`):") == ["bench pretrain"]


def figure_commands(caption: str) -> list[str]:
    return [span.split(maxsplit=1)[1] for span in code_spans(caption) if span.startswith("launch ")]


@pytest.mark.parametrize("path", reports(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_figure_names_the_command_that_produced_it(path: Path) -> None:
    missing = []
    for figure, caption in figures(path.read_text()):
        commands = figure_commands(caption)
        if not commands or any(command_problem(variants(c)[0]) for c in commands):
            missing.append(f"{figure[:60]!r} under {caption[:80]!r}")
    assert not missing, (
        "each table or image needs the command that produced it, as `launch ...` in the paragraph just above it:\n"
        + "\n".join(missing)
    )


# ----------------------------------------------------------------------------- cluster profiles


def profile_key_table() -> str:
    text = SLURM_README.read_text()
    match = re.search(r"<!-- profile keys:[^\n]*-->\n(.*?)<!-- end of profile keys -->", text, re.S)
    assert match, f"{SLURM_README} has lost its table of profile keys (and the comments around it)"
    return match.group(1)


def test_the_profile_key_table_is_generated_from_the_dataclass() -> None:
    expected = profile_reference()
    assert profile_key_table() == expected, (
        f"slurm/README.md's table of profile keys is out of date; replace it with:\n{expected}"
    )
    assert set(field_comments(ClusterProfile)) == {f for f in ClusterProfile.__dataclass_fields__}


def example_profiles() -> list[tuple[str, str]]:
    """(where, YAML text) of every shipped profile and of every profile in a YAML block of the docs."""
    found = [(path.name, path.read_text()) for path in sorted(clusters_dir().glob("*.yaml"))]
    for path in docs():
        for block in re.findall(r"^```ya?ml\n(.*?)^```", path.read_text(), re.S | re.M):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "runs_dir" in data:
                found.append((path.name, block))
    return found


def full_example() -> dict:
    """slurm/README.md's example profile, which sets every key."""
    examples = [yaml.safe_load(text) for where, text in example_profiles() if where == SLURM_README.name]
    assert examples, "slurm/README.md has no example profile (a ```yaml block with runs_dir)"
    return examples[0]


def test_every_example_profile_loads_through_the_real_loader(tmp_path: Path) -> None:
    examples = example_profiles()
    assert any(where == SLURM_README.name for where, _ in examples)
    for i, (where, text) in enumerate(examples):
        path = tmp_path / f"example{i}-from-{where}.yaml"  # named in the loader's message
        path.write_text(text)
        parse_profile(path)  # a ConfigError names the file and the key
    assert set(full_example()) == {f for f in ClusterProfile.__dataclass_fields__}


def keys_named(text: str, profile_doc: bool) -> set[str]:
    """Profile keys a text names: in the profile's own doc, every snake_case name in backticks;
    elsewhere, "the profile's `KEY`"."""
    if profile_doc:
        return {span for span in code_spans(split_fences(text)[0]) if re.fullmatch(r"[a-z]+(?:_[a-z]+)+", span)}
    return set(re.findall(r"profile's\s+`(\w+)`", text))


def test_every_profile_key_the_docs_name_loads_through_the_real_loader(tmp_path: Path) -> None:
    example = full_example()
    required = {k: example[k] for k in ("partition", "runs_dir", "max_nodes", "time_min")}
    named = {key: path.name for path in docs() for key in keys_named(path.read_text(), path == SLURM_README)}
    assert {"runs_dir", "signal_delay_s", "gpus_per_node"} <= set(named)
    refused = []
    for key, where in sorted(named.items()):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({**required, key: example.get(key, "?")}))
        try:
            parse_profile(path)
        except ConfigError as e:
            refused.append(f"{where} names `{key}`: {e}")
    assert not refused, "\n".join(refused)


def test_a_key_the_loader_refuses_would_be_caught(tmp_path: Path) -> None:
    """The old slurm/README.md named `preempt_partition`, which profiles refuse."""
    old = "Profile keys (all others are rejected): `partition`, `max_nodes`, `preempt_partition`."
    assert keys_named(old, profile_doc=True) == {"max_nodes", "preempt_partition"}
    path = tmp_path / "p.yaml"
    path.write_text("partition: batch\nruns_dir: /var/tmp/x\nmax_nodes: 1\ntime_min: 5\npreempt_partition: urgent\n")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_profile(path)


# ----------------------------------------------------------------------------- paths


def repo_paths(text: str) -> list[str]:
    """Paths of this repository named in backticks (``launcher/slurm/submit.py``); ``{a,b}`` expanded."""
    found = []
    for span in code_spans(text):
        if re.fullmatch(r"(?:launcher|methods|experiments|slurm|tests|docs)/[\w./{},-]*", span):
            head, _, rest = span.partition("{")
            options, _, tail = rest.partition("}")
            found += [head + option + tail for option in options.split(",")] if rest else [span]
    return found


@pytest.mark.parametrize("path", docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_the_docs_name_exists(path: Path) -> None:
    missing = [p for p in repo_paths(split_fences(path.read_text())[0]) if not (REPO / p).exists()]
    assert not missing, f"{path.name} names paths that do not exist: {', '.join(missing)}"


# ----------------------------------------------------------------------------- the README's size


README_MAX_LINES = 200


def test_the_readme_stays_a_short_guide() -> None:
    """The README is a user's guide; long measured reports belong in docs/, linked from it."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} by moving a long report or "
        "reference section into docs/ (one file per subject) and linking it from 'Where the numbers are'"
    )
