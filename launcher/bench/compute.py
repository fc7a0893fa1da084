"""Compute benchmarks that print ratios measured side by side in one process.

``launch bench pretrain``: PCAE and MAE training steps (forward, backward, AdamW step,
EMA update) on random images, alternating after a warm-up, at each ViT size asked for.
It prints images/s, the measured PCAE/MAE speed ratio next to the ratio of their
counted FLOPs (``torch.utils.flop_counter``), and the achieved FLOP/s as a fraction of
this machine's dense matmul peak, measured in the same run (fp32 on CPU, bf16 on GPU).

``launch bench finetune``: inference of the fine-tuning ViT-B/16 at 224 px with PCAE's token
reduction at drop ratios 0 to 0.4, side by side: images/s, counted FLOPs, and the measured
speed-up next to the FLOP reduction.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from launcher.cpu_allocator import keep_freed_memory
from launcher.trainer import OptimConfig, build_optimizer
from methods import build_method, get_method
from methods.autoencoders import PROCEDURES

DEFAULT_BATCH = {"micro": 64, "tiny": 64, "small": 32, "base": 16, "large": 4, "huge": 2}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """Best sustained FLOP/s of an n x n x n matmul: the ceiling a training step can approach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    repeats = 10 if device.type == "cuda" else 1  # one launch is too short to time on a GPU
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = max(best, repeats * 2 * n**3 / (time.perf_counter() - start))
    return best


@contextmanager
def counting_flops(model: torch.nn.Module) -> Iterator[FlopCounterMode]:
    """Count FLOPs with attention as explicit matmuls: the fused CPU kernel is invisible to the counter."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for module in fused:
        module.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        for module in fused:
            module.fused_attn = True


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    flops_per_step: float
    times: list[float]


def make_contender(
    method: str, size: str, batch: dict[str, torch.Tensor], device: torch.device, autocast: bool
) -> Contender:
    cfg = get_method(method).make_config(size=size, img_size=224, patch_size=14 if size == "huge" else 16)
    model = build_method(cfg).to(device).train()
    contender = Contender(method, model, build_optimizer(model, OptimConfig()), 0.0, [])
    contender.flops_per_step = count_flops(contender, batch, device, autocast)
    return contender


def count_flops(c: Contender, batch: dict[str, torch.Tensor], device: torch.device, autocast: bool) -> float:
    """FLOPs of one training step (forward, backward), counted while it runs (the step is taken)."""
    with counting_flops(c.model) as counter:
        step(c, batch, device, autocast)
    return counter.get_total_flops()


def step(c: Contender, batch: dict[str, torch.Tensor], device: torch.device, autocast: bool) -> None:
    """One training step as the trainer takes it."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = c.model(batch)["loss"]
    loss.backward()
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    if hasattr(c.model, "on_step_end"):
        c.model.on_step_end(1, 1000)


def time_alternating(
    contenders: list[Contender], run: Callable[[Contender], None], device: torch.device, warmup: int, steps: int
) -> None:
    """Untimed warm-up runs, then timed runs taking turns, so drifts in clock speed hit all alike."""
    for _ in range(warmup):
        for c in contenders:
            run(c)
    for _ in range(steps):
        for c in contenders:
            synchronize(device)
            start = time.perf_counter()
            run(c)
            synchronize(device)
            c.times.append(time.perf_counter() - start)


def describe_machine(device: torch.device) -> str:
    """The device in words, e.g. "cpu (x86_64, 2 threads); torch 2.14.1"."""
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    return f"{device.type} ({where}); torch {torch.__version__}"


def describe_device() -> tuple[torch.device, bool, float]:
    """The device, whether to autocast to bf16 (GPU), and its matmul peak; prints them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    autocast = device.type == "cuda"
    peak = matmul_peak(device, torch.bfloat16 if autocast else torch.float32)
    print(f"device: {describe_machine(device)}")
    print(f"{'bf16' if autocast else 'fp32'} matmul peak (2048^3, measured now): {peak / 1e12:.3f} TFLOP/s\n")
    return device, autocast, peak


def bench_pretrain(args: argparse.Namespace) -> int:
    device, autocast, peak = describe_device()
    header = f"{'size':<6}{'batch':>6}  {'method':<6}{'img/s':>9}{'GFLOP/img':>11}{'TFLOP/s':>9}{'of peak':>9}"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        batch_size = args.batch_size or DEFAULT_BATCH[size]
        generator = torch.Generator().manual_seed(0)
        batch = {
            "image": torch.randn(batch_size, 3, 224, 224, generator=generator).to(device),
            "seed": torch.arange(batch_size, device=device),
        }
        contenders = [make_contender(m, size, batch, device, autocast) for m in ("mae", "pcae")]
        time_alternating(
            contenders, lambda c, batch=batch: step(c, batch, device, autocast), device, args.warmup, args.steps
        )
        speed = {}
        for c in contenders:
            seconds = statistics.median(c.times)
            speed[c.name] = batch_size / seconds
            achieved = c.flops_per_step / seconds
            print(
                f"{size:<6}{batch_size:>6}  {c.name:<6}{speed[c.name]:>9.2f}"
                f"{c.flops_per_step / batch_size / 1e9:>11.2f}{achieved / 1e12:>9.3f}{achieved / peak:>9.1%}"
            )
            del c.model, c.optimizer
        mae, pcae = contenders
        flop_ratio = mae.flops_per_step / pcae.flops_per_step
        measured = speed["pcae"] / speed["mae"]
        print(
            f"{size:<6} PCAE/MAE speed: measured {measured:.3f}, FLOP ratio {flop_ratio:.3f}, "
            f"measured / FLOP ratio {measured / flop_ratio:.3f} (target >= 0.95)\n"
        )
    return 0


# PCAE paper, Table 5 (ViT-B/16, ImageNet): MACs (G) per image at each drop ratio; its drop
# positions are not published, so ours (those of pretraining) need not give the same counts.
PAPER_TABLE5_GMACS = {0.0: 17.57, 0.1: 15.34, 0.2: 13.19, 0.3: 11.29, 0.4: 9.53}


def bench_finetune(args: argparse.Namespace) -> int:
    """Inference of the fine-tuning ViT with PCAE's token reduction at several drop ratios."""
    from methods.classifier import ClassifierConfig

    device, autocast, peak = describe_device()
    ratios = [float(r) for r in args.drop_ratios.split(",")]
    batch_size = args.batch_size or (256 if device.type == "cuda" else 16)
    images = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    contenders, tokens = [], {}
    for ratio in ratios:
        torch.manual_seed(0)
        cfg = ClassifierConfig(size=args.size, keep_ratio=round(1.0 - ratio, 6))
        model = build_method(cfg).to(device).eval()
        contender = Contender(f"{ratio:g}", model, None, 0.0, [])
        with counting_flops(model) as counter, torch.no_grad():
            model.predict(images)
        contender.flops_per_step = counter.get_total_flops()
        tokens[contender.name] = cfg.token_counts
        contenders.append(contender)

    def infer(c: Contender) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            c.model.predict(images)

    time_alternating(contenders, infer, device, args.warmup, args.steps)
    print(
        f"ViT-{args.size[0].upper()}/16 at 224 px, batch {batch_size}, inference; token reduction after "
        f"blocks {list(ClassifierConfig(size=args.size, keep_ratio=0.5).resolved_drop_positions)}\n"
    )
    header = (
        f"{'drop':>5}{'patch tokens per stage':>25}{'img/s':>9}{'GFLOP/img':>11}{'of peak':>9}"
        f"{'img/s gain':>12}{'FLOP gain':>11}{'gain ratio':>12}{'paper GMACs':>13}"
    )
    print(header)
    print("-" * len(header))
    base_speed = batch_size / statistics.median(contenders[0].times)
    worst = None
    for c in contenders:
        speed = batch_size / statistics.median(c.times)
        # Gains as the paper states them (+15% throughput): measured vs what the FLOPs allow.
        gain, flop_gain = speed / base_speed - 1, contenders[0].flops_per_step / c.flops_per_step - 1
        ratio = gain / flop_gain if flop_gain > 0 else None
        if ratio is not None:
            worst = ratio if worst is None else min(worst, ratio)
        paper = PAPER_TABLE5_GMACS.get(float(c.name)) if args.size == "base" else None
        print(
            f"{c.name:>5}{' -> '.join(map(str, tokens[c.name])):>25}{speed:>9.2f}"
            f"{c.flops_per_step / batch_size / 1e9:>11.2f}{c.flops_per_step / batch_size * speed / peak:>9.1%}"
            f"{gain:>+12.1%}{flop_gain:>+11.1%}{'-' if ratio is None else f'{ratio:.3f}':>12}"
            f"{paper if paper else '-':>13}"
        )
    if worst is not None:
        print(f"\nthroughput gain / FLOP gain, worst drop ratio: {worst:.3f} (target >= 0.9)")
    return 0


def bench_ae_losses(args: argparse.Namespace) -> int:
    """Steps alternating on one synthetic batch, then one real epoch each through the trainer."""
    import tempfile
    from pathlib import Path

    from launcher.data import DataConfig, prepare
    from launcher.experiment import ExperimentConfig
    from launcher.trainer import TrainConfig, Trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    autocast = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device: {device.type} ({where}); batch 128, 64 px, z 64, loss network {args.loss_network}\n")
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(128, 3, 64, 64, generator=generator).to(device),
        "seed": torch.arange(128, device=device),
    }
    optim = OptimConfig(blr=2e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_epochs=0.0)
    contenders = []
    for name in PROCEDURES:
        cfg = get_method(name).make_config(img_size=64, z=64, loss_network=args.loss_network)
        model = build_method(cfg).to(device).train()
        contenders.append(Contender(name, model, build_optimizer(model, optim), 0.0, []))
    time_alternating(contenders, lambda c: step(c, batch, device, autocast), device, warmup=1, steps=args.steps)
    step_time = {c.name: statistics.median(c.times) for c in contenders}
    del contenders

    epoch_time = {}
    data = DataConfig(
        name="lunarlander",
        root=str(args.data),
        generate_frames=args.frames,
        augment="none",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_workers=2,
    )
    prepare(data, 64)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROCEDURES:
            cfg = ExperimentConfig(
                method=get_method(name).make_config(img_size=64, z=64, loss_network=args.loss_network),
                data=data,
                optim=optim,
                train=TrainConfig(
                    num_epochs=1, global_batch_size=128, micro_batch_size=128, log_every=1, checkpoint_every=10**6
                ),
            )
            trainer = Trainer(cfg, Path(tmp) / name)
            start = time.perf_counter()
            steps = trainer.fit().step  # the same epoch length for every procedure
            epoch_time[name] = time.perf_counter() - start
    print(f"{'procedure':<10}{'s/step':>9}{'s/epoch':>10}   (epoch: {steps} steps of 128 LunarLander frames)")
    for name, procedure in PROCEDURES.items():
        print(f"{procedure.label:<10}{step_time[name]:>9.3f}{epoch_time[name]:>10.2f}")
    ps = step_time["ae_iffp"] / step_time["ae_iips"]
    pw = step_time["ae_iffp"] / step_time["ae_iipw"]
    print(f"\nI-F-FP / I-I-PS time per step: {ps:.3f} (target <= 0.65; reference release 0.72)")
    print(f"I-F-FP / I-I-PW time per step: {pw:.3f} (target <= 0.95; reference release 1.04)")
    print(
        f"per epoch: I-F-FP / I-I-PS {epoch_time['ae_iffp'] / epoch_time['ae_iips']:.3f}, "
        f"I-F-FP / I-I-PW {epoch_time['ae_iffp'] / epoch_time['ae_iipw']:.3f}"
    )
    return 0
