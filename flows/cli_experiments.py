"""`forja sweep` and `forja ladder`: the experiment commands of the command line (flows/cli.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    sw = sub.add_parser(
        "sweep", help="train a config many ways (a grid or random trials) and compare the trials in MLflow",
        description="Run the sweep flow: each trial is a child flow run of the pipeline's stages with its "
        "overrides, sharing every stage the trials have in common; in MLflow each trial's training run is a child "
        "of one parent run that records the best. Run it again after a kill: finished trials are cache hits.")
    sw.add_argument("config")
    sw.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                    help="values of one key (repeatable); every combination is a trial")
    sw.add_argument("--random", type=int, default=0, metavar="N",
                    help="N random trials over the --grid values and --range ranges instead of every combination")
    sw.add_argument("--range", dest="ranges", action="append", default=[], metavar="SECTION.KEY=LOW:HIGH[:log]",
                    help="a range sampled by --random (log: log-uniform, for learning rates)")
    sw.add_argument("--seed", type=int, default=0, help="the random trials' seed")
    sw.add_argument("--metric", default="val_bits_per_byte",
                    help="the evaluation metric choosing the best trial (val_bits_per_byte, val_loss, or SUITE.metric)")
    sw.add_argument("--direction", choices=["lower", "higher"], default="lower", help="which values of --metric are better")
    sw.add_argument("--parallel", type=int, default=1, metavar="N", help="trials at once (default 1: one after another)")
    ld = sub.add_parser(
        "ladder", help="train a config at several sizes and predict the next size's loss and compute",
        description="Run the ladder flow: one trial per preset (as forja sweep), then a power-law fit of validation "
        "bits per byte against training FLOPs, its plot and the next preset's predicted bits per byte (with a 95%% "
        "interval) and compute, in MLflow and the Prefect run.")
    ld.add_argument("config")
    ld.add_argument("--presets", default="micro,tiny,small", help="the sizes, at least three (default micro,tiny,small)")
    ld.add_argument("--tokens-per-param", type=float, default=0.0, metavar="R",
                    help="train each size on about R tokens per parameter (default: the config's max_steps for all)")
    for cmd in (sw, ld):
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value for every trial")
        cmd.add_argument("--workdir", default=None)
        cmd.add_argument("--runner", default=None, metavar="R", help="where the data stages' units run (as forja run)")
        cmd.add_argument("--wait", action="store_true", help="wait for a run holding the work directory")


def check(args) -> None:
    """Everything that can be refused before Prefect starts: the trials' configs and memory, the metric,
    the ladder's sizes. Raises ValueError (ConfigError, SweepError, LadderError) with the reason."""
    from flows import sweep

    if args.command == "ladder":
        from tasks.ladder import check_presets

        check_presets(presets(args))
        trials = [{"pretrain.preset": p} for p in presets(args)]
    else:
        trials = sweep.expand(sweep.parse_grid(args.grid), sweep.parse_ranges(args.ranges), args.random, args.seed)
    configs = sweep.check_trials(args.config, args.overrides, trials, max(1, getattr(args, "parallel", 1)))
    sweep.check_metric(getattr(args, "metric", "val_bits_per_byte"), configs[0])


def presets(args) -> list[str]:
    return [p.strip() for p in args.presets.split(",") if p.strip()]


def command(args, workdir: Path) -> int:
    """forja sweep / forja ladder: checked before Prefect starts, then run; 2 on a refusal."""
    from flows.runtime import WorkdirBusy

    try:
        check(args)
    except ValueError as e:
        print(f"forja: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, workdir, "wait" if args.wait else "fail")
    except WorkdirBusy as e:
        print(f"forja: {e} (or pass --wait)", file=sys.stderr)
        return 2


def run(args, workdir: Path, busy: str) -> int:
    """Run the sweep or ladder flow and print its table (and the fit); the last line is JSON."""
    import json

    t0 = time.time()
    if args.command == "sweep":
        from flows.sweep import sweep

        result = sweep(config_path=args.config, grid=args.grid, ranges=args.ranges, random_trials=args.random,
                       seed=args.seed, metric=args.metric, direction=args.direction, overrides=args.overrides,
                       workdir=str(workdir), runner=args.runner or "", parallel=args.parallel, if_busy=busy)
    else:
        from flows.ladder import ladder

        result = ladder(config_path=args.config, presets=presets(args), tokens_per_param=args.tokens_per_param,
                        overrides=args.overrides, workdir=str(workdir), runner=args.runner or "", if_busy=busy)
    show(result, time.time() - t0)
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, default=str))
    return 0


def show(result: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(file=sys.stderr)
    rows = result["trials"]
    table = Table(*(rows[0].keys() if rows else []), title=f"sweep {result['sweep_id']} ({seconds:.0f} s)")
    for r in rows:
        table.add_row(*("" if v is None else ("best" if v is True else "" if v is False else str(v)) for v in r.values()))
    c.print(table)
    if result.get("best"):
        b = result["best"]
        c.print(f"best: trial {b['trial']} {b['params']}  {result['metric']} {b[result['metric']]:.4f}  version "
                f"{b['model_version']}  (MLflow parent run {result['parent_run_id']})")
    if nxt := (result.get("fit") or {}).get("next"):
        fit = result["fit"]
        c.print(f"fit: bpb = {fit['a']:.3g} x FLOPs^-{fit['alpha']:.3f} (± {fit['se_alpha']:.3f}, R² {fit['r2']:.3f})")
        c.print(f"next: {nxt['preset']} ({nxt['params'] / 1e6:.1f}M parameters, {nxt['tokens']:,} tokens, "
                f"{nxt['flops']:.3g} FLOPs) -> predicted {nxt['bpb']:.3f} bits/byte [{nxt['bpb_low']:.3f}, "
                f"{nxt['bpb_high']:.3f}]")

