"""Benchmarks that print ratios measured side by side in one process.

``launch bench pretrain``: PCAE and MAE training steps (forward, backward, AdamW step,
EMA update) on random images, alternating after a warm-up, at each ViT size asked for.
It prints images/s, the measured PCAE/MAE speed ratio next to the ratio of their
counted FLOPs (``torch.utils.flop_counter``), and the achieved FLOP/s as a fraction of
this machine's dense matmul peak, measured in the same run (fp32 on CPU, bf16 on GPU).

``launch bench finetune``: inference of the fine-tuning ViT-B/16 at 224 px with PCAE's token
reduction at drop ratios 0 to 0.4, side by side: images/s, counted FLOPs, and the measured
speed-up next to the FLOP reduction.

``launch bench slurm``: on a SLURM cluster (the local test cluster by default), the time
from submitting a tiny PCAE job to its first training step, and from a USR2 signal (what
preemption and the time limit send) to its first step after checkpoint, requeue and resume.
Its images and run directories live in a temporary folder that it removes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from launcher.config import OptimConfig
from launcher.cpu_allocator import keep_freed_memory
from launcher.trainer import build_optimizer
from methods import build_method, get_method

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


def make_contender(method: str, size: str, batch: dict[str, torch.Tensor], device: torch.device,
                   autocast: bool) -> Contender:
    cfg = get_method(method).config(size=size, img_size=224, patch_size=14 if size == "huge" else 16)
    model = build_method(cfg).to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    contender = Contender(method, model, optimizer, 0.0, [])
    with counting_flops(model) as counter:
        step(contender, batch, device, autocast)
    contender.flops_per_step = counter.get_total_flops()
    return contender


def step(c: Contender, batch: dict[str, torch.Tensor], device: torch.device, autocast: bool) -> None:
    """One training step as the trainer takes it."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = c.model(batch)["loss"]
    loss.backward()
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    if hasattr(c.model, "on_step_end"):
        c.model.on_step_end(1, 1000)


def time_alternating(contenders: list[Contender], run: Callable[[Contender], None], device: torch.device,
                     warmup: int, steps: int) -> None:
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


def describe_device() -> tuple[torch.device, bool, float]:
    """The device, whether to autocast to bf16 (GPU), and its matmul peak; prints them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    autocast = device.type == "cuda"
    peak = matmul_peak(device, torch.bfloat16 if autocast else torch.float32)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {device.type} ({where}); torch {torch.__version__}")
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
        batch = {"image": torch.randn(batch_size, 3, 224, 224, generator=generator).to(device),
                 "seed": torch.arange(batch_size, device=device)}
        contenders = [make_contender(m, size, batch, device, autocast) for m in ("mae", "pcae")]
        time_alternating(contenders, lambda c: step(c, batch, device, autocast), device, args.warmup, args.steps)
        speed = {}
        for c in contenders:
            seconds = statistics.median(c.times)
            speed[c.name] = batch_size / seconds
            achieved = c.flops_per_step / seconds
            print(f"{size:<6}{batch_size:>6}  {c.name:<6}{speed[c.name]:>9.2f}"
                  f"{c.flops_per_step / batch_size / 1e9:>11.2f}{achieved / 1e12:>9.3f}{achieved / peak:>9.1%}")
            del c.model, c.optimizer
        mae, pcae = contenders
        flop_ratio = mae.flops_per_step / pcae.flops_per_step
        measured = speed["pcae"] / speed["mae"]
        print(f"{size:<6} PCAE/MAE speed: measured {measured:.3f}, FLOP ratio {flop_ratio:.3f}, "
              f"measured / FLOP ratio {measured / flop_ratio:.3f} (target >= 0.95)\n")
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
    print(f"ViT-{args.size[0].upper()}/16 at 224 px, batch {batch_size}, inference; token reduction after "
          f"blocks {list(ClassifierConfig(size=args.size, keep_ratio=0.5).resolved_drop_positions)}\n")
    header = (f"{'drop':>5}{'patch tokens per stage':>25}{'img/s':>9}{'GFLOP/img':>11}{'of peak':>9}"
              f"{'img/s gain':>12}{'FLOP gain':>11}{'gain ratio':>12}{'paper GMACs':>13}")
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
        print(f"{c.name:>5}{' -> '.join(map(str, tokens[c.name])):>25}{speed:>9.2f}"
              f"{c.flops_per_step / batch_size / 1e9:>11.2f}{c.flops_per_step / batch_size * speed / peak:>9.1%}"
              f"{gain:>+12.1%}{flop_gain:>+11.1%}{'-' if ratio is None else f'{ratio:.3f}':>12}"
              f"{paper if paper else '-':>13}")
    if worst is not None:
        print(f"\nthroughput gain / FLOP gain, worst drop ratio: {worst:.3f} (target >= 0.9)")
    return 0


AE_PROCEDURES = {"ae_iipw": "I-I-PW", "ae_iips": "I-I-PS", "ae_iffp": "I-F-FP",
                 "ae_fipw": "F-I-PW", "ae_fips": "F-I-PS", "ae_fffp": "F-F-FP"}


def bench_ae_losses(args: argparse.Namespace) -> int:
    """Steps alternating on one synthetic batch, then one real epoch each through the trainer."""
    import tempfile
    from pathlib import Path

    from launcher.config import DataConfig, ExperimentConfig, TrainConfig
    from launcher.runs import read_metrics
    from launcher.trainer import Trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    autocast = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device: {device.type} ({where}); batch 128, 64 px, z 64, loss network {args.loss_network}\n")
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(128, 3, 64, 64, generator=generator).to(device),
             "seed": torch.arange(128, device=device)}
    optim = OptimConfig(blr=2e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_epochs=0.0)
    contenders = []
    for name in AE_PROCEDURES:
        cfg = get_method(name).config(img_size=64, z=64, loss_network=args.loss_network)
        model = build_method(cfg).to(device).train()
        contenders.append(Contender(name, model, build_optimizer(model, optim), 0.0, []))
    time_alternating(contenders, lambda c: step(c, batch, device, autocast), device, warmup=1, steps=args.steps)
    step_time = {c.name: statistics.median(c.times) for c in contenders}
    del contenders

    epoch_time = {}
    data = DataConfig(name="lunarlander", root=str(args.data), generate_frames=args.frames, augment="none",
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        for name in AE_PROCEDURES:
            cfg = ExperimentConfig(
                method=get_method(name).config(img_size=64, z=64, loss_network=args.loss_network), data=data,
                optim=optim, train=TrainConfig(num_epochs=1, global_batch_size=128, micro_batch_size=128,
                                               log_every=1, checkpoint_every=10**6))
            trainer = Trainer(cfg, Path(tmp) / name)
            start = time.perf_counter()
            trainer.fit()
            epoch_time[name] = time.perf_counter() - start
        steps = len(read_metrics(Path(tmp) / name))  # the same epoch length for every procedure
    print(f"{'procedure':<10}{'s/step':>9}{'s/epoch':>10}   (epoch: {steps} steps of 128 LunarLander frames)")
    for name, label in AE_PROCEDURES.items():
        print(f"{label:<10}{step_time[name]:>9.3f}{epoch_time[name]:>10.2f}")
    ps = step_time["ae_iffp"] / step_time["ae_iips"]
    pw = step_time["ae_iffp"] / step_time["ae_iipw"]
    print(f"\nI-F-FP / I-I-PS time per step: {ps:.3f} (target <= 0.65; reference release 0.72)")
    print(f"I-F-FP / I-I-PW time per step: {pw:.3f} (target <= 0.95; reference release 1.04)")
    print(f"per epoch: I-F-FP / I-I-PS {epoch_time['ae_iffp'] / epoch_time['ae_iips']:.3f}, "
          f"I-F-FP / I-I-PW {epoch_time['ae_iffp'] / epoch_time['ae_iipw']:.3f}")
    return 0


def slurm_bench_images(root: Path, num_images: int = 36, seed: int = 0) -> Path:
    """A small ImageNet-layout folder of random PNGs, for a job that only has to train."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = root / f"n{i % 3:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return root


class Poll:
    """Wait for the events of one job in order, polling every 0.1 s; remember when each came."""

    def __init__(self, job_id: str, timeout_s: float) -> None:
        self.job_id, self.timeout_s = job_id, timeout_s
        self.times: list[tuple[str, float]] = []

    def state(self) -> str:
        out = subprocess.run(["squeue", "-h", "-j", self.job_id, "-o", "%T"], capture_output=True, text=True)
        return out.stdout.strip()

    def until(self, name: str, condition: Callable[[], object]) -> float:
        deadline = time.monotonic() + self.timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {self.job_id}: no '{name}' after {self.timeout_s} s")
            time.sleep(0.1)
        self.times.append((name, time.monotonic()))
        return self.times[-1][1]

    def report(self, start: float) -> str:
        parts, last = [], start
        for name, when in self.times:
            parts.append(f"{name} {when - last:.1f}")
            last = when
        return f"{last - start:.1f} s ({', then '.join(parts)})"


def bench_slurm(args: argparse.Namespace) -> int:
    """Latencies of a real SLURM cluster: submit -> first training step, USR2 -> resumed step."""
    import shutil
    import tempfile

    from launcher import slurm
    from launcher.config import experiment_from_dict
    from launcher.runs import read_metrics, write_config

    profile = slurm.load_profile(args.cluster)
    res = slurm.resolve_resources(args.cluster, profile, nodes=args.nodes, time_min=10)
    slurm.check_cluster(res)
    slurm.check_shared(args.dir, "--dir")
    root = Path(tempfile.mkdtemp(prefix="launch-bench-slurm-", dir=args.dir))
    cfg = experiment_from_dict({
        "method": asdict(get_method("pcae").config.tiny()),
        "data": {"name": "imagefolder", "root": str(slurm_bench_images(root / "images")), "num_workers": 0},
        "optim": {"warmup_epochs": 1},
        # Far more steps than the benchmark needs: the job is cancelled once it has resumed.
        "train": {"num_epochs": 500, "global_batch_size": 4 * res.nodes * res.tasks_per_node,
                  "micro_batch_size": 4, "log_every": 1},
    })
    print(f"cluster {args.cluster}: {res.nodes} node(s) x {res.tasks_per_node} task(s), partition "
          f"{res.partition}; tiny PCAE on {root}; this machine: {platform.node()}, {os.cpu_count()} cores")
    job_ids: list[str] = []
    totals: dict[str, list[float]] = {"first": [], "resumed": []}
    try:
        for k in range(1, args.repeats + 1):
            run = root / f"run{k}"
            write_config(run, cfg)

            def attempts() -> list[dict]:
                return slurm.read_launch(run).get("attempts", [])

            def last_step() -> int:
                metrics = read_metrics(run)
                return metrics[-1]["step"] if metrics else 0

            start = time.monotonic()
            job_id = slurm.submit(cfg, run, profile, res, max_requeues=10)
            job_ids.append(job_id)
            started = Poll(job_id, timeout_s=300)
            started.until("allocated", lambda: started.state() == "RUNNING" or attempts())
            started.until("Python and torch start", lambda: attempts())
            first = started.until("Trainer setup and first step", lambda: last_step() > 0)
            totals["first"].append(first - start)
            print(f"[{k}] submit -> first training step: {started.report(start)}", flush=True)

            Poll(job_id, timeout_s=300).until("step 3", lambda: last_step() >= 3)
            resumed, left = Poll(job_id, timeout_s=300), []

            def allocated_again() -> bool:
                state = resumed.state()
                if state != "RUNNING":
                    left.append(state)
                return (bool(left) and state == "RUNNING") or len(attempts()) > 1

            signalled = time.monotonic()
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
            resumed.until("checkpoint", lambda: attempts()[0]["outcome"] == "requeued")
            stop = attempts()[0].get("step", 0)
            resumed.until("requeue and wait until allocated", allocated_again)
            resumed.until("Python and torch start", lambda: len(attempts()) > 1)
            back = resumed.until("first step after the resume", lambda: last_step() > stop)
            totals["resumed"].append(back - signalled)
            print(f"[{k}] USR2 -> first step after the resume (from step {stop}): "
                  f"{resumed.report(signalled)}", flush=True)
            subprocess.run(["scancel", job_id], check=True)
        if args.repeats > 1:
            medians = {key: statistics.median(values) for key, values in totals.items()}
            print(f"median of {args.repeats}: submit -> first step {medians['first']:.1f} s, "
                  f"USR2 -> first step after the resume {medians['resumed']:.1f} s")
    finally:
        if job_ids:
            subprocess.run(["scancel", *job_ids], capture_output=True)
            deadline = time.monotonic() + 60  # the jobs write into root until they are gone
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True,
                    text=True).stdout.strip():
                time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)
    return 0


BENCHMARKS = {"pretrain": bench_pretrain, "finetune": bench_finetune, "ae-losses": bench_ae_losses,
              "slurm": bench_slurm}


def run(args: argparse.Namespace) -> int:
    return BENCHMARKS[args.benchmark](args)
