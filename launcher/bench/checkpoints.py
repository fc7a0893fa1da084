"""``launch bench checkpoint``: what a checkpoint save costs, as a ratio to a training step.

The trainer trains a ViT (ViT-B/16 PCAE by default) for a few steps on generated JPEGs, then times
a save of its checkpoint. Before a checkpoint was hashed once when sealed, every rank also hashed
the whole previous checkpoint before each save, to learn its size; the "before" figure adds that
read (timed with ``checkpoint.validate``, which is what ran) to the save as it is now. A resume
used to verify the newest checkpoint twice on every rank; it is now verified once, on rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from launcher import checkpoint


def bench_checkpoint(args: argparse.Namespace) -> int:
    from launcher.bench.compute import describe_device
    from launcher.bench.data import make_jpeg_folder
    from launcher.experiment import load_experiment
    from launcher.runs import read_metrics
    from launcher.trainer import Trainer

    describe_device()
    with tempfile.TemporaryDirectory(prefix="launch-bench-ckpt-", dir=args.dir) as tmp:
        images = make_jpeg_folder(Path(tmp) / "images", max(2, args.batch_size))
        overrides = [
            f"method.size={args.size}",
            f"data.root={images}",
            "data.num_workers=0",
            f"train.global_batch_size={args.batch_size}",
            f"train.micro_batch_size={args.batch_size}",
            "train.num_steps=1000000",
            "train.log_every=1",
            "train.checkpoint_every=1000000",
            "train.trackers=[]",
        ]
        cfg = load_experiment(None, overrides, method=args.method)
        run = Path(tmp) / "run"
        trainer = Trainer(cfg, run)
        trainer.fit(until_step=args.warmup)  # ends with a checkpoint: the "previous" one of every save below
        trainer.fit(until_step=args.warmup + args.steps)
        step_s = statistics.median(m["step_time"] for m in read_metrics(run) if m["step"] > args.warmup)
        rehash, save = [], []
        for _ in range(args.repeats):
            previous = checkpoint.checkpoint_path(run, trainer.saved_step)
            start = time.perf_counter()
            assert checkpoint.validate(previous) is None  # what every rank ran before each save
            rehash.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.save_checkpoint()
            save.append(time.perf_counter() - start)
        size = checkpoint.recorded_size(checkpoint.checkpoint_path(run, trainer.saved_step)) or 0
    after, hashed = statistics.median(save), statistics.median(rehash)
    before = after + hashed
    print(
        f"checkpoint save, ViT-{args.size} {args.method}, batch {args.batch_size} ({size / 2**20:.0f} MiB): "
        f"training step {step_s:.3f} s; save before {before:.3f} s = {before / step_s:.2f} steps, after "
        f"{after:.3f} s = {after / step_s:.2f} steps ({before / after:.2f}x); resume verification "
        f"{hashed:.3f} s: before twice on every rank, after once on rank 0"
    )
    return 0
