"""The ``launch`` command line.

    launch pretrain pcae                     # the embedded default: this machine, small local experiment
    launch pretrain mae --experiment F.yaml optim.blr=1e-4 data.root=...
    launch pretrain pcae --dry-run           # print the resolved config and run directory only
    launch pretrain pcae --nodes 4 --cluster mycluster   # one SLURM job of 4 nodes (slurm/clusters/)
    launch status [RUN]    launch resume RUN    launch cancel RUN    launch logs RUN [-f] [--rank K]
    launch data lunarlander --frames 20000 --out data/lunarlander-64
    launch bench pretrain

Errors the user can fix are printed as one paragraph, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
from pathlib import Path

from launcher.errors import ConfigError, UserError
from launcher.runs import setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pretrain = commands.add_parser("pretrain", help="pretrain an encoder (pcae, mae, ...)")
    pretrain.add_argument("method", help="registered method name, e.g. pcae or mae")
    pretrain.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                          help="dotted overrides of the experiment, e.g. optim.blr=1e-4")
    pretrain.add_argument("--experiment", type=Path,
                          help="experiment YAML (default: experiments/pretrain/METHOD_local.yaml)")
    pretrain.add_argument("--run-dir", type=Path, help="run directory; an existing run of the same config resumes")
    pretrain.add_argument("--local", action="store_true",
                          help="run on this machine (the default while no cluster is named)")
    pretrain.add_argument("--dry-run", action="store_true",
                          help="print the resolved config, run directory (and sbatch script), run nothing")
    slurm = pretrain.add_argument_group("SLURM (override the cluster profile)")
    slurm.add_argument("--cluster", help="cluster profile slurm/clusters/NAME.yaml; submits one SLURM job")
    slurm.add_argument("--nodes", type=int, help="nodes of the job (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (0: one task per node)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--time", help="time limit: minutes, H:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--max-requeues", type=int, default=10,
                       help="requeues after preemption/time limit before the job gives up (default 10)")

    status = commands.add_parser("status", help="state of a SLURM run (or of every run) from sacct")
    status.add_argument("run", nargs="?", type=Path, help="run directory (default: all runs of all profiles)")
    resume = commands.add_parser("resume", help="resubmit a stopped SLURM run with its recorded config")
    resume.add_argument("run", type=Path)
    resume.add_argument("--max-requeues", type=int, help="override the recorded limit")
    cancel = commands.add_parser("cancel", help="cancel the SLURM jobs of a run")
    cancel.add_argument("run", type=Path)
    logs = commands.add_parser("logs", help="print the log of one task of a run's newest job")
    logs.add_argument("run", type=Path)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--rank", type=int, default=0, help="global rank of the task (default 0)")

    data = commands.add_parser("data", help="generate a data set")
    data_kinds = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    lunar = data_kinds.add_parser("lunarlander", help="frames of gymnasium LunarLander-v3 with the lander's state")
    lunar.add_argument("--frames", type=int, required=True, help="number of frames")
    lunar.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    lunar.add_argument("--size", type=int, default=64, help="frame size in pixels, 64 + 16n (default 64)")
    lunar.add_argument("--agent", choices=["random", "heuristic"], default="random")
    lunar.add_argument("--workers", type=int, default=2, help="worker processes")
    lunar.add_argument("--seed", type=int, default=0)

    sweep = commands.add_parser("tune", help="run a Ray Tune sweep (local Ray by default)")
    sweep.add_argument("study", choices=["ae-losses"], help="the study to sweep")
    sweep.add_argument("--experiment", type=Path, help="sweep file (default: experiments/tune/ae_losses.yaml)")
    sweep.add_argument("--dataset", help="run only this data set of the sweep, e.g. lunarlander")
    sweep.add_argument("--storage", type=Path, default=Path("runs/tune"), help="where sweeps live (default runs/tune)")
    sweep.add_argument("--resume", action="store_true",
                       help="finish an interrupted sweep (re-running the same command does the same)")
    sweep.add_argument("--address", help="an existing Ray cluster to use, e.g. host:6379 (default: local Ray)")

    report = commands.add_parser("report", help="Markdown table and PNG plots of a sweep")
    report.add_argument("sweep", type=Path, help="sweep directory, e.g. runs/tune/ae-losses")

    bench = commands.add_parser("bench", help="benchmarks that print measured ratios")
    bench_kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    bench_pretrain = bench_kinds.add_parser("pretrain", help="PCAE vs MAE training steps, side by side")
    bench_pretrain.add_argument("--sizes", default="small,base", help="comma-separated ViT sizes")
    bench_pretrain.add_argument("--batch-size", type=int, default=None, help="images per step (default per size)")
    bench_pretrain.add_argument("--steps", type=int, default=3, help="timed steps per method and size")
    bench_pretrain.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    bench_ae = bench_kinds.add_parser("ae-losses", help="the six autoencoder procedures: time per step and epoch")
    bench_ae.add_argument("--steps", type=int, default=5, help="timed steps per procedure (alternating)")
    bench_ae.add_argument("--frames", type=int, default=2560, help="LunarLander frames of the timed epoch")
    bench_ae.add_argument("--data", type=Path, default=Path("data/ll64-bench"),
                          help="LunarLander set for the epoch timing (generated if missing)")
    bench_ae.add_argument("--loss-network", default="efficientnet_lite0")
    bench_slurm = bench_kinds.add_parser("slurm", help="on a SLURM cluster: submit -> first step, "
                                                       "USR2 -> first step after the resume")
    bench_slurm.add_argument("--cluster", default="local-test", help="cluster profile (default local-test)")
    bench_slurm.add_argument("--nodes", type=int, default=2)
    bench_slurm.add_argument("--repeats", type=int, default=1, help="jobs measured one after the other")
    bench_slurm.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                             help="a folder all nodes share, for the images and runs (default /var/tmp)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags; argparse leaves the later ones as extras.
    args, extras = parser.parse_known_args(argv)
    unknown = [e for e in extras if e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    setup_logging(None, rank=0)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"launch {args.command}: error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- pretrain


def cmd_pretrain(args: argparse.Namespace) -> int:
    from launcher.config import default_experiment, dump_yaml, load_experiment
    from launcher.runs import check_run_dir, default_run_dir
    from methods import UnknownMethodError, get_method

    try:
        get_method(args.method)
    except UnknownMethodError as e:
        raise ConfigError(str(e)) from None
    slurm_flags = [f"--{k.replace('_', '-')}" for k in ("nodes", "gpus_per_node", "partition", "time")
                   if getattr(args, k) is not None]
    if args.local and (args.cluster or slurm_flags):
        raise ConfigError(f"--local runs on this machine; drop {' '.join(slurm_flags) or '--cluster'} or --local")
    if slurm_flags and not args.cluster:
        from launcher.slurm import profile_names

        raise ConfigError(f"{' '.join(slurm_flags)} need a cluster profile: pass --cluster NAME "
                          f"(known profiles: {', '.join(profile_names())})")
    if args.cluster:
        return pretrain_on_slurm(args)
    experiment = args.experiment or default_experiment("pretrain", args.method, local=True)
    cfg = load_experiment(experiment, args.overrides, method=args.method)
    run_dir = args.run_dir or default_run_dir("pretrain", experiment.stem)
    resuming = check_run_dir(run_dir, cfg)
    if args.dry_run:
        print(f"# experiment: {experiment}\n# run directory: {run_dir}"
              f"{' (exists: would resume)' if resuming else ''}\n{dump_yaml(cfg)}", end="")
        return 0
    print(f"experiment {experiment}\nrun directory {run_dir}{' (resuming)' if resuming else ''}", flush=True)
    return run_pretrain(cfg, run_dir)


def pretrain_on_slurm(args: argparse.Namespace) -> int:
    from launcher import slurm
    from launcher.config import default_experiment, dump_yaml, load_experiment
    from launcher.runs import check_run_dir, default_run_dir, write_config

    profile = slurm.load_profile(args.cluster)
    res = slurm.resolve_resources(args.cluster, profile, args.nodes, args.gpus_per_node, args.partition,
                                  None if args.time is None else slurm.parse_time(args.time))
    if args.max_requeues < 0:
        raise ConfigError("--max-requeues must be >= 0")
    experiment = args.experiment or default_experiment("pretrain", args.method, local=False)
    cfg = load_experiment(experiment, args.overrides, method=args.method)
    world = res.nodes * res.tasks_per_node
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * world):
        raise ConfigError(f"train.global_batch_size ({cfg.train.global_batch_size}) is not a multiple of "
                          f"train.micro_batch_size x processes ({cfg.train.micro_batch_size} x {world}); "
                          f"change one of them or the number of nodes/GPUs")
    run_dir = (args.run_dir or Path(profile.runs_dir) / default_run_dir("pretrain", experiment.stem).name)
    run_dir = Path(run_dir).resolve()
    slurm.check_shared(run_dir, "run directory")
    resuming = check_run_dir(run_dir, cfg)
    if args.dry_run:
        if shutil.which("sbatch"):
            slurm.check_partition(res)
        script = slurm.render_sbatch(profile, res, run_dir, f"launch-{cfg.method.name}", args.max_requeues)
        print(f"# experiment: {experiment}\n# run directory: {run_dir}"
              f"{' (exists: would resume)' if resuming else ''}\n"
              f"# cluster {res.cluster}: {res.nodes} node(s) x {res.tasks_per_node} task(s), partition "
              f"{res.partition}, {res.time_min} min\n{dump_yaml(cfg)}# sbatch script\n{script}", end="")
        return 0
    slurm.check_cluster(res)
    if resuming and (run_dir / slurm.LAUNCH_JSON).is_file():
        slurm.check_not_active(run_dir)
    write_config(run_dir, cfg)
    job_id = slurm.submit(cfg, run_dir, profile, res, args.max_requeues)
    print(f"submitted job {job_id} to {res.cluster} ({res.nodes} node(s), partition {res.partition})\n"
          f"run directory {run_dir}{' (resuming)' if resuming else ''}\n"
          f"  launch status {run_dir}\n  launch logs {run_dir} -f\n  launch cancel {run_dir}")
    return 0


def run_pretrain(cfg, run_dir: Path) -> int:
    from launcher.trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    trainer.resume()

    def stop(signum: int, frame) -> None:
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        trainer.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, stop)
    result = trainer.fit()
    if not result.finished:
        print(f"stopped at step {result.step}/{result.total_steps}; run the same command with "
              f"--run-dir {run_dir} to resume")
        return 0
    print(f"finished {result.step} steps in {run_dir}")
    if cfg.probe.enabled and trainer.accelerator.is_main_process:
        report_probe(cfg, run_dir, trainer.accelerator.unwrap_model(trainer.model), result.step)
    return 0


def report_probe(cfg, run_dir: Path, trained, num_steps: int) -> None:
    import torch

    from launcher.probe import probe_encoders
    from methods import build_method

    torch.manual_seed(cfg.train.seed)  # the same initialisation the run started from
    initial = build_method(cfg.method).to(next(trained.parameters()).device)
    scores = probe_encoders(cfg, {"pretrained": trained, "random init": initial})
    (run_dir / "probe.json").write_text(json.dumps({"targets": list(cfg.probe.targets), "r2": scores}, indent=2))
    names = {0: "x", 1: "y"} if cfg.data.name == "lunarlander" else {}
    columns = [f"R2({names.get(t, t)})" for t in cfg.probe.targets]
    print(f"\nRidge probe of label columns {list(cfg.probe.targets)} on frozen embeddings "
          f"(held-out episodes):")
    print(f"  {'encoder':<28}" + "".join(f"{c:>9}" for c in columns) + f"{'mean':>9}")
    labels = {"pretrained": f"{cfg.method.name} after {num_steps} steps", "random init": "same encoder, random init"}
    for name, r2 in scores.items():
        print(f"  {labels[name]:<28}" + "".join(f"{v:>9.3f}" for v in r2) + f"{sum(r2) / len(r2):>9.3f}")


# ----------------------------------------------------------------------------- data, bench


def cmd_data(args: argparse.Namespace) -> int:
    from launcher.lunarlander import generate_lunarlander

    out = generate_lunarlander(args.out, args.frames, size=args.size, agent=args.agent,
                               num_workers=args.workers, seed=args.seed)
    print(f"wrote {args.frames} frames to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from launcher import bench

    return bench.run(args)


# ----------------------------------------------------------------------------- operating SLURM runs


def format_status(status: dict) -> str:
    loss = "-" if status["loss"] is None else f"{status['loss']:.4f}"
    line = (f"{status['run_dir']}: job {status['job_id']} on {status['cluster']} {status['state']}, "
            f"step {status['step'] if status['step'] is not None else '-'}, loss {loss}, "
            f"restarts {status['restarts']}")
    if status["last_error"]:
        line += f"\n  last error: {status['last_error']}"
    return line


def cmd_status(args: argparse.Namespace) -> int:
    from launcher import slurm

    runs = [args.run] if args.run else slurm.find_runs()
    if not runs:
        print("no SLURM runs found under the profiles' runs_dir")
    for run in runs:
        print(format_status(slurm.run_status(run)))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from launcher import slurm

    job_id = slurm.resume(args.run, args.max_requeues)
    print(f"submitted job {job_id}; run directory {Path(args.run).resolve()} resumes from its newest checkpoint")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from launcher import slurm

    cancelled = slurm.cancel(args.run)
    print(f"cancelled job(s) {', '.join(cancelled)}" if cancelled else "no active job to cancel")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from launcher import slurm

    path = slurm.log_path(args.run, args.rank)
    if args.follow:
        try:
            slurm.follow(path, args.run)
        except KeyboardInterrupt:
            pass
        return 0
    if not path.exists():
        raise UserError(f"no log {path} yet: the job has not started (see `launch status {args.run}`)")
    sys.stdout.write(path.read_text())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from launcher.tune import TUNE_DIR, load_sweep, run_sweep, sweep_dir

    experiment = args.experiment or TUNE_DIR / "ae_losses.yaml"
    sweep = load_sweep(experiment, args.dataset)
    path = sweep_dir(sweep, args.storage)
    if args.resume and not path.exists():
        raise ConfigError(f"--resume: there is no sweep at {path} to resume; run without --resume to start it")
    trials = len(sweep.procedures) * len(sweep.z) * len(sweep.gamma) * len(sweep.seeds) * len(sweep.datasets)
    print(f"sweep {sweep.name}: {trials} trials from {experiment}, in {path}", flush=True)
    run_sweep(sweep, args.storage, args.address)
    print(f"done; `launch report {path}` writes the table and plots")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from launcher.report import write_report

    path = write_report(args.sweep)
    print(path.read_text())
    print(f"written to {path}")
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "data": cmd_data, "bench": cmd_bench, "status": cmd_status,
            "resume": cmd_resume, "cancel": cmd_cancel, "logs": cmd_logs, "tune": cmd_tune, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
