"""The bodies of SLURM jobs: what submitit runs in every task.

One ``launch pretrain|finetune|linprobe`` on a cluster is one job of N nodes x one task per GPU
(one task per node on CPU partitions) running ``TrainingJob(run_dir)``: every task exports the
torch.distributed variables from SLURM's, reads ``RUN/config.yaml`` (the run's one source of
truth) and trains. A USR2 signal (preemption, or the time limit coming) makes every rank stop
at the same step boundary and checkpoint; rank 0 then requeues the job, which resumes in the
same run directory from the newest valid checkpoint. A SIGTERM that comes without a USR2 first
(``scancel``, a preemption after the grace time or without one, an admin's requeue) also
checkpoints if SLURM's KillWait allows, but does not requeue: SLURM decides whether that job
comes back. ``RaySweepJob`` runs a Ray cluster of one node per task and a sweep on it.

The bodies are pickled by submitit and unpickled in each task before anything else runs, so
this module imports neither torch nor ray: they are imported once the job runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.slurm.records import record_attempt
from launcher.stopping import StopRequest, install_stop_handlers, release_held_signals

log = logging.getLogger(__name__)

SIGNAL_WARNINGS = {
    "SIGUSR2": "received SIGUSR2 (preemption or the time limit coming): checkpointing at the next step "
    "boundary, then requeueing",
    "SIGTERM": "received SIGTERM without SIGUSR2 first (scancel, or SLURM ending the job itself): "
    "checkpointing at the next step boundary if KillWait allows; SLURM decides whether the job "
    "comes back",
}


def restart_count() -> int:
    """How many times SLURM has requeued this job (our requeues and its own): the attempt."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def master_port(job_id: str, attempt: int) -> int:
    """A rendezvous port unique per job and attempt: nodes may share one network stack, and a
    requeued job must not meet a half-closed store of its previous attempt."""
    number = int("".join(c for c in job_id if c.isdigit()) or 0)
    return 20000 + (number * 131 + attempt * 7) % 40000


@dataclass
class Progress:
    finished: bool
    step: int | None  # the training step reached, where there is one


class TrainingJob:
    """The body of every task of a training run: export the distributed environment, train, requeue on USR2.

    Everything about the run comes from its directory (``config.yaml``), so a first submission
    and ``launch resume`` submit the same thing. ``checkpoint()`` is submitit's requeue hook for
    a USR2 that comes before training has started (the trainer then has nothing new to save,
    and the requeued job resumes from the newest checkpoint of the run directory).
    """

    def __init__(self, run_dir: str, use_gpu: bool, max_requeues: int) -> None:
        self.run_dir, self.use_gpu, self.max_requeues = run_dir, use_gpu, max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        attempt = restart_count()
        # Every rank gets the signal; the trainer all-reduces the flag, so all ranks checkpoint
        # at the same step boundary and fit() returns on all of them. The first signal decides:
        # the SIGTERM that follows a USR2 is SLURM ending this attempt after our own requeue, or
        # after a preemption's grace time.
        stop = StopRequest()
        install_stop_handlers(stop, (signal.SIGUSR2, signal.SIGTERM), SIGNAL_WARNINGS)
        release_held_signals()  # a signal of the start-up arrives now, and only stops the run
        os.environ["MASTER_PORT"] = str(master_port(env.job_id, attempt))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.use_gpu, overwrite=True)
        if not self.use_gpu:
            os.environ["ACCELERATE_USE_CPU"] = "1"  # else every CPU rank believes it is rank 0
        run_dir, rank = Path(self.run_dir), env.global_rank
        if rank == 0:
            record_attempt(run_dir, env.job_id, attempt, outcome="running")
        self.trainer = None  # the work's trainer, once it has one: how far it got if it fails
        failed_at: float | None = None
        try:
            import torch.distributed as dist

            try:
                result = self.work(run_dir, stop)
            except BaseException:
                # When the error happened, not when it is recorded: tearing down the process group
                # below takes a while, and a peer that loses its connection meanwhile must not be
                # recorded as the first to fail.
                failed_at = time.time()
                raise
            finally:
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()  # no rank may outlive the job (zombie jobs)
        except BaseException as e:
            if not isinstance(e, SystemExit):
                step = self.trainer.state.step if self.trainer is not None else None
                record_attempt(
                    run_dir,
                    env.job_id,
                    attempt,
                    outcome="failed",
                    error=f"rank {rank}: {type(e).__name__}: {e}",
                    step=step,
                    rank=rank,
                    failed_at=failed_at,
                )
            raise

        if result.finished:
            if rank == 0:
                record_attempt(run_dir, env.job_id, attempt, outcome="finished", step=result.step)
            return {"step": result.step, "finished": True}
        if rank != 0:
            sys.exit(0)  # rank 0 decides; a non-zero exit here would kill it (--kill-on-bad-exit)
        # Requeue only after our own USR2: `scontrol requeue` also brings back a job that is
        # being cancelled.
        first = stop.signal or "a signal to another rank"
        where = "a step boundary" if result.step is None else f"step {result.step}"
        if first != "SIGUSR2":
            record_attempt(run_dir, env.job_id, attempt, outcome="terminated", step=result.step)
            log.info("stopped at %s after %s; not requeueing", where, first)
            sys.exit(-1)  # no result file: if SLURM requeues the job, it comes back
        if attempt >= self.max_requeues:
            reason = (
                f"stopped at {where} by a signal after {attempt} requeues; the limit is "
                f"{self.max_requeues} (--max-requeues). Run `launch resume {run_dir}` to go on."
            )
            record_attempt(run_dir, env.job_id, attempt, outcome="stopped", step=result.step, error=reason)
            raise RuntimeError(reason)
        record_attempt(run_dir, env.job_id, attempt, outcome="requeued", step=result.step)
        try:
            subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60, capture_output=True)
            log.info("requeued job %s after %s", env.job_id, where)
        except (subprocess.SubprocessError, OSError) as e:
            # A preempting partition with PreemptMode=REQUEUE may have requeued the job already.
            log.warning("scontrol requeue %s failed (%s); SLURM may requeue it itself", env.job_id, e)
        sys.exit(-1)  # like submitit after a requeue: no result file, the job comes back

    def work(self, run_dir: Path, stop: StopRequest) -> Progress:
        """Train the run of ``run_dir`` from its newest checkpoint until it ends or ``stop`` is requested."""
        from launcher.experiment import experiment_from_dict
        from launcher.runs import read_run_config
        from launcher.trainer import Trainer

        self.trainer = Trainer(experiment_from_dict(read_run_config(run_dir)), run_dir, stop)
        self.trainer.resume()
        result = self.trainer.fit()
        self.trainer.accelerator.wait_for_everyone()
        return Progress(result.finished, result.step)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's USR2 handler calls this on rank 0 before ours is installed; it then requeues."""
        import submitit

        job_id, attempt = submitit.JobEnvironment().job_id, restart_count()
        if attempt >= self.max_requeues:
            reason = (
                f"signalled before training started after {attempt} requeues; the limit is "
                f"{self.max_requeues} (--max-requeues). Run `launch resume {self.run_dir}` to go on."
            )
            record_attempt(Path(self.run_dir), job_id, attempt, outcome="stopped", error=reason)
            return None  # submitit then ends the job instead of requeueing it
        record_attempt(Path(self.run_dir), job_id, attempt, outcome="requeued")
        return submitit.helpers.DelayedSubmission(type(self)(self.run_dir, self.use_gpu, self.max_requeues))


class StudyJob(TrainingJob):
    """The body of every task of a study (``launch study ... --cluster``): each of its runs on all ranks.

    The study directory holds ``study.yaml``; rank 0 times the methods and probes the encoders
    while the other ranks wait. Signals, requeues and records are those of a training run.
    """

    def work(self, study_dir: Path, stop: StopRequest) -> Progress:
        from launcher.studies.compare import STUDY_FILE, Study, load_study

        return Progress(Study(load_study(study_dir / STUDY_FILE), study_dir).run(stop), None)


def _publish(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers on other nodes never see half a file


class RaySweepJob:
    """The body of every task of a sweep job: one Ray node per SLURM node, the sweep on the first.

    Task 0 starts the Ray head and publishes its address in a file of the job's submission
    folder (on the shared filesystem); the other tasks wait for it and start Ray workers that
    join. Task 0 then runs the study's sweep (``launcher.studies``), and when it ends (or fails)
    writes ``done``: the workers stop their Ray node and say so, then task 0 stops the head.
    Each task stops only the Ray processes it started. On USR2 (preemption, or the time limit
    coming) submitit calls ``checkpoint()`` and requeues the job; its next attempt restores the
    sweep, finished trials kept (Ray Tune's own checkpoints).
    """

    def __init__(self, study: str, sweep_dir: str, storage: str, gpus_per_node: int) -> None:
        self.study, self.sweep_dir, self.storage, self.gpus_per_node = study, sweep_dir, storage, gpus_per_node

    def __call__(self) -> dict[str, Any]:
        release_held_signals()  # to submitit's handlers, installed by now; before Ray inherits the mask
        import submitit

        from launcher.tune import ray_cluster

        env = submitit.JobEnvironment()
        # Every task's own log file (RUN/slurm/subK/JOB_TASK_log.out) says what its Ray node did.
        logging.basicConfig(
            level=logging.INFO,
            datefmt="%H:%M:%S",
            format=f"%(asctime)s [rank {env.global_rank}] %(levelname)s %(name)s: %(message)s",
        )
        attempt = restart_count()
        # A fresh rendezvous per attempt: a requeued job must not find its previous head.
        rendezvous = Path(env.paths.folder) / f"ray_{env.job_id}_{attempt}"
        rendezvous.mkdir(parents=True, exist_ok=True)
        temp_dir = ray_cluster.ray_temp_dir(f"{env.job_id}-{attempt}-{env.node}")
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or None
        if env.global_rank == 0:
            return self._head(env, attempt, rendezvous, temp_dir, cpus)
        return self._worker(env, rendezvous, temp_dir, cpus)

    @staticmethod
    def _share_token(rendezvous: Path) -> None:
        """Task 0: a secret of this job's Ray cluster, readable by its owner only."""
        import secrets

        from launcher.tune import ray_cluster

        token = secrets.token_hex(32)
        path = rendezvous / "token"
        path.touch(mode=0o600)
        path.write_text(token)
        ray_cluster.use_cluster_token(token)

    def _head(self, env: Any, attempt: int, rendezvous: Path, temp_dir: Path, cpus: int | None) -> dict[str, Any]:
        from launcher.studies import get_study
        from launcher.tune import ray_cluster

        sweep_dir = Path(self.sweep_dir)
        record_attempt(sweep_dir, env.job_id, attempt, outcome="running")
        try:
            self._share_token(rendezvous)  # before the head starts: it inherits the environment
            with ray_cluster.ray_node(temp_dir, num_cpus=cpus, num_gpus=self.gpus_per_node) as node:
                try:
                    _publish(rendezvous / "head", node.address)
                    get_study(self.study).run_sweep_file(
                        sweep_dir, Path(self.storage), node.address, num_nodes=env.num_nodes
                    )
                finally:
                    (rendezvous / "done").touch()
                    # The workers leave first, while the head still answers them.
                    stopped = [rendezvous / f"stopped_{k}" for k in range(1, env.num_nodes)]
                    deadline = time.monotonic() + 60
                    while not all(p.exists() for p in stopped) and time.monotonic() < deadline:
                        time.sleep(0.5)
        except BaseException as e:
            if not isinstance(e, SystemExit):
                record_attempt(
                    sweep_dir, env.job_id, attempt, outcome="failed", error=f"rank 0: {type(e).__name__}: {e}"
                )
            raise
        record_attempt(sweep_dir, env.job_id, attempt, outcome="finished")
        return {"sweep": str(sweep_dir), "nodes": env.num_nodes}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same sweep again; its next attempt restores it."""
        import submitit

        record_attempt(Path(self.sweep_dir), submitit.JobEnvironment().job_id, restart_count(), outcome="requeued")
        return submitit.helpers.DelayedSubmission(
            type(self)(self.study, self.sweep_dir, self.storage, self.gpus_per_node)
        )

    def _worker(self, env: Any, rendezvous: Path, temp_dir: Path, cpus: int | None) -> dict[str, Any]:
        from launcher.tune import ray_cluster

        head, done = rendezvous / "head", rendezvous / "done"
        deadline = time.monotonic() + 600
        while not head.exists():
            if done.exists():  # the head failed before it could publish its address
                return {"node": env.node}
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Ray head address in {head} after 600 s; see the log of task 0")
            time.sleep(0.5)
        ray_cluster.use_cluster_token((rendezvous / "token").read_text())  # written before the address
        with ray_cluster.ray_node(
            temp_dir, head_address=head.read_text(), num_cpus=cpus, num_gpus=self.gpus_per_node
        ) as node:
            while not done.exists():
                if not node.alive():
                    raise RuntimeError(
                        f"this task's Ray node exited (code {node.process.returncode}) "
                        f"before the sweep ended; see this task's log"
                    )
                time.sleep(0.5)
        (rendezvous / f"stopped_{env.node}").touch()
        return {"node": env.node}
