"""``launch bench ...``: benchmarks that print ratios measured side by side in one run.

``compute``: ``pretrain`` (PCAE vs MAE training steps), ``finetune`` (inference with token
reduction), ``ae-losses`` (the six autoencoder procedures); ``data``: the pretraining input
pipeline per loader worker; ``slurm_latency``: ``slurm``
(submission and requeue latencies of a real cluster); ``checkpoints``: ``checkpoint`` (a save as a
ratio to a training step).
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from launcher.bench import checkpoints, compute, data, slurm_latency

    check_arguments(args)

    benchmarks = {
        "pretrain": compute.bench_pretrain,
        "finetune": compute.bench_finetune,
        "ae-losses": compute.bench_ae_losses,
        "data": data.bench_data,
        "slurm": slurm_latency.bench_slurm,
        "checkpoint": checkpoints.bench_checkpoint,
    }
    return benchmarks[args.benchmark](args)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a flag no benchmark can run with, before anything is built or timed."""
    from launcher.bench.compute import DEFAULT_BATCH
    from launcher.errors import ConfigError

    least = {"steps": 1, "images": 1, "rounds": 1, "frames": 1, "repeats": 1, "nodes": 1, "img_size": 1}
    for flag, minimum in {**least, "warmup": 0, "batch_size": 1}.items():
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    sizes = args.sizes.split(",") if hasattr(args, "sizes") else [args.size] if hasattr(args, "size") else []
    unknown = [size for size in sizes if size not in DEFAULT_BATCH]
    if unknown:
        raise ConfigError(
            f"unknown ViT size(s) {', '.join(map(repr, unknown))}; sizes are {', '.join(DEFAULT_BATCH)} "
            f"(--sizes takes several, comma-separated)"
        )
    if getattr(args, "modes", None) is not None and not set(args.modes.split(",")) <= {"eager", "compiled"}:
        raise ConfigError(f"--modes takes eager and/or compiled, comma-separated; got {args.modes!r}")
    if getattr(args, "drop_ratios", None) is not None:
        try:
            ratios = [float(r) for r in args.drop_ratios.split(",")]
        except ValueError:
            ratios = []
        if not ratios or ratios[0] != 0 or not all(0 <= r < 1 for r in ratios):
            raise ConfigError(
                f"--drop-ratios {args.drop_ratios!r} must be comma-separated fractions of the tokens dropped, "
                f"each in [0, 1), 0 first (the unreduced baseline), e.g. 0,0.1,0.2"
            )
