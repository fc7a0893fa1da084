"""The ``launch`` command line.

    launch pretrain pcae                     # the embedded default: this machine, small local experiment
    launch pretrain mae --experiment F.yaml optim.blr=1e-4 data.root=...
    launch pretrain pcae --dry-run           # print the resolved config and run directory only
    launch data lunarlander --frames 20000 --out data/lunarlander-64
    launch bench pretrain

Errors the user can fix are printed as one paragraph, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    pretrain.add_argument("--dry-run", action="store_true", help="print the resolved config and run directory, run nothing")

    data = commands.add_parser("data", help="generate a data set")
    data_kinds = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    lunar = data_kinds.add_parser("lunarlander", help="frames of gymnasium LunarLander-v3 with the lander's state")
    lunar.add_argument("--frames", type=int, required=True, help="number of frames")
    lunar.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    lunar.add_argument("--size", type=int, default=64, help="frame size in pixels, 64 + 16n (default 64)")
    lunar.add_argument("--agent", choices=["random", "heuristic"], default="random")
    lunar.add_argument("--workers", type=int, default=2, help="worker processes")
    lunar.add_argument("--seed", type=int, default=0)

    bench = commands.add_parser("bench", help="benchmarks that print measured ratios")
    bench_kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    bench_pretrain = bench_kinds.add_parser("pretrain", help="PCAE vs MAE training steps, side by side")
    bench_pretrain.add_argument("--sizes", default="small,base", help="comma-separated ViT sizes")
    bench_pretrain.add_argument("--batch-size", type=int, default=None, help="images per step (default per size)")
    bench_pretrain.add_argument("--steps", type=int, default=3, help="timed steps per method and size")
    bench_pretrain.add_argument("--warmup", type=int, default=1, help="untimed steps first")
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


COMMANDS = {"pretrain": cmd_pretrain, "data": cmd_data, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
