"""The strict loader: overrides, types, unknown keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.config import field_comments, parse_override
from launcher.errors import ConfigError
from launcher.experiment import experiment_from_dict, load_experiment
from launcher.shipped import experiments_dir

EXPERIMENTS_DIR = experiments_dir()


def test_overrides_apply_with_types() -> None:
    cfg = load_experiment(
        EXPERIMENTS_DIR / "pretrain" / "pcae_vit_base.yaml",
        ["optim.blr=1e-4", "method.mask_ratio=0.8", "data.root=/x", "optim.clip_grad=null"],
    )
    assert cfg.optim.blr == 1e-4 and cfg.method.mask_ratio == 0.8 and cfg.data.root == "/x"
    assert cfg.optim.clip_grad is None


def test_int_widens_to_float_but_not_the_reverse() -> None:
    cfg = experiment_from_dict({"method": {"name": "mae"}, "optim": {"blr": 1}})
    assert cfg.optim.blr == 1.0 and isinstance(cfg.optim.blr, float)
    with pytest.raises(ConfigError, match=r"train\.num_epochs must be a int"):
        experiment_from_dict({"method": {"name": "mae"}, "train": {"num_epochs": 1.5}})


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=1"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty; give at least the keys"),
        ("# only a comment\n", "is empty"),
        ("train:\n  num_epochs: 2\n  num_epochs: 3\n", r"the key 'num_epochs' is given twice \(line 3\)"),
        ("optim: {blr: 1, blr: 2}\n", "the key 'blr' is given twice"),
    ],
)
def test_an_empty_file_and_a_key_given_twice_are_refused(tmp_path, text: str, message: str) -> None:
    from launcher.config import read_yaml
    from launcher.errors import ConfigError

    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        read_yaml(path)
    assert "\n" not in str(raised.value)  # one paragraph


@pytest.mark.parametrize(
    "flags",
    [
        "optim.blr=nan",
        "optim.blr=inf",
        "optim.blr=.nan",
        "optim.min_lr=-.inf",
        "optim.clip_grad=.inf",
        "data.min_crop_scale=NaN",
    ],
)
def test_nan_and_infinities_are_refused_where_a_float_is_read(tmp_path: Path, capsys, flags: str) -> None:
    from tests.helpers import launch

    assert launch(f"pretrain pcae --dry-run --run-dir {tmp_path / 'run'} {flags}") == 2
    key = flags.split("=")[0]
    assert f"{key} must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("budget", ["nan", "inf", "infm", "-inf"])
def test_a_study_budget_must_be_a_finite_wall_time(tmp_path: Path, capsys, budget: str) -> None:
    from tests.helpers import launch

    assert launch(f"study pcae-vs-mae --dry-run --budget={budget} --study-dir {tmp_path / 'study'}") == 2
    assert "is not a positive, finite wall time" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_an_experiment_file_that_is_not_utf8_is_one_paragraph(tmp_path: Path, capsys) -> None:
    from tests.helpers import launch

    (tmp_path / "latin1.yaml").write_bytes("optim: {blr: 1.0e-3}  # réglé\n".encode("latin-1"))
    assert launch(f"pretrain pcae --dry-run --experiment {tmp_path / 'latin1.yaml'} --run-dir {tmp_path / 'r'}") == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "save it as UTF-8" in err and "Traceback" not in err


@dataclass
class Commented:
    """A config whose fields say what they are in comments."""

    # above a field,
    # over two lines
    first: int
    second: str = "# not a comment"  # after a field
    third: float = 0.0

    # above the last one
    last: tuple[int, ...] = ()


def test_field_comments_reads_what_each_field_says() -> None:
    assert field_comments(Commented) == {
        "first": "above a field, over two lines",
        "second": "after a field",
        "last": "above the last one",
    }
