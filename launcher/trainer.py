"""One Accelerate training loop for every method.

The trainer knows methods only through their contract (``methods/protocol.py``: ``forward(batch)
-> {"loss", ...}`` and optional hooks) and knows nothing of SLURM or Ray:
whoever launches it sets the torch.distributed environment and passes a ``StopRequest``
that its signal handlers set (``launcher/stopping.py``). Every schedule is a function of the global
step, and the data pipeline is a function of (seed, epoch, index), so the state to
resume is Accelerate's (model, optimizer, scaler, RNG) plus three integers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from torch.utils.data import DataLoader

from launcher import checkpoint
from launcher.cpu_allocator import keep_freed_memory
from launcher.data import count_samples, open_dataset
from launcher.data.sampling import ResumableSampler, SeededDataset, build_loader
from launcher.data.transforms import build_device_stage, build_transform
from launcher.embeddings import FeatureCache
from launcher.errors import ConfigError, DataError, RunDirError, UserError
from launcher.evaluate import build_eval_loader, evaluate
from launcher.methods import build_method
from launcher.methods.protocol import ChecksClasses, Initializes, Predicts, StepHook
from launcher.optim import Schedule, build_optimizer, learning_rate, schedule
from launcher.runs import (
    MetricsLog,
    last_evaluated_step,
    lock_run_dir,
    setup_logging,
    write_config,
    write_eval,
    writing,
)
from launcher.stopping import StopRequest
from launcher.tracking import Trackers, check_trackers, open_trackers

if TYPE_CHECKING:
    from launcher.experiment import ExperimentConfig

log = logging.getLogger(__name__)


class DivergedError(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """The loop's own position; everything else is derived from the step."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    step_in_epoch: int = 0
    train_seconds: float = 0.0  # wall time of the steps that led here, over every attempt
    loss: float | None = None  # of the last step
    bad_samples: int = 0  # unreadable files replaced so far

    def state_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclass
class FitResult:
    """Where a ``fit()`` left the run, and what it cost."""

    step: int
    total_steps: int
    steps_per_epoch: int
    global_batch_size: int
    train_seconds: float  # wall time of every step so far (data loading included), over all attempts
    loss: float | None  # of the last step

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def samples(self) -> int:
        return self.step * self.global_batch_size

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds * self.steps_per_epoch / self.step if self.step else 0.0


def planned_schedule(cfg: ExperimentConfig, processes: int) -> Schedule:
    """The schedule a run of ``cfg`` on ``processes`` processes will follow, for a dry run. The samples
    are counted only where that is quick (a generated set); an image folder is counted by the run."""
    return schedule(cfg.train, cfg.optim, processes, count_samples(cfg.data))


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"  # bf16 autocast on CPU is slower than fp32 on most CPUs


class Trainer:
    """Trains ``cfg`` in ``run_dir``; ``stop`` is shared with the signal handlers of whoever runs it."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, stop: StopRequest | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.stop = stop or StopRequest()
        train = cfg.train
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=resolve_mixed_precision(train.mixed_precision),
        )
        acc = self.accelerator
        if acc.device.type == "cpu":
            keep_freed_memory()
        expected = int(os.environ.get("WORLD_SIZE", "1"))
        if acc.num_processes != expected:
            raise RuntimeError(f"WORLD_SIZE is {expected} but Accelerate sees {acc.num_processes} processes")

        self.accumulation_steps = train.check_world(acc.num_processes)

        torch.manual_seed(train.seed)  # model initialisation
        try:
            model = build_method(cfg.method)
            # Initial weights (a fine-tuning's pretrained encoder) only for a run that starts now:
            # one that resumes finds them all in its checkpoint.
            self.resume_from = self.newest_valid_checkpoint()
            if isinstance(model, Initializes) and self.resume_from is None:
                model.initialize()
        except ValueError as e:  # e.g. a loss network or pretrained weights that are not on this machine
            raise ConfigError(f"cannot build method {cfg.method.name!r}: {e}") from None
        with acc.main_process_first():  # rank 0 first: SVHN converts its .mat files on first use
            base = open_dataset(cfg.data, cfg.method.img_size)
            classes = getattr(base, "classes", None)  # an image folder's class names: they define the labels
            if classes is not None and isinstance(model, ChecksClasses):
                try:
                    model.check_classes(classes)
                except ValueError as e:
                    raise ConfigError(f"data.root {cfg.data.root}: {e}") from None
            self.eval_loader = None
            if cfg.eval.data is not None:
                if not isinstance(model, Predicts):
                    raise ConfigError(
                        f"method {cfg.method.name!r} has no predictions to evaluate; remove the eval section"
                    )
                try:
                    self.eval_loader = build_eval_loader(
                        cfg.eval, cfg.method.img_size, acc.process_index, acc.num_processes, classes
                    )
                except DataError as e:
                    raise DataError(f"evaluation set (eval.data, the keys that differ from data): {e}") from None
        if len(base) < train.global_batch_size:
            raise ConfigError(
                f"the data set has {len(base)} samples, fewer than one global batch "
                f"({train.global_batch_size}); lower train.global_batch_size"
            )
        # Only now, with the config and data known to be good, is the run directory written
        # (a SLURM submission has written its config.yaml already: the job reads it). It has one
        # owner: this process, until it exits (rank 0 holds the lock for all ranks).
        if acc.is_main_process:
            check_trackers(train, self.run_dir)  # a tracker that cannot start stops the run before it is written
            lock_run_dir(self.run_dir)
        if acc.is_main_process:  # a new run's config, or a resume's change of CHANGEABLE_ON_RESUME
            write_config(self.run_dir, cfg)
        acc.wait_for_everyone()
        setup_logging(self.run_dir, acc.process_index)
        dataset = SeededDataset(base, build_transform(cfg.data, cfg.method.img_size), train.seed)
        self.sampler = ResumableSampler(
            len(dataset),
            train.micro_batch_size,
            self.accumulation_steps,
            acc.process_index,
            acc.num_processes,
            train.seed,
        )
        self.dataset = dataset
        self.device_stage = build_device_stage(cfg.data, cfg.method.img_size)  # data.decode=device
        self.loader = None  # built when training starts: a feature cache needs the resumed weights
        plan = schedule(train, cfg.optim, acc.num_processes, len(dataset))  # what a dry run printed
        assert plan.steps_per_epoch == self.sampler.steps_per_epoch
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps, self.warmup_steps, self.base_lr = plan.total_steps, plan.warmup_steps, plan.base_lr

        model.to(acc.device)  # before the optimizer: fused AdamW wants its parameters on the GPU
        optimizer = build_optimizer(model, cfg.optim, fused=acc.device.type == "cuda")
        if train.compile:
            model.compile()  # in place: forward and backward compiled, state_dict keys unchanged
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.state = TrainState()
        self.saved_step: int | None = None  # step of the newest checkpoint on disk
        self.stop_agreed = False  # the all-reduced stop flag: every rank stops at the same step
        self.trackers: Trackers | None = None  # rank 0's, while fit() runs

        log.info(
            "method %s: %.1fM trainable parameters; %s",
            cfg.method.name,
            sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            plan.describe(),
        )

    # ------------------------------------------------------------------ checkpoints

    def newest_valid_checkpoint(self) -> Path | None:
        """The run's newest valid checkpoint. Validating reads every byte of it, so rank 0 alone does,
        and tells the other ranks which one it found (a collective: every rank calls this)."""
        acc = self.accelerator
        found = checkpoint.latest_valid(self.run_dir) if acc.is_main_process else None
        if acc.num_processes > 1:
            found = broadcast_object_list([found], from_process=0)[0]
        return found

    def resume(self) -> bool:
        """Load the newest valid checkpoint of the run directory, if any."""
        # Verified when the trainer was built, unless it has written checkpoints since.
        path = self.resume_from if self.saved_step is None else self.newest_valid_checkpoint()
        if path is None:
            return False
        self.accelerator.load_state(str(path))
        self._check_random_states(path)
        self.state = TrainState(**checkpoint.read_trainer_state(path))  # train_seconds: 0 if older
        self.saved_step = self.state.step
        log.info("resumed from %s (step %d, epoch %d)", path, self.state.step, self.state.epoch)
        return True

    def _check_random_states(self, path: Path) -> None:
        """Stop unless this rank's RNG states were restored from ``path``: resume is exact or does not happen.

        Accelerate logs a random-states file it cannot load at INFO and carries on, which would make
        the resumed losses differ from an uninterrupted run's with nothing said.
        """
        from accelerate.utils import load
        from accelerate.utils.constants import RNG_STATE_NAME

        rng_file = path / f"{RNG_STATE_NAME}_{self.accelerator.process_index}.pkl"
        try:
            states = load(rng_file)
            restored = torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
        except Exception as e:  # whatever unpickling a damaged file raises
            restored, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "the restored state differs from the file's"
        # Every rank stops, or none does: one rank alone would leave the others waiting for ever.
        failed = self.accelerator.reduce(torch.tensor([0.0 if restored else 1.0], device=self.accelerator.device))
        if not failed.item():
            return
        if restored:
            rng_file, why = path / f"{RNG_STATE_NAME}_*.pkl", "another rank's file could not be restored"
        if self.cfg.train.allow_inexact_resume:
            step = checkpoint.read_trainer_state(path)["step"]
            log.warning(
                "INEXACT RESUME from %s, as train.allow_inexact_resume asks: the random states of %s were not "
                "restored (%s), so the losses from step %d on will not repeat an uninterrupted run's",
                path,
                rng_file,
                why,
                step,
            )
            return
        older = [p for p in checkpoint.list_checkpoints(self.run_dir) if p != path and checkpoint.validate(p) is None]
        fallback = (
            f"move {path} aside to resume exactly from {older[0]}"
            if older
            else f"there is no older checkpoint: move {path} aside to start the run over"
        )
        raise RunDirError(
            f"cannot restore the random states of {rng_file} ({why}); a resume without them would not repeat "
            f"the uninterrupted run's losses. The file is damaged: {fallback}; or, to resume from it all the same "
            f"(the losses will differ from an uninterrupted run's), run the same command with "
            f"train.allow_inexact_resume=true."
        )

    def diverged(self, what: str) -> DivergedError:
        """The error that stops a run whose loss or weights are no longer finite, with advice that works."""
        last_good = checkpoint.latest_valid(self.run_dir)
        return DivergedError(
            f"{what}; nothing since was saved. The last good checkpoint is {last_good or 'none'}. Lower "
            f"optim.blr, set optim.clip_grad or train.mixed_precision=no, then run the same command with that "
            f"change to resume from it (the run's config_history.yaml records the change and the step it took "
            f"effect at)."
        )

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of this step atomically; on a full disk remove what was written and say so."""
        acc, step = self.accelerator, self.state.step
        tmp = checkpoint.temporary_path(self.run_dir, step)
        final = checkpoint.checkpoint_path(self.run_dir, step)
        if acc.is_main_process:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        with writing(final, cleanup=tmp, needed_bytes=self.checkpoint_bytes()):
            acc.save_state(str(tmp))
            # Each rank hashes what it wrote, once; gathering the entries waits for every rank's files.
            files = checkpoint.describe(tmp, checkpoint.written_by(tmp, acc.process_index))
            if acc.num_processes > 1:
                files = {name: entry for part in gather_object([files]) for name, entry in part.items()}
            if acc.is_main_process:
                checkpoint.seal(tmp, final, self.state.state_dict(), files)
        if acc.is_main_process:
            checkpoint.prune(self.run_dir, self.cfg.train.num_checkpoints_kept)
            log.info("checkpoint %s", final)
        acc.wait_for_everyone()
        self.saved_step = step
        return final

    def checkpoint_bytes(self) -> int:
        """About what a checkpoint takes: the newest one's size, or the weights and optimizer state."""
        if self.saved_step is not None:  # what the previous one's manifest records: nothing is hashed
            size = checkpoint.recorded_size(checkpoint.checkpoint_path(self.run_dir, self.saved_step))
            if size is not None:
                return size
        tensors = [p for p in self.model.parameters()] + [
            t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def evaluate(self) -> dict[str, float]:
        """Evaluate on ``eval.data`` (each process takes its share); rank 0 writes ``eval.json``."""
        acc = self.accelerator
        if self.eval_loader is None:
            raise ConfigError(
                "there is no evaluation set: set eval.data to the keys that differ from data "
                "(e.g. eval.data.split=test, or eval.data.root=/data/imagenet/val)"
            )
        start = time.perf_counter()
        metrics = evaluate(
            acc.unwrap_model(self.model), self.eval_loader, acc.device, lambda sums: acc.reduce(sums, reduction="sum")
        )
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            **metrics,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if acc.is_main_process:
            write_eval(self.run_dir, record)
            if self.trackers is not None:
                with writing(self.run_dir):
                    self.trackers.log_eval(metrics, self.state.step)
        log.info("evaluation at step %d: %s", self.state.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        acc.wait_for_everyone()
        return record

    def request_stop(self) -> None:
        """Ask the loop to checkpoint and return at the next step boundary (signal-safe)."""
        if not self.stop.requested:
            self.stop.signal = "request_stop()"

    def result(self) -> FitResult:
        return FitResult(
            self.state.step,
            self.total_steps,
            self.steps_per_epoch,
            self.cfg.train.global_batch_size,
            self.state.train_seconds,
            self.state.loss,
        )

    # ------------------------------------------------------------------ the loop

    def fit(self, until_step: int | None = None) -> FitResult:
        """Train from the current state to the end, or until ``until_step``, then checkpoint."""
        acc, cfg = self.accelerator, self.cfg
        last_step = self.total_steps if until_step is None else min(until_step, self.total_steps)
        metrics = progress = None
        console = contextlib.ExitStack()
        if acc.is_main_process:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            from launcher.config import to_dict

            metrics = MetricsLog(self.run_dir, self.state.step)
            with writing(self.run_dir):
                self.trackers = open_trackers(self.run_dir, to_dict(cfg), cfg.train, self.state.step)
            progress = tqdm(
                total=self.total_steps,
                initial=self.state.step,
                desc=cfg.method.name,
                unit="step",
                dynamic_ncols=True,
                mininterval=2.0,
            )
            # While the bar is drawn, console log lines go through tqdm, which clears the bar, writes the
            # line and redraws the bar below it: the two never share a terminal line.
            console.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        self.model.train()
        method = acc.unwrap_model(self.model)
        if self.loader is None:
            self.loader = self._build_loader(method)
        try:
            # A stop asked for before this fit's first step (a signal during start-up): all ranks
            # agree and return at once, with nothing new to checkpoint.
            if self._agree(self.stop.requested):
                log.info("stopping before the first step as requested")
                return self.result()
            self._window = Window.start()
            while self.state.step < last_step:
                self.sampler.set_epoch(self.state.epoch, self.state.step_in_epoch)
                batches = iter(self.loader)
                while self.state.step_in_epoch < self.steps_per_epoch and self.state.step < last_step:
                    self._train_step(batches, method)
                    step = self.state.step
                    if acc.is_main_process:
                        progress.update(1)
                    logged = step % cfg.train.log_every == 0 or step == last_step
                    saved = step % cfg.train.checkpoint_every == 0
                    if not (logged or saved or step % cfg.train.check_every == 0):
                        continue
                    record = self._check()  # every rank, at the same steps
                    if acc.is_main_process:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                        if logged:
                            metrics.write(record)
                            with writing(self.run_dir):
                                self.trackers.log_train(record, step)
                    if self.stop_agreed or saved:
                        self.save_checkpoint()
                    if self.stop_agreed:
                        log.info("stopping at step %d as requested", step)
                        return self.result()
                if self.state.step_in_epoch == self.steps_per_epoch:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                    every = cfg.eval.every_epochs
                    if every and self.state.epoch % every == 0 and self.state.step < self.total_steps:
                        self.evaluate()
            if self.saved_step != self.state.step:
                self.save_checkpoint()
            if self.state.step == self.total_steps and self.eval_loader is not None:
                if last_evaluated_step(self.run_dir) != self.state.step:
                    self.evaluate()
            return self.result()
        finally:
            if acc.is_main_process:
                progress.close()
                console.close()
                metrics.close()
                if self.trackers is not None:
                    with contextlib.suppress(OSError, RuntimeError):  # a full disk has been reported already
                        self.trackers.close(finished=self.state.step >= self.total_steps)
                    self.trackers = None

    def _build_loader(self, method: nn.Module) -> DataLoader:
        """The training batches: images, or, for a method whose features stay frozen and data that
        is not augmented, the features encoded once (``FeatureCache``): the same steps, cheaper."""
        cfg, acc = self.cfg, self.accelerator
        dataset = self.dataset
        if cfg.data.augment == "none" and getattr(method, "features_frozen", False):
            start = time.perf_counter()
            was_training = method.training
            method.eval()
            dataset = FeatureCache(self.dataset, method.features, acc.device)
            method.train(was_training)
            log.info(
                "encoded the %d training samples once (%.1f s): the head trains on their features",
                len(dataset),
                time.perf_counter() - start,
            )
        return build_loader(dataset, self.sampler, cfg.data.num_workers, acc.device.type == "cuda")

    def _agree(self, flag: bool) -> bool:
        """Whether any rank has ``flag`` set (an all-reduce; free with one process)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum") > 0)

    def _train_step(self, batches, method: nn.Module) -> None:
        """One optimizer step over ``accumulation_steps`` micro-batches, queued without waiting for the device.

        The step's logged values stay on the device (``self._window``) until ``_check`` reads
        them: a GPU runs ahead of the host until then.
        """
        acc, cfg, window = self.accelerator, self.cfg, self._window
        lr = learning_rate(self.state.step, self.total_steps, self.warmup_steps, self.base_lr, cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        sums = {}
        for micro in range(self.accumulation_steps):
            fetch = time.perf_counter()
            batch = next(batches)
            window.data_seconds += time.perf_counter() - fetch
            if self.device_stage is not None:  # decoded here, on the device, in batches
                batch = self.device_stage(batch, acc.device)
            if "bad" in batch:  # unreadable files the pipeline replaced
                window.bad += float(batch.pop("bad").sum())
            # The seeds stay on the host, where the methods draw their noise from them.
            batch = {k: v if k == "seed" else v.to(acc.device, non_blocking=True) for k, v in batch.items()}
            last = micro == self.accumulation_steps - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            with nullcontext() if last else acc.no_sync(self.model):
                out = self.model(batch)
                acc.backward(out["loss"] / self.accumulation_steps)
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()

        # The mean of every logged scalar over micro-batches and ranks: an all-reduce the device
        # runs in its own time. Every rank sees the same reduced loss, so a non-finite one is
        # noticed at the same step everywhere.
        window.keys = sorted(sums)
        values = acc.reduce(torch.stack([sums[k] / self.accumulation_steps for k in window.keys]), reduction="mean")
        finite = torch.isfinite(values[window.keys.index("loss")])
        window.first_nonfinite = torch.where(
            finite | (window.first_nonfinite > 0), window.first_nonfinite, self.state.step + 1
        )
        if cfg.optim.clip_grad is not None:
            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
            values = torch.cat([values, norm.detach().float().view(1).to(values.device)])
        window.values, window.lr = values, lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.step_in_epoch += 1
        window.steps += 1
        if isinstance(method, StepHook):
            method.on_step_end(self.state.step, self.total_steps)

    def _check(self) -> dict[str, float]:
        """Read the last step's values back, agree on stopping, and check the loss and the bad samples.

        Every rank calls this at the same steps. Returns the record to log: the last step's
        values, and the time per step and images/s over the steps since the previous check.
        """
        acc, cfg, window = self.accelerator, self.cfg, self._window
        flags = acc.reduce(torch.tensor([window.bad, float(self.stop.requested)], device=acc.device), reduction="sum")
        packed = torch.cat([window.values, window.first_nonfinite.view(1).float(), flags]).tolist()
        seconds = time.perf_counter() - window.started  # the device has finished every step by now
        bad, stop = packed[-2:]
        first_nonfinite = round(packed[-3])
        values = dict(zip(window.keys, packed[: len(window.keys)]))
        if cfg.optim.clip_grad is not None:
            values["grad_norm"] = packed[len(window.keys)]
        # Decide on the reduced flag only: a signal handler may set the stop request on this rank
        # after the reduce, and acting on it would leave the other ranks in the next step.
        self.stop_agreed = stop > 0
        self.state.bad_samples += round(bad)
        self.state.train_seconds += seconds
        self.state.loss = values["loss"]
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            **values,
            "lr": window.lr,
            "img_per_s": cfg.train.global_batch_size * window.steps / seconds,
            "step_time": seconds / window.steps,
            "data_time": window.data_seconds / window.steps,
        }
        self._window = Window.start()
        if first_nonfinite:
            raise self.diverged(
                f"the loss became non-finite at step {first_nonfinite} (found at step {self.state.step}, "
                f"checked every {cfg.train.check_every} steps)"
            )
        if self.state.bad_samples > cfg.data.max_bad_samples:
            raise DataError(
                f"{self.state.bad_samples} unreadable samples so far (step {self.state.step}), more than "
                f"data.max_bad_samples={cfg.data.max_bad_samples}: the data set has many broken files (the logs "
                f"name them). Run `launch data check {cfg.data.root}`, remove or repair them, or raise "
                f"data.max_bad_samples; then run the same command to resume."
            )
        return record


@dataclass
class Window:
    """What the steps since the last ``Trainer._check`` left to read back."""

    started: float
    first_nonfinite: torch.Tensor | int = 0  # the 1-based step whose loss was first non-finite, 0: none
    steps: int = 0
    data_seconds: float = 0.0
    bad: float = 0.0  # unreadable samples replaced (on this rank)
    keys: list[str] = dataclasses.field(default_factory=list)
    values: torch.Tensor | None = None
    lr: float = 0.0

    @classmethod
    def start(cls) -> Window:
        return cls(time.perf_counter())
