"""`forja sweep`: one config trained many ways, compared in MLflow.

    forja sweep CONFIG --grid pretrain.lr=1e-3,3e-3,1e-2 --grid pretrain.preset=micro,tiny
    forja sweep CONFIG --random 8 --range pretrain.lr=1e-4:1e-2:log --grid pretrain.preset=micro,tiny

The `forja-sweep` flow runs each trial (one set of overrides) as a child flow run `forja-trial`
of the same stages as `forja run`, so trials share every stage they have in common through the
stage cache: a learning-rate sweep crawls and tokenizes once. In MLflow each trial's training run
becomes a child of one parent run (tag mlflow.parentRunId), with the swept values as `sweep.*`
params beside its metrics, so the UI's compare view shows the sweep; the parent records the best
trial by the chosen metric and a table. The sweep is named by what it runs: run again after a
kill, it finds its parent run and its finished trials are cache hits.

Trials run one after another by default; `--parallel N` runs N at once (their data stages are
built first, one after another, so that concurrent trials never build the same folder twice).
Every trial is checked before the first one starts: its config (a key that does not exist names
the valid ones) and whether its model fits in memory (N at once must fit together).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Literal

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import build_corpus, build_model, default_workdir, tokenizer_base
from flows.runners import resolve
from flows.runtime import forward_logs, workdir_lock
from model.faults import fault_point
from tasks.config import ConfigError, ForjaConfig, load_config, parse_value

log = logging.getLogger("forja.sweep")
SCORES = ("val_loss", "val_perplexity", "val_bits_per_byte")  # the held-out metrics every evaluation has


class SweepError(ConfigError):
    """A sweep that cannot run as asked; the message says what to change."""


# -- what to run ---------------------------------------------------------------------------------

def parse_grid(specs: list[str]) -> dict[str, list]:
    """`--grid section.key=v1,v2,...` options as {key: [values]} (each value parsed as YAML)."""
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        values = [parse_value(v) for v in raw.split(",") if v.strip()] if sep else []
        if not key.strip() or "." not in key or not values:
            raise SweepError(f"--grid {spec!r}: expected section.key=VALUE,VALUE,... e.g. pretrain.lr=1e-3,3e-3")
        grid[key.strip()] = values
    return grid


def parse_ranges(specs: list[str]) -> dict[str, tuple[float, float, bool]]:
    """`--range section.key=LOW:HIGH[:log]` options as {key: (low, high, log scale)}."""
    ranges = {}
    for spec in specs:
        key, _, raw = spec.partition("=")
        parts = raw.split(":")
        try:
            low, high = float(parts[0]), float(parts[1])
            scale = parts[2] if len(parts) > 2 else "linear"
        except (ValueError, IndexError):
            raise SweepError(f"--range {spec!r}: expected section.key=LOW:HIGH or LOW:HIGH:log, "
                             "e.g. pretrain.lr=1e-4:1e-2:log") from None
        if scale not in ("linear", "log") or not low < high or (scale == "log" and low <= 0) or "." not in key:
            raise SweepError(f"--range {spec!r}: LOW must be below HIGH (and above 0 on a log scale); the scale is "
                             "linear or log")
        ints = parts[0].lstrip("-").isdigit() and parts[1].lstrip("-").isdigit()
        ranges[key.strip()] = (int(low) if ints else low, int(high) if ints else high, scale == "log")
    return ranges


def expand(grid: dict[str, list], ranges: dict[str, tuple], samples: int = 0, seed: int = 0) -> list[dict]:
    """The trials: every combination of the grid; or, with samples > 0, that many random draws
    (each grid key picks one of its values, each range key a value in its range), seeded and
    without repeats."""
    if ranges and not samples:
        raise SweepError("--range needs --random N: a range has no finite grid of values")
    if not samples:
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else []
    rng, trials, seen = random.Random(seed), [], set()
    for _ in range(samples * 20):
        t = {k: rng.choice(v) for k, v in grid.items()}
        for k, (low, high, log_scale) in ranges.items():
            if isinstance(low, int):
                t[k] = rng.randint(low, high)
            else:
                x = math.exp(rng.uniform(math.log(low), math.log(high))) if log_scale else rng.uniform(low, high)
                t[k] = float(f"{x:.4g}")
        if (frozen := json.dumps(t, sort_keys=True)) not in seen:
            seen.add(frozen)
            trials.append(t)
        if len(trials) == samples:
            break
    return trials


def overrides_of(trial: dict) -> list[str]:
    """A trial as `--set` overrides (values written as YAML flow scalars)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in trial.items()]


def label(trial: dict) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in trial.items()) or "base"


def check_trials(config_path: str, overrides: list[str], trials: list[dict], parallel: int = 1) -> list[ForjaConfig]:
    """Every trial's config, validated, and its model checked against the memory there is (with
    `parallel` trials at once, each gets that share); a SweepError names the trial that fails."""
    if not trials:
        raise SweepError("nothing to sweep: give at least one --grid section.key=V1,V2 (or --random N with --grid "
                         "or --range)")
    configs = []
    for i, t in enumerate(trials, 1):
        try:
            configs.append(load_config(config_path, [*overrides, *overrides_of(t)]))
        except ConfigError as e:
            raise SweepError(f"trial {i} ({label(t)}): {e}") from None
    for i, (t, cfg) in enumerate(zip(trials, configs), 1):
        if problem := memory_problem(cfg, parallel):
            raise SweepError(f"trial {i} ({label(t)}) would not fit: {problem}. Nothing was run; drop it from the "
                             "sweep" + (", lower --parallel" if parallel > 1 else "") + ", or lower "
                             "pretrain.micro_batch_size")
    return configs


def memory_problem(cfg: ForjaConfig, parallel: int = 1) -> str | None:
    """Why this config's training would not fit in this machine's memory (as pretrain checks
    before training, model.monitor.memory_estimate), or None."""
    import model.config
    from model import monitor
    from model.train import TrainSpec, device_and_dtype, memory_estimate

    p = cfg.pretrain
    mcfg = model.config.from_preset(p.preset, cfg.tokenize.vocab_size, cfg.tokenize.seq_len,
                                    **{k: getattr(p, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd")})
    device, dtype = device_and_dtype(p.precision)
    shape = TrainSpec(model={}, train_files=[], val_files=[], tokenizer="", out_dir="", checkpoint_dir="",
                      micro_batch_size=p.micro_batch_size, zero_stage=p.zero_stage, optimizer=p.optimizer,
                      precision=p.precision)
    est = memory_estimate(mcfg, shape, dtype, p.num_gpus)  # the estimate training checks (Muon's one buffer too)
    ranks_here = 1 if device == "cuda" else p.num_gpus  # CPU ranks share this machine's memory
    need, have = est["total_bytes"] * ranks_here * parallel, 0.9 * monitor.device_memory(device)
    if need <= have:
        return None
    gib = 2**30
    return (f"{p.preset} ({est['params'] / 1e6:.0f}M parameters, micro-batch {p.micro_batch_size}) needs about "
            f"{est['total_bytes'] / gib:.1f} GiB per rank" + (f", {need / gib:.1f} GiB for {parallel} trials at once"
                                                            if parallel > 1 else "")
            + f", and {have / gib:.1f} GiB of {device} memory is available")


def sweep_id(config_path: str, overrides: list[str], trials: list[dict], metric: str) -> str:
    """What names a sweep: its config's content, the fixed overrides, the trials and the metric."""
    blob = json.dumps({"config": Path(config_path).read_text(), "overrides": overrides, "trials": trials,
                       "metric": metric}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_metric(metric: str, cfg: ForjaConfig) -> None:
    suites = {s.name for s in cfg.evaluate.suites}
    if metric in SCORES or metric.split(".")[0] in suites:
        return
    raise SweepError(f"--metric {metric!r} is not a metric the evaluation gives; use one of {', '.join(SCORES)} or "
                     f"SUITE.metric for a suite of evaluate.suites ({', '.join(sorted(suites)) or 'none configured'})")


# -- running it ----------------------------------------------------------------------------------

@flow(name="forja-trial", log_prints=True)
def trial(config_path: str, overrides: list[str], workdir: str, runner: str = "") -> dict:
    """One trial of a sweep: the pipeline's stages for the config with its overrides, in a work
    directory the sweep holds."""
    forward_logs()
    started = time.time()
    return build_model(load_config(config_path, overrides), workdir, runner or None, started)


def start_trial(index: int, config_path: str, overrides: list[str], workdir: str, runner: str, name: str) -> dict:
    """A trial as a child flow run of the sweep, named by its values."""
    return trial.with_options(flow_run_name=f"trial-{index}: {name}")(config_path, overrides, workdir, runner)


@task(name="run-trial", cache_policy=NO_CACHE)
def run_trial(index: int, config_path: str, overrides: list[str], workdir: str, runner: str, name: str) -> dict:
    """A trial in a task, so that the flow's task runner can run several at once (--parallel)."""
    return start_trial(index, config_path, overrides, workdir, runner, name)


@flow(name="forja-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def sweep(config_path: str = "configs/demo.yaml", grid: list[str] | None = None, ranges: list[str] | None = None,
          random_trials: int = 0, seed: int = 0, metric: str = "val_bits_per_byte",
          direction: Literal["lower", "higher"] = "lower", overrides: list[str] | None = None, workdir: str = "",
          runner: str = "", parallel: int = 1, if_busy: Literal["wait", "fail"] = "wait") -> dict:
    """Train one config many ways and compare the trials in MLflow (see the module's docstring).

    Args:
        config_path: YAML config in configs/.
        grid: `section.key=V1,V2,...`, one per swept key; every combination is a trial.
        ranges: `section.key=LOW:HIGH[:log]`, sampled with random_trials.
        random_trials: > 0: that many random trials over grid and ranges instead of every combination.
        seed: the random trials' seed.
        metric: the evaluation metric the best trial is chosen by (val_bits_per_byte, or SUITE.metric).
        direction: whether lower or higher is better.
        overrides: `section.key=value` for every trial.
        workdir: the work directory (stage folders, checkpoints, MLflow): shared by the trials.
        runner: where the data stages' units run (as forja run).
        parallel: trials at once.
        if_busy: when another run holds the work directory: `wait` for it, or `fail` at once.
    """
    forward_logs()
    trials = expand(parse_grid(grid or []), parse_ranges(ranges or []), random_trials, seed)
    summary, _ = run_sweep(config_path, trials, list(overrides or []), metric, direction, workdir, runner, parallel,
                           if_busy, grid or [], ranges or [])
    return summary


def run_sweep(config_path: str, trials: list[dict], overrides: list[str], metric: str, direction: str, workdir: str,
              runner: str, parallel: int, if_busy: str, grid: list[str] = (), ranges: list[str] = (),
              kind: str = "sweep") -> tuple[dict, list[dict]]:
    """Check every trial, then run them as child flow runs under one MLflow parent run (found again
    when the same sweep reruns); the summary and each trial's result."""
    configs = check_trials(config_path, overrides, trials, max(1, parallel))  # before anything runs
    check_metric(metric, configs[0])
    resolve(runner or None)
    wd = os.path.abspath(workdir or default_workdir())
    sid = sweep_id(config_path, overrides, trials, metric)
    with workdir_lock(wd, if_busy):
        from tasks.sweeps import adopt_trial, finish_parent, open_parent

        parent = open_parent(wd, configs[0].register.experiment, sid, config_path, list(grid), list(ranges), metric,
                             kind)
        log.info("%s %s: %d trials, parent MLflow run %s", kind, sid, len(trials), parent)
        if parallel > 1:  # build each trial's data once, one after another: concurrent trials then share it
            for cfg in configs:
                build_corpus(cfg, wd, runner or None, tokenizer_base(cfg, wd))
        results = []
        for start in range(0, len(trials), max(1, parallel)):
            wave = range(start, min(len(trials), start + max(1, parallel)))
            args = {i: (i + 1, config_path, [*overrides, *overrides_of(trials[i])], wd, runner, label(trials[i]))
                    for i in wave}
            # One at a time in this thread, where the stages' timeouts can interrupt them; several at once
            # in the task runner's threads, where a timeout only acts once the blocking call returns.
            futures = {i: run_trial.submit(*args[i]) for i in wave} if parallel > 1 else {}
            for i in wave:
                try:
                    result = futures[i].result() if futures else start_trial(*args[i])
                except Exception as e:  # a diverging learning rate is a result too: the others go on
                    log.warning("%s %s: trial %d (%s) failed: %s", kind, sid, i + 1, label(trials[i]), e)
                    results.append({"trial": i + 1, "params": trials[i], "error": f"{type(e).__name__}: {e}"})
                    continue
                adopt_trial(wd, parent, sid, i + 1, trials[i], result)
                results.append({"trial": i + 1, "params": trials[i], **result})
                fault_point("sweep:trial-done")
        summary = finish_parent(wd, parent, sid, results, metric, direction)
    if summary["best"] is None:
        raise RuntimeError(f"{kind} {sid}: every trial failed; the first said: {results[0].get('error')}")
    return summary, results
