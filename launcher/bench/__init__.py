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

    benchmarks = {
        "pretrain": compute.bench_pretrain,
        "finetune": compute.bench_finetune,
        "ae-losses": compute.bench_ae_losses,
        "data": data.bench_data,
        "slurm": slurm_latency.bench_slurm,
        "checkpoint": checkpoints.bench_checkpoint,
    }
    return benchmarks[args.benchmark](args)
