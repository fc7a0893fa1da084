"""Where finetune and linprobe take their encoder from: what is not a source is refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import launch


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
@pytest.mark.parametrize("name", ["notrun", "/"])
def test_a_folder_that_is_no_run_is_refused_by_its_name(tmp_path: Path, monkeypatch, capsys, command, name) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notrun").mkdir()  # a relative name with no folder above it once failed with IndexError
    assert launch(f"{command} {name} --run-dir {tmp_path / 'out'}") == 2
    assert f"{name} is neither a run directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
