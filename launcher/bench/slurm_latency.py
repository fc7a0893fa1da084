"""``launch bench slurm``: latencies of a real SLURM cluster, from submission to training.

On a SLURM cluster (the local test cluster by default): the time from submitting a tiny PCAE
job to its first training step, and from a USR2 signal (what preemption and the time limit
send) to its first step after checkpoint, requeue and resume. Its images and run directories
live in a temporary folder that it removes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from launcher.methods import get_method
from launcher.slurm import control


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
        return control.queue_state(self.job_id)

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

    from launcher.experiment import experiment_from_dict
    from launcher.runs import read_metrics
    from launcher.slurm.profiles import check_shared, load_profile, resolve_resources
    from launcher.slurm.records import read_launch
    from launcher.slurm.submit import Request, check_cluster, submit
    from launcher.work import TrainingWork

    request = Request(args.cluster, nodes=args.nodes, time="10", max_requeues=10)
    profile = load_profile(args.cluster)
    res = resolve_resources(args.cluster, profile, nodes=args.nodes, time_min=10)
    check_cluster(res)
    check_shared(args.dir, "--dir")
    root = Path(tempfile.mkdtemp(prefix="launch-bench-slurm-", dir=args.dir))
    cfg = experiment_from_dict(
        {
            "method": dataclasses.asdict(get_method("pcae").tiny()),
            "data": {"name": "imagefolder", "root": str(slurm_bench_images(root / "images")), "num_workers": 0},
            "optim": {"warmup_epochs": 1},
            # Far more steps than the benchmark needs: the job is cancelled once it has resumed.
            "train": {
                "num_epochs": 500,
                "global_batch_size": 4 * res.nodes * res.tasks_per_node,
                "micro_batch_size": 4,
                "log_every": 1,
            },
        }
    )
    print(
        f"cluster {args.cluster}: {res.nodes} node(s) x {res.tasks_per_node} task(s), partition "
        f"{res.partition}; tiny PCAE on {root}; this machine: {platform.node()}, {os.cpu_count()} cores"
    )
    job_ids: list[str] = []
    totals: dict[str, list[float]] = {"first": [], "resumed": []}
    try:
        for k in range(1, args.repeats + 1):
            run = root / f"run{k}"

            def attempts() -> list[dict]:
                return read_launch(run).get("attempts", [])

            def last_step() -> int:
                metrics = read_metrics(run)
                return metrics[-1]["step"] if metrics else 0

            start = time.monotonic()
            job_id = submit(TrainingWork(cfg, Path("bench"), run, run), request).job_id
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
            control.send_signal(job_id, "USR2")
            resumed.until("checkpoint", lambda: attempts()[0]["outcome"] == "requeued")
            stop = attempts()[0].get("step", 0)
            resumed.until("requeue and wait until allocated", allocated_again)
            resumed.until("Python and torch start", lambda: len(attempts()) > 1)
            back = resumed.until("first step after the resume", lambda: last_step() > stop)
            totals["resumed"].append(back - signalled)
            print(
                f"[{k}] USR2 -> first step after the resume (from step {stop}): {resumed.report(signalled)}", flush=True
            )
            control.cancel_jobs([job_id])
        if args.repeats > 1:
            medians = {key: statistics.median(values) for key, values in totals.items()}
            print(
                f"median of {args.repeats}: submit -> first step {medians['first']:.1f} s, "
                f"USR2 -> first step after the resume {medians['resumed']:.1f} s"
            )
    finally:
        control.cancel_jobs(job_ids, wait_s=60)  # the jobs write into root until they are gone
        shutil.rmtree(root, ignore_errors=True)
    return 0
