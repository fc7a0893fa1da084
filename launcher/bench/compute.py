"""Compute benchmarks that print ratios measured side by side in one process.

``launch bench pretrain``: training steps (forward, backward, AdamW step, EMA update) of
MAE at mask .75 and PCAE at .75 and .85 (the paper's settings) on random images, eager and/or
compiled, alternating after a warm-up, at each ViT size asked for. It prints images/s, each
PCAE/MAE speed ratio next to the ratio of their counted FLOPs (``torch.utils.flop_counter``),
and the achieved FLOP/s as a fraction of this machine's dense matmul peak (MFU), measured in
the same run between the timed steps (fp32 on CPU, bf16 on GPU).

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
from launcher.methods import build_method, get_method
from launcher.methods.autoencoders import PROCEDURES
from launcher.methods.protocol import StepHook
from launcher.optim import OptimConfig, build_optimizer

DEFAULT_BATCH = {"micro": 64, "tiny": 64, "small": 32, "base": 16, "large": 4, "huge": 2}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulPeak:
    """The device's dense matmul FLOP/s: the best of several GEMM shapes, sampled again and again.

    One square GEMM is not a peak (the CPU ran one ViT's steps at 108% of a single 2048^3 one):
    other shapes run faster, and a clock that drifts during a run moves both. So the shapes
    include the model's own largest ones, and ``sample()`` runs between the contenders' timed
    steps, so the peak is the best the device did while they were timed.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int]] = ()) -> None:
        square = (4096, 8192) if device.type == "cuda" else (1024, 2048)
        self.device, self.dtype = device, dtype
        self.shapes = sorted({*((n, n, n) for n in square), *shapes})
        self.best, self.best_shape = 0.0, self.shapes[0]
        self.operands = {}
        for m, k, n in self.shapes:
            self.operands[(m, k, n)] = (
                torch.randn(m, k, device=device, dtype=dtype),
                torch.randn(k, n, device=device, dtype=dtype),
                torch.empty(m, n, device=device, dtype=dtype),
            )
        for _ in range(2):  # warms up every kernel, and a first estimate
            self.sample()

    def sample(self) -> float:
        """Time every shape once (a GPU: enough launches to last ~20 ms); returns the best so far."""
        for shape, (a, b, out) in self.operands.items():
            flops = 2 * shape[0] * shape[1] * shape[2]
            repeats = max(1, int(2e13 / flops)) if self.device.type == "cuda" else 1  # ~20 ms at 1 PFLOP/s
            synchronize(self.device)
            start = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b, out=out)
            synchronize(self.device)
            rate = repeats * flops / (time.perf_counter() - start)
            if rate > self.best:
                self.best, self.best_shape = rate, shape
        return self.best

    def describe(self) -> str:
        m, k, n = self.best_shape
        name = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        return (
            f"{name} matmul peak {self.best / 1e12:.3f} TFLOP/s: the best of {len(self.shapes)} GEMM shapes "
            f"({m}x{k}x{n} the fastest), sampled between the timed steps"
        )

    def fraction(self, achieved: float) -> str:
        """``achieved`` as a fraction of the peak; above 100% the peak is wrong, and it says so."""
        if achieved > self.best:
            return f"{achieved / self.best:.1%} (above the measured peak: a GEMM shape is missing)"
        return f"{achieved / self.best:.1%}"


def model_gemm_shapes(size: str, batch_size: int, img_size: int = 224, patch_size: int = 16) -> list[tuple]:
    """The largest matmuls of a ViT step at ``size``: all tokens of the batch through the MLP."""
    from launcher.methods.vit import vit_size

    width = vit_size(size).embed_dim
    tokens = batch_size * (img_size // patch_size) ** 2
    return [(tokens, width, 4 * width), (tokens, 4 * width, width)]


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
    method: str, size: str, batch: dict[str, torch.Tensor], device: torch.device, autocast: bool, **fields
) -> Contender:
    cfg = get_method(method).make_config(size=size, img_size=224, patch_size=14 if size == "huge" else 16, **fields)
    model = build_method(cfg).to(device).train()
    optimizer = build_optimizer(model, OptimConfig(), fused=device.type == "cuda")
    contender = Contender(method, model, optimizer, 0.0, [])
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
    if isinstance(c.model, StepHook):
        c.model.on_step_end(1, 1000)


def time_alternating(
    contenders: list[Contender],
    run: Callable[[Contender], None],
    device: torch.device,
    warmup: int,
    steps: int,
    between: Callable[[], object] | None = None,
) -> None:
    """Untimed warm-up runs, then timed runs taking turns, so drifts in clock speed hit all alike.

    ``between`` (a peak measurement) runs after every round of timed runs.
    """
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
        if between is not None:
            between()


def describe_machine(device: torch.device) -> str:
    """The device in words, e.g. "cpu (x86_64, 2 threads); torch 2.14.1"."""
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    return f"{device.type} ({where}); torch {torch.__version__}"


def describe_device() -> tuple[torch.device, bool]:
    """The device and whether to autocast to bf16 (a GPU); prints it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    print(f"device: {describe_machine(device)}")
    return device, device.type == "cuda"


# The paper's settings (PCAE Table 6: 550.5 img/s at mask .75, 739.7 at .85, MAE 328.4, V100s).
PRETRAIN_CONTENDERS = (("mae", 0.75), ("pcae", 0.75), ("pcae", 0.85))


def bench_pretrain(args: argparse.Namespace) -> int:
    device, autocast = describe_device()
    modes = args.modes.split(",")
    if not set(modes) <= {"eager", "compiled"}:
        raise ValueError(f"--modes takes eager and/or compiled, got {args.modes}")
    for size in args.sizes.split(","):
        batch_size = args.batch_size or DEFAULT_BATCH[size] * (16 if device.type == "cuda" else 1)
        generator = torch.Generator().manual_seed(0)
        batch = {
            "image": torch.randn(batch_size, 3, 224, 224, generator=generator).to(device),
            "seed": torch.arange(batch_size),  # on the host, as the trainer leaves it
        }
        peak = MatmulPeak(device, torch.bfloat16 if autocast else torch.float32, model_gemm_shapes(size, batch_size))
        contenders = []
        for mode in modes:
            for method, mask in PRETRAIN_CONTENDERS:
                contender = make_contender(method, size, batch, device, autocast, mask_ratio=mask)
                contender.name = f"{method} {mask:g} {mode}"
                if mode == "compiled":
                    contender.model.compile()
                contenders.append(contender)
        # Compiling happens in the warm-up: at least one untimed step each.
        warmup = max(args.warmup, 2 if "compiled" in modes else 0)
        time_alternating(
            contenders, lambda c, b=batch: step(c, b, device, autocast), device, warmup, args.steps, peak.sample
        )
        print(peak.describe())
        header = f"{'size':<6}{'batch':>6}  {'contender':<20}{'img/s':>9}{'GFLOP/img':>11}{'TFLOP/s':>9}  of peak"
        print(header)
        print("-" * len(header))
        speed, flops = {}, {}
        for c in contenders:
            seconds = statistics.median(c.times)
            speed[c.name], flops[c.name] = batch_size / seconds, c.flops_per_step
            achieved = c.flops_per_step / seconds
            print(
                f"{size:<6}{batch_size:>6}  {c.name:<20}{speed[c.name]:>9.2f}"
                f"{c.flops_per_step / batch_size / 1e9:>11.2f}{achieved / 1e12:>9.3f}  {peak.fraction(achieved)}"
            )
            del c.model, c.optimizer
        for mode in modes:
            mae = f"mae 0.75 {mode}"
            for mask in (0.75, 0.85):
                pcae = f"pcae {mask:g} {mode}"
                measured, flop_ratio = speed[pcae] / speed[mae], flops[mae] / flops[pcae]
                print(
                    f"{size:<6} {mode}: PCAE {mask:g} / MAE 0.75 speed: measured {measured:.3f}, FLOP ratio "
                    f"{flop_ratio:.3f}, measured / FLOP ratio {measured / flop_ratio:.3f} (target >= 0.95)"
                )
        if len(modes) == 2:
            for method, mask in PRETRAIN_CONTENDERS:
                ratio = speed[f"{method} {mask:g} compiled"] / speed[f"{method} {mask:g} eager"]
                print(f"{size:<6} {method} {mask:g}: compiled / eager speed {ratio:.3f}")
        print()
    return 0


# PCAE paper, Table 5 (ViT-B/16, ImageNet): MACs (G) per image at each drop ratio; its drop
# positions are not published, so ours (those of pretraining) need not give the same counts.
PAPER_TABLE5_GMACS = {0.0: 17.57, 0.1: 15.34, 0.2: 13.19, 0.3: 11.29, 0.4: 9.53}


def bench_finetune(args: argparse.Namespace) -> int:
    """Inference of the fine-tuning ViT with PCAE's token reduction at several drop ratios."""
    from launcher.methods.classifier import ClassifierConfig

    device, autocast = describe_device()
    ratios = [float(r) for r in args.drop_ratios.split(",")]
    batch_size = args.batch_size or (256 if device.type == "cuda" else 16)
    peak = MatmulPeak(device, torch.bfloat16 if autocast else torch.float32, model_gemm_shapes(args.size, batch_size))
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

    time_alternating(contenders, infer, device, args.warmup, args.steps, peak.sample)
    print(peak.describe())
    print(
        f"ViT-{args.size[0].upper()}/16 at 224 px, batch {batch_size}, inference; token reduction after "
        f"blocks {list(ClassifierConfig(size=args.size, keep_ratio=0.5).resolved_drop_positions)}\n"
    )
    header = (
        f"{'drop':>5}{'patch tokens per stage':>25}{'img/s':>9}{'GFLOP/img':>11}"
        f"{'img/s gain':>12}{'FLOP gain':>11}{'gain ratio':>12}{'paper GMACs':>13}  of peak"
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
            f"{c.flops_per_step / batch_size / 1e9:>11.2f}"
            f"{gain:>+12.1%}{flop_gain:>+11.1%}{'-' if ratio is None else f'{ratio:.3f}':>12}"
            f"{paper if paper else '-':>13}  {peak.fraction(c.flops_per_step / batch_size * speed)}"
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
    from launcher.optim import TrainConfig
    from launcher.trainer import Trainer

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
