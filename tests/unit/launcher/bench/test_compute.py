"""The compute benchmarks print what they measure (smoke tests: no timing is asserted)."""

from __future__ import annotations

import pytest
import torch

from launcher.bench.compute import MatmulPeak
from tests.helpers import launch


def test_bench_pretrain_prints_speeds_flops_and_ratios(capsys) -> None:
    assert launch("bench pretrain --sizes micro --batch-size 4 --steps 1 --warmup 0") == 0
    out = capsys.readouterr().out
    assert "fp32 matmul peak" in out or "bf16 matmul peak" in out
    for contender in ("mae 0.75 eager", "pcae 0.75 eager", "pcae 0.85 eager"):
        assert f"micro      4  {contender}" in out
    assert "eager: PCAE 0.85 / MAE 0.75 speed: measured" in out and "FLOP ratio" in out
    # Every fraction of the peak is at most 100%: the peak is the best of the shapes, sampled between steps.
    fractions = [float(line.rsplit("  ", 1)[1].rstrip("%")) for line in out.splitlines() if line.endswith("%")]
    assert len(fractions) == 3 and all(0 < f <= 100 for f in fractions), out


def test_the_matmul_peak_is_the_best_of_its_shapes_and_says_when_it_is_beaten() -> None:
    peak = MatmulPeak(torch.device("cpu"), torch.float32, [(64, 32, 16)])
    assert (64, 32, 16) in peak.shapes and (1024, 1024, 1024) in peak.shapes
    first = peak.best
    assert peak.sample() >= first > 0
    assert peak.fraction(peak.best / 2) == "50.0%"
    assert "above the measured peak" in peak.fraction(peak.best * 1.1)


def test_bench_finetune_prints_gains_for_each_drop_ratio(capsys) -> None:
    assert launch("bench finetune --size micro --batch-size 2 --drop-ratios 0,0.4 --steps 1 --warmup 0") == 0
    out = capsys.readouterr().out
    assert "196 -> 117 -> 70 -> 42" in out  # the patch tokens of each stage at drop ratio 0.4
    assert "throughput gain / FLOP gain, worst drop ratio" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        ("pretrain --sizes bogus", "unknown ViT size(s) 'bogus'; sizes are micro, tiny"),
        ("pretrain --sizes micro, --steps 1", "unknown ViT size(s) ''"),
        ("pretrain --steps 0", "--steps must be at least 1, got 0"),
        ("pretrain --modes eager,jit", "--modes takes eager and/or compiled"),
        ("finetune --drop-ratios 1.5", "--drop-ratios '1.5' must be comma-separated fractions"),
        ("finetune --drop-ratios 0,1.5", "each in [0, 1), 0 first"),
        ("finetune --drop-ratios 0,x", "must be comma-separated fractions"),
        ("finetune --size bogus", "unknown ViT size(s) 'bogus'"),
        ("ae-losses --steps -1", "--steps must be at least 1, got -1"),
        ("data --images 0", "--images must be at least 1, got 0"),
    ],
)
def test_bad_bench_flags_are_one_paragraph(capsys, flags: str, message: str) -> None:
    assert launch(f"bench {flags}") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
