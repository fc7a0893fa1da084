"""The compute benchmarks print what they measure (smoke tests: no timing is asserted)."""

from __future__ import annotations

from tests.helpers import launch


def test_bench_pretrain_prints_speeds_flops_and_ratios(capsys) -> None:
    assert launch("bench pretrain --sizes micro --batch-size 4 --steps 1 --warmup 0") == 0
    out = capsys.readouterr().out
    assert "fp32 matmul peak" in out or "bf16 matmul peak" in out
    assert "micro      4  mae" in out and "micro      4  pcae" in out
    assert "PCAE/MAE speed: measured" in out and "FLOP ratio" in out


def test_bench_finetune_prints_gains_for_each_drop_ratio(capsys) -> None:
    assert launch("bench finetune --size micro --batch-size 2 --drop-ratios 0,0.4 --steps 1 --warmup 0") == 0
    out = capsys.readouterr().out
    assert "196 -> 117 -> 70 -> 42" in out  # the patch tokens of each stage at drop ratio 0.4
    assert "throughput gain / FLOP gain, worst drop ratio" in out
