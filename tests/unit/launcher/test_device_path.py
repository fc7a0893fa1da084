"""The GPU path, as far as a CPU can check it: fused attention, bf16 autocast, compiled steps, few host reads.

What only a GPU can show (no synchronisation between checks, fused AdamW) is tested at the end,
and skipped without one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launcher.experiment import experiment_from_dict
from launcher.methods import build_method, get_method
from launcher.runs import read_metrics
from launcher.trainer import Trainer
from tests.helpers import tiny_experiment

CUDA = torch.cuda.is_available()


def tiny(method: str, **fields):
    return dataclasses.replace(get_method(method).tiny(), **fields)


def batch_of(cfg, n: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=generator),
        "seed": torch.arange(n),
        "label": torch.zeros(n, dtype=torch.long),
    }


@pytest.mark.parametrize(
    "method, blocks",
    [
        ("pcae", lambda m: len(m.student.blocks) + len(m.teacher.blocks) + len(m.decoder.blocks)),
        ("mae", lambda m: len(m.encoder.blocks) + len(m.decoder.blocks)),
        ("finetune", lambda m: len(m.encoder.blocks)),
    ],
)
def test_every_block_runs_the_fused_attention_kernel(method: str, blocks, monkeypatch) -> None:
    """Each attention of encoder, teacher, decoder and fine-tuning goes through F.scaled_dot_product_attention."""
    model = build_method(tiny(method))
    calls = []
    fused = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model(batch_of(model.cfg))
    assert len(calls) == blocks(model) > 0
    assert all(getattr(m, "fused_attn", True) for m in model.modules())


@pytest.mark.parametrize("method", ["pcae", "mae"])
def test_bf16_autocast_keeps_targets_loss_and_ema_weights_in_fp32(method: str) -> None:
    torch.manual_seed(0)
    model = build_method(tiny(method))
    batch = batch_of(model.cfg)
    torch.manual_seed(1)  # the same stochastic depth in both forwards
    reference = model(batch)["loss"]
    dtypes = []
    qkv = (model.teacher if method == "pcae" else model.encoder).blocks[0].attn.qkv
    qkv.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch)["loss"]
        if method == "pcae":
            masking = model.mask(batch)
            targets = model.teacher_targets(batch["image"], masking.ids_masked)
            assert targets.features.dtype == torch.float32
    assert torch.bfloat16 in dtypes  # the blocks' matmuls (the teacher's, for PCAE) ran in bf16
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) < 0.05 * abs(reference.item())
    loss.backward()
    if method == "pcae":
        model.on_step_end(1, 10)
        assert {p.dtype for p in model.teacher.parameters()} == {torch.float32}


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pcae", "mae"])
def test_compiled_steps_give_the_eager_losses_and_resume_exactly(method: str, image_folder: Path, tmp_path) -> None:
    raw = tiny_experiment(method, image_folder, train={"num_epochs": 2, "checkpoint_every": 3})
    eager = tmp_path / "eager"
    Trainer(experiment_from_dict(raw), eager).fit()
    compiled_cfg = experiment_from_dict({**raw, "train": {**raw["train"], "compile": True}})
    compiled = tmp_path / "compiled"
    Trainer(compiled_cfg, compiled).fit()
    assert len(losses(compiled)) == len(losses(eager)) == 8
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=0, atol=1e-5)
    resumed = tmp_path / "resumed"
    Trainer(compiled_cfg, resumed).fit(until_step=3)
    trainer = Trainer(compiled_cfg, resumed)
    assert trainer.resume()
    trainer.fit()
    assert losses(resumed) == losses(compiled)  # bitwise


def test_the_host_reads_the_device_only_at_checks_and_stops_there(image_folder: Path, tmp_path: Path) -> None:
    """Steps between checks queue work without reading anything back; a stop waits for the next check."""
    raw = tiny_experiment("mae", image_folder, train={"num_epochs": 3, "log_every": 4, "check_every": 3})
    trainer = Trainer(experiment_from_dict(raw), tmp_path / "run")
    checked, step = [], trainer._train_step

    def step_then_maybe_signal(batches, method):
        step(batches, method)
        if trainer.state.step == 7:
            trainer.stop.signal = "SIGUSR2"  # as the handler would, between two checks

    check = trainer._check
    trainer._train_step = step_then_maybe_signal
    trainer._check = lambda: checked.append(trainer.state.step) or check()
    result = trainer.fit()
    assert checked == [3, 4, 6, 8] and result.step == 8  # the stop at step 7 is acted upon at step 8
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [4, 8]
    assert all(r["step_time"] > 0 and r["img_per_s"] > 0 for r in records)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_on_a_gpu_steps_between_checks_never_synchronise(image_folder: Path, tmp_path: Path) -> None:
    raw = tiny_experiment("pcae", image_folder, train={"num_epochs": 2, "log_every": 8, "check_every": 8})
    raw["data"]["num_workers"] = 2
    trainer = Trainer(experiment_from_dict(raw), tmp_path / "run")
    assert trainer.optimizer.optimizer.defaults["fused"]  # under Accelerate's wrapper
    step = trainer._train_step

    def step_under_sync_debug(batches, method):
        ready = iter([next(batches) for _ in range(trainer.accumulation_steps)])  # the loader's waits are its own
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(ready, method)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer._train_step = step_under_sync_debug
    assert trainer.fit().finished
