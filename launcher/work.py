"""One class per kind of job: how it runs on this machine and how it is submitted to SLURM.

``launch pretrain|finetune|linprobe`` is a ``TrainingWork``, ``launch resume`` a ``ResumeWork``,
``launch study`` a ``StudyWork``, ``launch sweep pretrain`` a ``SweepArrayWork`` and ``launch tune``
a ``SweepWork`` (a Ray Tune sweep). Each says, in one place, what the job is: ``run_here`` runs it
on this machine (or prints its dry run), and the ``Work`` interface of ``slurm/submit.py`` (its
directory, checks, files, the body every task runs, and the texts) submits it as one SLURM job,
through the same ``submit`` for every kind. The command line parses, builds one, and calls
``run_work``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TextIO

from launcher.config import build_dataclass, dump_yaml
from launcher.errors import ConfigError, RunDirError, UserError
from launcher.slurm.jobs import RaySweepJob, StudyJob, TrainingJob
from launcher.slurm.profiles import ClusterProfile, Resources, check_shared
from launcher.slurm.records import read_launch
from launcher.slurm.submit import Request, Work, sbatch_parameters, submit
from launcher.stopping import STOP_SIGNALS, StopRequest, install_stop_handlers


def write_problems(what: str, problems: list[str], out: TextIO, err: TextIO) -> None:
    """After a dry run's output on ``out``: on ``err``, what the real command would refuse on, to fix first."""
    if problems:
        out.flush()
        fix = "".join(f"  - {problem}\n" for problem in problems)
        err.write(f"dry run only: {what} would refuse until these are fixed:\n{fix}")


def run_work(work: Work, request: Request | None, dry_run: bool, out: TextIO, err: TextIO, note: str = "") -> int:
    """Run ``work`` here (``request`` None), or submit it as one SLURM job (or show its dry run on ``out``)."""
    if request is None:
        return work.run_here(dry_run, out, err)
    submission = submit(work, request, dry_run=dry_run)
    text = note + submission.text
    out.write(text if text.endswith("\n") else text + "\n")
    write_problems("a real submission from this machine", submission.problems, out, err)
    return 0


def allocation_line(res: Resources) -> str:
    """The dry run's line of what the job asks for."""
    return (
        f"# cluster {res.cluster}: {res.nodes} node(s) x {res.tasks_per_node} task(s), "
        f"partition {res.partition}, {res.time_min} min"
    )


def follow_hints(directory: Path) -> str:
    """How to follow a submitted job."""
    return f"  launch status {directory}\n  launch logs {directory} -f\n  launch cancel {directory}"


class TrainingWork(Work):
    """A training run (pretrain, finetune, linprobe): ``TrainingJob`` on every rank, or here.

    ``default_dir`` is where the run goes when no ``--run-dir`` is given: as it is here, and by its
    name under the profile's runs_dir on SLURM. ``demo``: here, the embedded default's probes follow.
    """

    def __init__(self, cfg: Any, experiment: Path, run_dir: Path | None, default_dir: Path, demo: bool = False) -> None:
        self.cfg, self.experiment = cfg, experiment
        self.run_dir, self.default_dir, self.demo = run_dir, Path(default_dir), demo
        self.job_name = f"launch-{cfg.method.name}"

    def header(self, directory: Path, resuming: bool, processes: int, allocation: str = "") -> str:
        """What a dry run shows first, here or on SLURM: the experiment, the directory, the schedule, the config."""
        from launcher.trainer import planned_schedule

        return (
            f"# experiment: {self.experiment}\n# run directory: {directory}"
            f"{' (exists: would resume)' if resuming else ''}\n{allocation}"
            f"# {planned_schedule(self.cfg, processes).describe()}\n{dump_yaml(self.cfg)}"
        )

    def print_dry_run(self, run_dir: Path, resuming: bool, out: TextIO, err: TextIO) -> int:
        """A run on this machine as it would start, and what would stop it."""
        from launcher.data import data_problems

        out.write(self.header(run_dir, resuming, int(os.environ.get("WORLD_SIZE", "1"))))
        write_problems("a real run on this machine", [str(e) for e in data_problems(self.cfg.data_sets())], out, err)
        return 0

    def run_here(self, dry_run: bool, out: TextIO, err: TextIO) -> int:
        """Train on this machine (or print the dry run): the embedded default's demo, or a plain run."""
        from launcher.runs import check_run_dir

        run_dir = self.run_dir or self.default_dir
        resuming = check_run_dir(run_dir, self.cfg)
        if dry_run:
            return self.print_dry_run(run_dir, resuming, out, err)
        if self.demo:
            from launcher.demo import run_demo

            return run_demo(self.cfg, self.experiment, run_dir, resuming, out)
        from launcher.local import run_training
        from launcher.runs import describe_eval, read_eval, resume_note

        out.write(f"experiment {self.experiment}\nrun directory {run_dir}{resume_note(run_dir, resuming)}\n")
        out.flush()
        _, result = run_training(self.cfg, run_dir)
        if not result.finished:
            out.write(
                f"stopped at step {result.step}/{result.total_steps}; run the same command with "
                f"--run-dir {run_dir} to resume\n"
            )
            return 0
        out.write(f"finished {result.step} steps in {run_dir}\n")
        if self.cfg.eval.data is not None:
            out.write(describe_eval(read_eval(run_dir)) + "\n")
        return 0

    def directory(self, profile: ClusterProfile) -> Path:
        return Path(self.run_dir or Path(profile.runs_dir) / self.default_dir.name).resolve()

    def check(self, directory: Path, res: Resources) -> bool:
        from launcher.runs import check_run_dir, check_unlocked
        from launcher.tracking import check_trackers

        check_trackers(self.cfg.train, directory)
        self.cfg.train.check_world(res.nodes * res.tasks_per_node)
        resuming = check_run_dir(directory, self.cfg, writable=False)
        check_unlocked(directory)
        return resuming

    def missing(self, directory: Path, resuming: bool) -> list[UserError]:
        """Data sets this host cannot read (no data.root yet, say); a new run directory it cannot create."""
        from launcher.data import data_problems
        from launcher.runs import check_writable

        problems: list[UserError] = list(data_problems(self.cfg.data_sets()))
        if not resuming:
            try:
                check_writable(directory)
            except RunDirError as e:
                problems.append(e)
        return problems

    def write(self, directory: Path) -> None:
        """The data sets this project generates (on this host, before any node waits for them), then the config."""
        from launcher.local import prepare_data
        from launcher.runs import write_config

        prepare_data(self.cfg)
        write_config(directory, self.cfg)

    def body(self, directory: Path, res: Resources, max_requeues: int) -> TrainingJob:
        return TrainingJob(str(directory), res.gpus_per_node > 0, max_requeues)

    def dry_run_text(self, directory: Path, resuming: bool, res: Resources, script: str) -> str:
        header = self.header(directory, resuming, res.nodes * res.tasks_per_node, allocation_line(res) + "\n")
        return f"{header}# sbatch script\n{script}"

    def submitted_text(self, job_id: str, directory: Path, resuming: bool, res: Resources) -> str:
        return (
            f"submitted job {job_id} to {res.cluster} ({res.nodes} node(s), partition {res.partition})\n"
            f"run directory {directory}{' (resuming)' if resuming else ''}\n{follow_hints(directory)}"
        )


class ResumeWork(TrainingWork):
    """``launch resume RUN``: the run's recorded config, profile and resources, submitted again."""

    def __init__(self, run_dir: Path, max_requeues: int | None) -> None:
        from launcher.experiment import experiment_from_dict
        from launcher.runs import CONFIG, read_run_config

        run_dir = Path(run_dir).resolve()
        self.record = read_launch(run_dir)
        if not (run_dir / CONFIG).is_file():
            raise RunDirError(f"{run_dir} has no {CONFIG}; nothing to resume")
        super().__init__(experiment_from_dict(read_run_config(run_dir)), run_dir / CONFIG, run_dir, run_dir)
        self.max_requeues = self.record.get("max_requeues", 10) if max_requeues is None else max_requeues

    def resources(self, request: Request) -> tuple[ClusterProfile, Resources]:
        return (
            build_dataclass(ClusterProfile, self.record["profile"], "recorded profile"),
            Resources(**self.record["resources"]),
        )

    def write(self, directory: Path) -> None:
        """Nothing: the run directory holds its config already."""

    def submitted_text(self, job_id: str, directory: Path, resuming: bool, res: Resources) -> str:
        return f"submitted job {job_id}; run directory {directory} resumes from its newest checkpoint"


class StudyWork(Work):
    """A study (``launch study ... --cluster``): ``StudyJob`` on every rank, each of its runs on all of them."""

    def __init__(self, study: Any, experiment: Path, directory: Path | None) -> None:
        self.study, self.experiment, self.study_dir = study, experiment, directory
        self.job_name = f"launch-study-{study.name}"

    def describe(self) -> str:
        budget = f"{self.study.steps} steps" if self.study.steps else f"{self.study.budget_s:.0f} s of training"
        return f"{len(self.study.seeds)} seeds x {len(self.study.contenders)} contenders x {budget} each"

    def run_here(self, dry_run: bool, out: TextIO, err: TextIO) -> int:
        """The study on this machine: Ctrl-C or SIGTERM stops at the next step boundary, resumable."""
        from launcher.studies.compare import Study
        from launcher.studies.compare_report import write_report

        study = Study(self.study, self.study_dir or Path("runs/study") / self.study.name)
        resuming = study.check()
        out.write(
            f"study {self.study.name} from {self.experiment} in {study.directory}"
            f"{' (resuming)' if resuming else ''}: {self.describe()}\n"
        )
        out.flush()
        if dry_run:
            return 0
        stop = StopRequest()
        install_stop_handlers(stop, STOP_SIGNALS)
        study.write()

        def say(text: str) -> None:
            out.write(text + "\n")
            out.flush()

        if not study.run(stop, say):
            say(f"stopped; run the same command to resume the study in {study.directory}")
            return 0
        report = write_report(study.directory)
        say(report.read_text())
        say(f"written to {report} and {study.directory / 'quality.png'}")
        return 0

    def directory(self, profile: ClusterProfile) -> Path:
        return Path(self.study_dir or Path(profile.runs_dir) / "study" / self.study.name).resolve()

    def check(self, directory: Path, res: Resources) -> bool:
        from launcher.studies.compare import Study

        first = next(iter(self.study.contenders))
        self.study.experiment_of(first, self.study.seeds[0]).train.check_world(res.nodes * res.tasks_per_node)
        return Study(self.study, directory).check()

    def write(self, directory: Path) -> None:
        from launcher.studies.compare import Study

        Study(self.study, directory).write()

    def body(self, directory: Path, res: Resources, max_requeues: int) -> StudyJob:
        return StudyJob(str(directory), res.gpus_per_node > 0, max_requeues)

    def dry_run_text(self, directory: Path, resuming: bool, res: Resources, script: str) -> str:
        budget = f"{self.study.steps} steps" if self.study.steps else f"{self.study.budget_s:.0f} s"
        return (
            f"# study {self.study.name} from {self.experiment}: {len(self.study.seeds)} seeds x "
            f"{len(self.study.contenders)} contenders x {budget}\n# study directory: {directory}"
            f"{' (exists: would resume)' if resuming else ''}\n"
            f"{allocation_line(res)}\n# sbatch script\n{script}"
        )

    def submitted_text(self, job_id: str, directory: Path, resuming: bool, res: Resources) -> str:
        return (
            f"submitted job {job_id} to {res.cluster} ({res.nodes} node(s), partition {res.partition}): "
            f"study {self.study.name}{' (resuming)' if resuming else ''}\nstudy directory {directory}\n"
            f"{follow_hints(directory)}\n  launch study pcae-vs-mae --report --study-dir {directory}"
        )


class SweepArrayWork(Work):
    """A pretraining grid (``launch sweep pretrain``): its unfinished points as ONE job array.

    Each task of the array is a normal training run of one point's directory (``TrainingJob``):
    the same nodes per task, preemption and requeue as ``launch pretrain``; ``--max-parallel K``
    runs at most K points at once (``--array=...%K``).
    """

    def __init__(self, sweep: Any, sweep_dir: Path | None, max_parallel: int | None) -> None:
        self.sweep, self.sweep_dir, self.max_parallel = sweep, sweep_dir, max_parallel
        self.job_name = f"launch-sweep-{sweep.method}"
        self.plan = None

    def directory(self, profile: ClusterProfile) -> Path:
        return Path(self.sweep_dir or Path(profile.runs_dir) / self.sweep.default_name()).resolve()

    def run_here(self, dry_run: bool, out: TextIO, err: TextIO) -> int:
        """The points one after another on this machine (``--local``)."""
        from launcher import sweeps

        if self.max_parallel is not None:
            raise ConfigError("--max-parallel limits a SLURM job array; --local trains one point at a time")
        plan = sweeps.plan(self.sweep, self.sweep_dir or Path("runs") / self.sweep.default_name())
        out.write(plan.describe())
        if dry_run:
            return 0
        return sweeps.run_locally(plan, out)

    def check(self, directory: Path, res: Resources) -> bool:
        from launcher.sweeps import plan
        from launcher.tracking import check_trackers

        if self.max_parallel is not None and self.max_parallel < 1:
            raise ConfigError(f"--max-parallel must be >= 1, got {self.max_parallel}")
        self.plan = plan(self.sweep, directory)
        for _, cfg in self.plan.configs:
            cfg.train.check_world(res.nodes * res.tasks_per_node)
        check_trackers(self.plan.configs[0][1].train, directory / "points")
        return self.plan.resuming

    def nothing_to_do(self) -> str | None:
        if self.plan is not None and not self.plan.pending:
            return (
                f"all {len(self.plan.configs)} points of {self.plan.directory} have finished; nothing submitted\n"
                f"  launch report {self.plan.directory}"
            )
        return None

    def array_size(self) -> int | None:
        return len(self.plan.pending)

    def write(self, directory: Path) -> None:
        from launcher.local import prepare_data
        from launcher.runs import write_config
        from launcher.sweeps import point_dir

        self.sweep.write(directory)
        for name, cfg in self.plan.configs:
            if name in self.plan.pending:
                prepare_data(cfg)  # once per data set: prepared sets are found and kept
                if not (point_dir(directory, name) / "config.yaml").is_file():
                    write_config(point_dir(directory, name), cfg)

    def body(self, directory: Path, res: Resources, max_requeues: int) -> list[TrainingJob]:
        from launcher.sweeps import point_dir

        return [
            TrainingJob(str(point_dir(directory, name)), res.gpus_per_node > 0, max_requeues)
            for name in self.plan.pending
        ]

    def sbatch_parameters(self, profile: ClusterProfile, res: Resources) -> dict[str, Any]:
        params = sbatch_parameters(profile, res, self.job_name)
        if self.max_parallel is not None:
            params["array_parallelism"] = self.max_parallel
        return params

    def dry_run_text(self, directory: Path, resuming: bool, res: Resources, script: str) -> str:
        return f"{self.plan.describe()}{allocation_line(res)} per point\n# sbatch script\n{script}"

    def submitted_text(self, job_id: str, directory: Path, resuming: bool, res: Resources) -> str:
        return (
            f"submitted job array {job_id} to {res.cluster}: {len(self.plan.pending)} point(s) of "
            f"{res.nodes} node(s) each, partition {res.partition}{' (resuming)' if resuming else ''}\n"
            f"sweep directory {directory}\n{follow_hints(directory)}\n  launch report {directory}"
        )


SWEEP_MAX_REQUEUES = 10  # preemptions requeue the sweep job; each attempt restores the sweep


class SweepWork(Work):
    """A study's Ray Tune sweep on a Ray cluster of the job's nodes: ``RaySweepJob``, one task per node."""

    max_requeues = SWEEP_MAX_REQUEUES

    def __init__(
        self, study: str, sweep: Any, experiment: Path, storage: Path | None, resume: bool, address: str | None = None
    ) -> None:
        self.study, self.sweep, self.experiment = study, sweep, experiment
        self.storage, self.resume, self.address = storage, resume, address
        self.job_name = f"launch-tune-{sweep.name}"

    def check_resume(self, directory: Path, exists: bool) -> None:
        if self.resume and not exists:
            raise ConfigError(f"--resume: there is no sweep at {directory} to resume; run without --resume to start it")

    def run_here(self, dry_run: bool, out: TextIO, err: TextIO) -> int:
        """The sweep on this machine's Ray (or the Ray cluster at ``address``)."""
        from launcher.studies import ae_losses

        storage = self.storage or Path("runs/tune")
        path = self.sweep.directory(storage)
        self.check_resume(path, path.exists())
        out.write(f"sweep {self.sweep.name}: {self.sweep.num_trials} trials from {self.experiment}, in {path}\n")
        out.flush()
        if dry_run:
            return 0
        ae_losses.run(self.sweep, storage, self.address)
        out.write(f"done; `launch report {path}` writes the table and plots\n")
        return 0

    def directory(self, profile: ClusterProfile) -> Path:
        self.storage = Path(self.storage or profile.runs_dir).resolve()
        check_shared(self.storage, "sweep storage (--storage)")
        return self.sweep.directory(self.storage)

    def check(self, directory: Path, res: Resources) -> bool:
        resuming = self.sweep.check_directory(directory)
        self.check_resume(directory, resuming)
        return resuming

    def write(self, directory: Path) -> None:
        self.sweep.write(directory)

    def body(self, directory: Path, res: Resources, max_requeues: int) -> RaySweepJob:
        return RaySweepJob(self.study, str(directory), str(self.storage), res.gpus_per_node)

    def sbatch_parameters(self, profile: ClusterProfile, res: Resources) -> dict[str, Any]:
        """One task per node, holding all of its CPUs and GPUs."""
        params = sbatch_parameters(profile, res, self.job_name)
        params.update(ntasks_per_node=1, cpus_per_task=profile.cpus_per_task * res.tasks_per_node)
        return params

    def dry_run_text(self, directory: Path, resuming: bool, res: Resources, script: str) -> str:
        return (
            f"# sweep {self.sweep.name}: {self.sweep.num_trials} trials from {self.experiment}\n"
            f"# sweep directory: {directory}{' (exists: would restore)' if resuming else ''}\n"
            f"# cluster {res.cluster}: a Ray cluster of {res.nodes} node(s), partition {res.partition}, "
            f"{res.time_min} min\n# sbatch script\n{script}"
        )

    def submitted_text(self, job_id: str, directory: Path, resuming: bool, res: Resources) -> str:
        return (
            f"submitted job {job_id} to {res.cluster} (a Ray cluster of {res.nodes} node(s), partition "
            f"{res.partition}): sweep {self.sweep.name}, {self.sweep.num_trials} trials"
            f"{' (restoring)' if resuming else ''}\nsweep directory {directory}\n{follow_hints(directory)}\n"
            f"  launch report {directory}   # once it has finished"
        )
