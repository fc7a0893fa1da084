"""``launch bench checkpoint`` prints a save before and after as a ratio to a training step (a smoke
test: no timing is asserted)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import launch


def test_bench_checkpoint_prints_the_save_before_and_after_in_training_steps(tmp_path: Path, capsys) -> None:
    command = f"bench checkpoint --size micro --method mae --batch-size 2 --steps 1 --repeats 1 --dir {tmp_path}"
    assert launch(command) == 0
    out = capsys.readouterr().out
    line = re.search(
        r"checkpoint save, ViT-micro mae, batch 2 \(\d+ MiB\): training step ([\d.]+) s; save before ([\d.]+) s = "
        r"[\d.]+ steps, after ([\d.]+) s = [\d.]+ steps \([\d.]+x\); resume verification [\d.]+ s",
        out,
    )
    assert line is not None, out
    step, before, after = map(float, line.groups())
    assert step > 0 and before >= after > 0
    assert list(tmp_path.iterdir()) == []  # the run and its images were temporary
