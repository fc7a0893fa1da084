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
import logging
import os
import sys
from pathlib import Path

from launcher.errors import ConfigError, RunDirError, UserError
from launcher.runs import setup_logging

log = logging.getLogger(__name__)


CLUSTER_HELP = "cluster profile NAME or PATH.yaml (`launch cluster show` lists them); submits one SLURM job"


def add_job_flags(group: argparse._ArgumentGroup) -> None:
    """The flags of one SLURM job that training runs and studies share."""
    group.add_argument("--cluster", help=CLUSTER_HELP)
    group.add_argument("--nodes", type=int, help="nodes of the job (default 1)")
    group.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (0: one task per node)")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--time", help="time limit: minutes, H:MM:SS or D-HH:MM:SS")


def build_parser() -> argparse.ArgumentParser:
    from launcher import package_version

    parser = argparse.ArgumentParser(prog="launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"launch {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pretrain = commands.add_parser("pretrain", help="pretrain an encoder (pcae, mae, ...)")
    pretrain.add_argument("method", help="registered method name, e.g. pcae or mae")
    add_run_arguments(pretrain, "pretrain/METHOD_local; with --cluster pretrain/METHOD_vit_base")

    grid = commands.add_parser("sweep", help="a grid of pretraining runs: one SLURM job array, or one after another")
    grid.add_argument("kind", choices=["pretrain"], help="what each point runs")
    grid.add_argument("method", help="registered method name, e.g. pcae or mae")
    grid.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides common to every point")
    grid.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a key and its values; several --grid make the cartesian product",
    )
    grid.add_argument("--experiment", help="experiment YAML or shipped name (default as for `launch pretrain`)")
    grid.add_argument("--sweep-dir", type=Path, help="where the points go (default: named after the sweep)")
    grid.add_argument("--max-points", type=int, default=64, help="refuse grids of more points (default 64)")
    grid.add_argument("--max-parallel", type=int, help="SLURM: at most K points running at once (--array=...%%K)")
    grid.add_argument("--local", action="store_true", help="train the points on this machine, one after another")
    grid.add_argument("--dry-run", action="store_true", help="print the points (and sbatch script); run nothing")
    grid_slurm = grid.add_argument_group("SLURM (one job array, each point a job of N nodes)")
    add_job_flags(grid_slurm)
    grid_slurm.add_argument("--max-requeues", type=int, default=10, help="requeues per point (default 10)")

    for name, what in (
        ("finetune", "fine-tune a pretrained encoder (MAE's recipe; PCAE's token reduction)"),
        ("linprobe", "linear probe of a frozen pretrained encoder (MAE's recipe)"),
    ):
        downstream = commands.add_parser(name, help=what)
        downstream.add_argument(
            "source",
            type=Path,
            metavar="RUN_OR_CHECKPOINT",
            help="a pretraining run directory (its newest valid checkpoint), one of its "
            "checkpoints/step_N directories, or a weights file (official MAE .pth)",
        )
        downstream.add_argument(
            "--encoder", choices=["student", "teacher"], help="which PCAE encoder to start from (default student)"
        )
        downstream.add_argument(
            "--keep-ratio",
            type=float,
            help="PCAE token reduction: fraction of tokens kept at each drop position "
            "(drop ratio = 1 - keep ratio; default 1, no reduction)",
        )
        downstream.add_argument(
            "--eval-only",
            action="store_true",
            help="evaluate only: a fine-tuning/probe run as SOURCE at its newest checkpoint, "
            "or the model as loaded from SOURCE",
        )
        add_run_arguments(downstream, f"{name}/local; with --cluster {name}/vit_base")

    status = commands.add_parser("status", help="state, step and cost of a run or sweep (or of every run)")
    status.add_argument(
        "run", nargs="?", type=Path, help="run, sweep or a folder of runs (default: ./runs and the profiles' runs_dir)"
    )
    resume = commands.add_parser("resume", help="resubmit a stopped SLURM run with its recorded config")
    resume.add_argument("run", type=Path)
    resume.add_argument("--max-requeues", type=int, help="override the recorded limit")
    cancel = commands.add_parser("cancel", help="cancel a run's SLURM jobs, or stop a run of this machine")
    cancel.add_argument("run", type=Path)
    logs = commands.add_parser("logs", help="print the log of one task of a run (its newest job on SLURM)")
    logs.add_argument("run", type=Path)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    logs.add_argument("--rank", type=int, default=0, help="global rank of the task (default 0)")

    data = commands.add_parser("data", help="generate a data set")
    data_kinds = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    lunar = data_kinds.add_parser("lunarlander", help="frames of gymnasium LunarLander-v3 with the lander's state")
    lunar.add_argument("--frames", type=int, required=True, help="number of frames")
    lunar.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    lunar.add_argument("--size", type=int, default=64, help="frame size in pixels, 64 + 16n (default 64)")
    lunar.add_argument("--agent", choices=["random", "heuristic", "mixed"], default="random")
    lunar.add_argument("--workers", type=int, default=2, help="worker processes")
    lunar.add_argument("--seed", type=int, default=0)
    lunar.add_argument("--max-episode-steps", type=int, help="cut each episode after this many steps")
    lunar.add_argument("--frame-stride", type=int, default=1, help="keep every Nth step of an episode (default 1)")
    shard = data_kinds.add_parser("shard", help="write an image folder as WebDataset tar shards with one index")
    shard.add_argument("src", type=Path, help="an ImageNet-layout folder (one sub-directory per class)")
    shard.add_argument("--out", type=Path, required=True, help="folder of the shards (new, or a conversion to resume)")
    shard.add_argument("--max-side", type=int, help="pre-resize so that the shortest side is at most N pixels")
    shard.add_argument("--quality", type=int, default=90, help="JPEG quality of pre-resized images (default 90)")
    shard.add_argument("--shard-size", type=float, default=256, help="MB per shard (default 256)")
    shard.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    check = data_kinds.add_parser("check", help="decode every image of an image folder; list the unreadable ones")
    check.add_argument("root", type=Path, help="an ImageNet-layout folder (one sub-directory per class)")
    check.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")

    sweep = commands.add_parser("tune", help="run a Ray Tune sweep (local Ray by default)")
    sweep.add_argument("study", choices=["ae-losses"], help="the study to sweep")
    sweep.add_argument("--experiment", help="sweep file or shipped name (default: tune/ae_losses)")
    sweep.add_argument("--dataset", help="run only this data set of the sweep, e.g. lunarlander")
    sweep.add_argument(
        "--storage", type=Path, help="where sweeps live (default runs/tune; on SLURM the profile's runs_dir)"
    )
    sweep.add_argument(
        "--resume", action="store_true", help="finish an interrupted sweep (re-running the same command does the same)"
    )
    sweep.add_argument("--address", help="an existing Ray cluster to use, e.g. host:6379 (default: local Ray)")
    sweep.add_argument(
        "--dry-run", action="store_true", help="print the sweep's directory and trials (and sbatch script); run nothing"
    )
    sweep_slurm = sweep.add_argument_group("SLURM (one job of N nodes runs a Ray cluster and the sweep)")
    sweep_slurm.add_argument("--cluster", help=CLUSTER_HELP)
    sweep_slurm.add_argument("--nodes", type=int, help="nodes of the job, one Ray node each (default 1)")
    sweep_slurm.add_argument("--partition", help="SLURM partition")
    sweep_slurm.add_argument("--time", help="time limit: minutes, H:MM:SS or D-HH:MM:SS")

    study = commands.add_parser("study", help="contenders (PCAE vs MAE, ablations) at equal cost: probe quality")
    study.add_argument(
        "study",
        choices=["pcae-vs-mae", "compare", "probe-check"],
        help="pcae-vs-mae: the shipped PCAE-vs-MAE study; compare: the contenders of --experiment; "
        "probe-check: can the demo's probe see the lander's state (random init, pixels, a known readout)",
    )
    study.add_argument(
        "--experiment", help="study file or shipped name (default for pcae-vs-mae: study/pcae_vs_mae_local)"
    )
    study.add_argument("--budget", help="wall time of each pretraining run, e.g. 90s, 5m (default: the file's)")
    study.add_argument("--seeds", help="comma-separated seeds (default: the file's)")
    study.add_argument("--study-dir", type=Path, help="where the study lives (default runs/study/NAME)")
    study.add_argument("--report", action="store_true", help="only write the report of the points so far")
    study.add_argument("--dry-run", action="store_true", help="print the study, its directory (and sbatch script)")
    add_job_flags(study.add_argument_group("SLURM (one job of N nodes runs the study, each run on all of them)"))

    commands.add_parser("experiments", help="list the shipped experiment files (address them by name)")
    export = commands.add_parser("export", help="write a run's encoder as a folder timm loads (local-dir:FOLDER)")
    export.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT", help="a run directory or checkpoints/step_N")
    export.add_argument(
        "--out", type=Path, required=True, help="a new folder: model.safetensors + config.json (timm's layout)"
    )
    export.add_argument(
        "--encoder",
        choices=["student", "teacher"],
        default="student",
        help="PCAE: the student (default) or its EMA teacher",
    )
    cluster = commands.add_parser("cluster", help="describe the SLURM cluster this machine sees, as a profile")
    cluster_kinds = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = cluster_kinds.add_parser("init", help="write a profile from what SLURM reports (on a login node)")
    init.add_argument("name", help="the profile's name (--cluster NAME); a file NAME.yaml in your profile directory")
    init.add_argument("--runs-dir", help="where runs go, on a filesystem every node sees (default ~/launch-runs)")
    init.add_argument("--partition", help="the partition jobs go to (default: the cluster's default partition)")
    init.add_argument("--force", action="store_true", help="overwrite an existing profile of that name")
    show = cluster_kinds.add_parser("show", help="print a profile and what the cluster says now")
    show.add_argument("name", nargs="?", help="profile name or path (default: every profile found)")

    report = commands.add_parser("report", help="Markdown table and PNG plots of a sweep")
    report.add_argument("sweep", type=Path, help="sweep directory, e.g. runs/tune/ae-losses")

    bench = commands.add_parser("bench", help="benchmarks that print measured ratios")
    bench_kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    bench_pretrain = bench_kinds.add_parser("pretrain", help="PCAE vs MAE training steps, side by side")
    bench_pretrain.add_argument("--sizes", default="small,base", help="comma-separated ViT sizes")
    bench_pretrain.add_argument("--batch-size", type=int, default=None, help="images per step (default per size)")
    bench_pretrain.add_argument("--steps", type=int, default=3, help="timed steps per method and size")
    bench_pretrain.add_argument("--warmup", type=int, default=1, help="untimed steps first (compiled: at least 2)")
    bench_pretrain.add_argument(
        "--modes", default="eager", help="eager and/or compiled (torch.compile), comma-separated (default eager)"
    )
    bench_finetune = bench_kinds.add_parser(
        "finetune",
        help="inference with PCAE's token reduction at several drop ratios: img/s, FLOPs, speed-up vs FLOP cut",
    )
    bench_finetune.add_argument("--drop-ratios", default="0,0.1,0.2,0.3,0.4", help="comma-separated, 0 first")
    bench_finetune.add_argument("--size", default="base", help="ViT size (default base)")
    bench_finetune.add_argument("--batch-size", type=int, help="images per forward (default 16 on CPU, 256 on GPU)")
    bench_finetune.add_argument("--steps", type=int, default=3, help="timed forwards per drop ratio (alternating)")
    bench_finetune.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    bench_ae = bench_kinds.add_parser("ae-losses", help="the six autoencoder procedures: time per step and epoch")
    bench_ae.add_argument("--steps", type=int, default=5, help="timed steps per procedure (alternating)")
    bench_ae.add_argument("--frames", type=int, default=2560, help="LunarLander frames of the timed epoch")
    bench_ae.add_argument(
        "--data",
        type=Path,
        default=Path("data/ll64-bench"),
        help="LunarLander set for the epoch timing (generated if missing)",
    )
    bench_ae.add_argument("--loss-network", default="efficientnet_lite0")
    bench_data = bench_kinds.add_parser("data", help="the pretraining input pipeline: images/s per loader worker")
    bench_data.add_argument("--root", default="data/imagenet-like-jpegs", help="where the generated JPEGs go")
    bench_data.add_argument("--images", type=int, default=200, help="JPEGs decoded per round and path")
    bench_data.add_argument("--rounds", type=int, default=3, help="timed rounds per path (alternating)")
    bench_data.add_argument("--img-size", type=int, default=224)
    bench_data.add_argument("--max-side", type=int, default=256, help="pre-resized shards' shortest side")
    bench_data.add_argument(
        "--startup-samples", type=int, default=1_000_000, help="samples of the start-up timing (0: skip it)"
    )
    bench_data.add_argument(
        "--step-rate", help="comma-separated training img/s per GPU (from `launch bench pretrain`): workers needed"
    )
    bench_ckpt = bench_kinds.add_parser("checkpoint", help="a checkpoint save before/after, in training steps")
    bench_ckpt.add_argument("--size", default="base", help="ViT size (default base)")
    bench_ckpt.add_argument("--method", default="pcae", help="registered method (default pcae)")
    bench_ckpt.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    bench_ckpt.add_argument("--steps", type=int, default=3, help="timed training steps")
    bench_ckpt.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    bench_ckpt.add_argument("--repeats", type=int, default=3, help="timed saves (median)")
    bench_ckpt.add_argument("--dir", default=None, help="where the run goes (default: the temporary folder)")
    bench_slurm = bench_kinds.add_parser(
        "slurm", help="on a SLURM cluster: submit -> first step, USR2 -> first step after the resume"
    )
    bench_slurm.add_argument("--cluster", default="local-test", help="cluster profile (default local-test)")
    bench_slurm.add_argument("--nodes", type=int, default=2)
    bench_slurm.add_argument("--repeats", type=int, default=1, help="jobs measured one after the other")
    bench_slurm.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="a folder all nodes share, for the images and runs (default /var/tmp)",
    )
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, default_experiment: str) -> None:
    """The arguments every training command shares: experiment, overrides, run dir, SLURM."""
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the experiment, e.g. optim.blr=1e-4"
    )
    parser.add_argument(
        "--experiment",
        help=f"experiment YAML, or a shipped one by name (`launch experiments`; default {default_experiment})",
    )
    parser.add_argument("--run-dir", type=Path, help="run directory; an existing run of the same config resumes")
    parser.add_argument(
        "--local", action="store_true", help="run on this machine (the default while no cluster is named)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, run directory (and sbatch script), run nothing",
    )
    slurm = parser.add_argument_group("SLURM (override the cluster profile)")
    add_job_flags(slurm)
    slurm.add_argument(
        "--max-requeues",
        type=int,
        default=10,
        help="requeues after preemption/time limit before the job gives up (default 10)",
    )


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
    from launcher.stopping import Interrupted

    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"launch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # a stop signal before any step: nothing half-written is left
        print(
            f"launch {args.command}: {e} while preparing; nothing half-written was kept. Run the same command "
            f"to start again.",
            file=sys.stderr,
        )
        return 0


# ----------------------------------------------------------------------------- training runs


def slurm_flags_given(args: argparse.Namespace) -> list[str]:
    """The SLURM flags on this command line that override a cluster profile."""
    return [
        f"--{k.replace('_', '-')}"
        for k in ("nodes", "gpus_per_node", "partition", "time")
        if getattr(args, k, None) is not None
    ]


def check_placement(args: argparse.Namespace) -> None:
    """--local and the SLURM flags exclude each other; SLURM flags without --cluster find the cluster
    (``discover.find_cluster``). Sets ``args.cluster``, ``args.profile`` and ``args.profile_note``."""
    slurm_flags = slurm_flags_given(args)
    args.profile, args.profile_note = None, ""
    if getattr(args, "local", False) and (args.cluster or slurm_flags):
        raise ConfigError(f"--local runs on this machine; drop {' '.join(slurm_flags) or '--cluster'} or --local")
    if slurm_flags and not args.cluster:
        from launcher.slurm.discover import find_cluster

        args.cluster, args.profile, args.profile_note = find_cluster(slurm_flags, getattr(args, "partition", None))


def run_work(args: argparse.Namespace, work) -> int:
    """Every command that runs a job ends here: on this machine, or one plan for SLURM (printed or submitted)."""
    from launcher.slurm.submit import Request
    from launcher.work import run_work as run

    if not args.cluster:
        return run(work, None, getattr(args, "dry_run", False), sys.stdout, sys.stderr)
    max_requeues = getattr(args, "max_requeues", None)
    request = Request(
        args.cluster,
        getattr(args, "nodes", None),
        getattr(args, "gpus_per_node", None),
        getattr(args, "partition", None),
        getattr(args, "time", None),
        10 if max_requeues is None else max_requeues,
        profile=getattr(args, "profile", None),
    )
    return run(
        work, request, getattr(args, "dry_run", False), sys.stdout, sys.stderr, getattr(args, "profile_note", "")
    )


def pretrain_experiment(args: argparse.Namespace) -> Path:
    """The experiment file of ``launch pretrain|sweep pretrain METHOD``, once the method and placement are checked."""
    from launcher.experiment import default_experiment
    from launcher.methods import UnknownMethodError, get_method
    from launcher.shipped import find_experiment

    try:
        get_method(args.method)
    except UnknownMethodError as e:
        raise ConfigError(str(e)) from None
    check_placement(args)
    if args.experiment:
        return find_experiment(args.experiment)
    return default_experiment("pretrain", args.method, local=not args.cluster)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from launcher.experiment import load_experiment

    experiment = pretrain_experiment(args)
    cfg = load_experiment(experiment, args.overrides, method=args.method)
    # The embedded default: the local experiment, then the demo's probes of what it learnt.
    demo = args.experiment is None and not args.cluster
    return launch_run(args, cfg, experiment, experiment.stem, demo=demo)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``launch sweep pretrain METHOD --grid ...``: checked whole, then one job array or one run at a time."""
    from launcher import sweeps

    experiment = pretrain_experiment(args)
    grid = sweeps.parse_grid(args.grid, args.max_points)
    sweep = sweeps.Sweep(args.method, str(experiment), list(args.overrides), grid)
    from launcher.work import SweepArrayWork

    return run_work(args, SweepArrayWork(sweep, args.sweep_dir, args.max_parallel))


def cmd_downstream(args: argparse.Namespace) -> int:
    """``launch finetune`` / ``launch linprobe``: a pretrained encoder, then the same run machinery."""
    from launcher import sources
    from launcher.experiment import experiment_from_dict, load_experiment
    from launcher.runs import recorded_method
    from launcher.shipped import find_experiment

    check_placement(args)
    source = sources.resolve_source(args.source, args.command, recorded_method(args.run_dir))
    if source.run_config is not None and source.run_config["method"]["name"] == args.command:
        # SOURCE is itself a fine-tuning/probe run: evaluate it as it was configured.
        if not args.eval_only:
            raise ConfigError(
                f"{args.source} is a {args.command} run, not a pretrained encoder; add --eval-only "
                f"to evaluate it, or pass --run-dir {args.source} with its original command to resume it"
            )
        if args.cluster or args.overrides or args.experiment or args.keep_ratio is not None or args.encoder:
            raise ConfigError(
                "--eval-only of a run uses its recorded config on this machine, keep ratio and encoder "
                "included; drop --cluster, --experiment, --keep-ratio, --encoder and the KEY=VALUE overrides"
            )
        return print_evaluation(experiment_from_dict(source.run_config), args.source)
    if args.eval_only and args.cluster:
        raise ConfigError("--eval-only runs on this machine; drop --cluster and its flags")
    experiment = find_experiment(args.experiment or f"{args.command}/{'vit_base' if args.cluster else 'local'}")
    flags = [
        *([f"method.pretrained_encoder={args.encoder}"] if args.encoder else []),
        *([f"method.keep_ratio={args.keep_ratio}"] if args.keep_ratio is not None else []),
    ]
    # The weights decide the architecture; the user's overrides come last.
    cfg = load_experiment(experiment, [*source.overrides, *flags, *args.overrides], method=args.command)
    if args.eval_only:
        from launcher.runs import check_run_dir, default_run_dir

        run_dir = args.run_dir or default_run_dir(args.command, f"{source.name}-eval")
        check_run_dir(run_dir, cfg)
        if args.dry_run:
            from launcher.work import TrainingWork

            return TrainingWork(cfg, experiment, run_dir, run_dir).print_dry_run(run_dir, False, sys.stdout, sys.stderr)
        return print_evaluation(cfg, run_dir)
    return launch_run(args, cfg, experiment, source.name)


def launch_run(args: argparse.Namespace, cfg, experiment: Path, label: str, demo: bool = False) -> int:
    """Run ``cfg`` here, or as one SLURM job with ``--cluster``; by default in runs/COMMAND-LABEL-TIME."""
    from launcher.runs import default_run_dir
    from launcher.work import TrainingWork

    work = TrainingWork(cfg, experiment, args.run_dir, default_run_dir(args.command, label), demo=demo)
    return run_work(args, work)


def print_evaluation(cfg, run_dir: Path) -> int:
    """Evaluate the newest checkpoint of ``run_dir``, or the model as built when it has none."""
    from launcher import checkpoint
    from launcher.local import evaluate_run
    from launcher.runs import describe_eval

    if checkpoint.latest_valid(run_dir) is None:
        print(f"no checkpoint in {run_dir}: evaluating the model as loaded from {cfg.method.pretrained}", flush=True)
    print(describe_eval(evaluate_run(cfg, run_dir)))
    return 0


# ----------------------------------------------------------------------------- data, bench


def cmd_data(args: argparse.Namespace) -> int:
    if args.dataset == "check":
        return check_images(args.root, args.workers)
    if args.dataset == "shard":
        from launcher.data.shards import write_shards

        total, unreadable = write_shards(
            args.src, args.out, args.max_side, args.quality, args.shard_size, max(1, args.workers)
        )
        print(
            f"{total} samples of {args.src} in shards in {args.out} "
            f"({unreadable} unreadable, kept for training to replace)"
        )
        return 0
    from launcher.data.lunarlander import generate_lunarlander
    from launcher.stopping import STOP_SIGNALS, signals_interrupt

    with signals_interrupt(STOP_SIGNALS):
        out = generate_lunarlander(
            args.out,
            args.frames,
            size=args.size,
            agent=args.agent,
            num_workers=args.workers,
            seed=args.seed,
            max_episode_steps=args.max_episode_steps,
            frame_stride=args.frame_stride,
        )
    print(f"wrote {args.frames} frames to {out}")
    return 0


def check_images(root: Path, workers: int) -> int:
    from launcher.data import DataConfig, open_dataset
    from launcher.data.image_sets import check_image_folder

    open_dataset(DataConfig(name="imagefolder", root=str(root)), 224)  # a clear error for a wrong folder
    total, bad = check_image_folder(root, max(1, workers))
    for path, why in bad:
        print(f"{path}: {why}")
    if not bad:
        print(f"all {total} images of {root} decode")
        return 0
    print(
        f"{len(bad)} of {total} images of {root} cannot be read. Training replaces each by another sample (up to "
        f"data.max_bad_samples, then it stops); remove or repair them to train on what you have."
    )
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    from launcher import bench

    return bench.run(args)


# ----------------------------------------------------------------------------- operating SLURM runs


def cmd_status(args: argparse.Namespace) -> int:
    from launcher.slurm import control
    from launcher.sweeps import is_sweep, summary, table

    if args.run and is_sweep(args.run):  # a sweep: one row per point
        sys.stdout.write(f"sweep {args.run}\n{table(args.run)}")
        return 0
    if args.run and not control.is_run(args.run) and not (args.run / "config.yaml").is_file():  # a folder of runs
        runs = control.find_runs([args.run])
        if not runs:
            raise RunDirError(f"{args.run} is neither a run or sweep directory of this tool nor a folder of runs")
    else:
        runs = [args.run] if args.run else control.find_runs()
    if not runs:
        print("no runs found under ./runs or the profiles' runs_dir (`launch status DIR` looks under DIR)")
    code = 0
    for run in runs:
        try:
            print(summary(run) if is_sweep(run) else control.format_status(control.run_status(run)))
        except UserError as e:  # one damaged run does not hide the others
            if args.run:
                raise
            print(f"{run}: {e}", file=sys.stderr)
            code = 2
    return code


def cmd_resume(args: argparse.Namespace) -> int:
    from launcher.work import ResumeWork

    work = ResumeWork(args.run, args.max_requeues)
    args.cluster = work.record.get("cluster")
    return run_work(args, work)


def cmd_cancel(args: argparse.Namespace) -> int:
    from launcher import local_runs
    from launcher.slurm import control

    if local_runs.is_local_run(args.run):
        print(local_runs.cancel(args.run))
        return 0
    cancelled = control.cancel(args.run)
    print(f"cancelled job(s) {', '.join(cancelled)}" if cancelled else "no active job to cancel")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from launcher.slurm import control

    paths = control.log_paths(args.run, args.rank)
    if args.follow:
        try:
            control.follow(paths, args.run)
        except KeyboardInterrupt:
            pass
        return 0
    if not paths[0].exists():
        raise UserError(f"no log {paths[0]} yet: the run has not started (see `launch status {args.run}`)")
    sys.stdout.write(paths[0].read_text())
    if len(paths) > 1 and paths[1].exists():  # the trainer's own log of this rank (every attempt)
        sys.stdout.write(f"--- {paths[1]} (the trainer's log of rank {args.rank})\n{paths[1].read_text()}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from launcher.shipped import find_experiment
    from launcher.studies import ae_losses

    slurm_flags = slurm_flags_given(args)
    if args.address and (args.cluster or slurm_flags):
        raise ConfigError(
            f"--address runs the sweep on an existing Ray cluster, "
            f"{' '.join(slurm_flags) or '--cluster'} start one in a SLURM job; pass one or the other"
        )
    check_placement(args)
    experiment = find_experiment(args.experiment or "tune/ae_losses")
    sweep = ae_losses.load_sweep(experiment, args.dataset)
    from launcher.work import SweepWork

    return run_work(args, SweepWork(args.study, sweep, experiment, args.storage, args.resume, args.address))


def probe_check(args: argparse.Namespace) -> int:
    """``launch study probe-check``: the demo's probe on inputs whose answer is known."""
    from launcher.data import prepare
    from launcher.demo import load_demo
    from launcher.experiment import load_experiment
    from launcher.shipped import shipped_experiment
    from launcher.studies.probe_check import probe_check as check

    demo = load_demo()
    method = load_experiment(shipped_experiment("pretrain/pcae_local")).method
    prepare(demo.probe.data, method.img_size)
    from launcher.studies.compare import parse_seeds

    for seed in parse_seeds(args.seeds) if args.seeds else (0,):
        check(demo.probe, method, seed, sys.stdout)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    import dataclasses

    from launcher.shipped import find_experiment
    from launcher.studies import compare

    check_placement(args)
    if args.study == "probe-check":
        return probe_check(args)
    if args.study == "compare" and not args.experiment:
        raise ConfigError(
            "launch study compare needs --experiment: a study file naming its contenders "
            "(`launch experiments` lists the shipped ones under study/)"
        )
    experiment = find_experiment(args.experiment or "study/pcae_vs_mae_local")
    cfg = compare.load_study(experiment)
    if args.budget:  # a wall-time budget replaces the file's, and its equal-steps budget if it has one
        cfg = dataclasses.replace(cfg, budget_s=compare.parse_budget(args.budget), steps=0)
    if args.seeds:
        cfg = dataclasses.replace(cfg, seeds=compare.parse_seeds(args.seeds))
    from launcher.work import StudyWork

    work = StudyWork(cfg, experiment, args.study_dir)
    if args.report and not args.cluster:
        from launcher.studies.compare_report import write_report

        print(write_report(args.study_dir or Path("runs/study") / cfg.name).read_text())
        return 0
    return run_work(args, work)


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export import export

    out = export(args.source, args.out, args.encoder)
    print(
        f"wrote {out}/ (model.safetensors, config.json); timm builds and loads it with\n"
        f'  model = timm.create_model("local-dir:{out}", pretrained=True, num_classes=0)\n'
        f"  data_config = timm.data.resolve_data_config({{}}, model=model)"
    )
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from launcher.shipped import experiment_names, experiments_dir

    print(f"shipped experiments ({experiments_dir()}); pass one as --experiment NAME:")
    for name in experiment_names():
        print(f"  {name}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from launcher.slurm import discover, profiles

    if args.action == "init":
        from launcher.slurm.profiles import check_shared

        path = profiles.profile_path_to_write(args.name)
        if path.exists() and not args.force:
            raise ConfigError(f"profile {path} exists; pass --force to overwrite it, or choose another name")
        if args.runs_dir:
            check_shared(Path(args.runs_dir), "--runs-dir")
        runs_dir = args.runs_dir or str(discover.default_runs_dir())  # before SLURM is asked anything
        description = discover.describe_cluster()
        profile = discover.profile_from(description, args.partition, runs_dir)
        text = discover.profile_text(profile, description)
        profiles.write_profile(path, text, args.name)
        print(f"{text}\nwritten to {path}; submit with --cluster {args.name}")
        return 0
    names = [args.name] if args.name else profiles.profile_names()
    for name in names:
        path = profiles.find_profile(name)
        profiles.parse_profile(path)  # a malformed profile is an error here too
        print(f"# {name}: {path}\n{path.read_text()}")
    if discover.slurm_answers():
        print(discover.describe_text(discover.describe_cluster()))
    else:
        print("no SLURM answers on this machine (no working sinfo)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from launcher.sweeps import is_sweep

    if is_sweep(args.sweep):  # a `launch sweep pretrain` grid
        from launcher.sweeps import write_report
    else:  # a Ray Tune sweep of a study
        from launcher.studies.ae_losses_report import write_report

    path = write_report(args.sweep)
    print(path.read_text())
    print(f"written to {path}")
    return 0


COMMANDS = {
    "pretrain": cmd_pretrain,
    "sweep": cmd_sweep,
    "finetune": cmd_downstream,
    "linprobe": cmd_downstream,
    "data": cmd_data,
    "bench": cmd_bench,
    "status": cmd_status,
    "resume": cmd_resume,
    "cancel": cmd_cancel,
    "logs": cmd_logs,
    "tune": cmd_tune,
    "report": cmd_report,
    "study": cmd_study,
    "experiments": cmd_experiments,
    "export": cmd_export,
    "cluster": cmd_cluster,
}

if __name__ == "__main__":
    sys.exit(main())
