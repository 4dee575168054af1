"""`forja ladder`: train a config at several sizes, fit how validation bits per byte falls with
training compute, and predict the next size up.

    forja ladder CONFIG --presets micro,tiny,small [--tokens-per-param 20]

The sizes are a sweep over pretrain.preset (flows/sweep.py: child runs of one MLflow parent,
shared data stages, resumable). By default every size trains the config's max_steps on the same
tokens (matched token budgets); --tokens-per-param R trains each on about R tokens per parameter
instead. The fit (tasks/ladder.py) is a power law bpb = a * FLOPs^-alpha; its plot, its table and
the prediction for the next preset (bits per byte with a 95% interval, and the compute it needs)
go to the parent run and to the Prefect run.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runtime import forward_logs
from flows.sweep import run_sweep
from tasks.config import load_config

log = logging.getLogger("forja.ladder")


def steps_for(preset: str, tokens_per_param: float, cfg) -> int:
    """max_steps that give a preset about tokens_per_param training tokens per parameter."""
    import model.config
    from tasks.ladder import meta_model

    p = cfg.pretrain
    params = meta_model(model.config.from_preset(preset, cfg.tokenize.vocab_size, cfg.tokenize.seq_len)).num_params()
    per_step = p.micro_batch_size * p.grad_accum_steps * p.num_gpus * cfg.tokenize.seq_len
    return max(p.warmup_steps + 1, math.ceil(tokens_per_param * params / per_step))


@flow(name="forja-ladder", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def ladder(config_path: str = "configs/demo.yaml", presets: list[str] | None = None, tokens_per_param: float = 0.0,
           overrides: list[str] | None = None, workdir: str = "", runner: str = "",
           if_busy: Literal["wait", "fail"] = "wait") -> dict:
    """Train the config at each preset, fit bits per byte against compute, predict the next size.

    Args:
        config_path: YAML config in configs/.
        presets: the sizes, at least three (pretrain.preset names), e.g. micro, tiny, small.
        tokens_per_param: > 0: train each size on about this many tokens per parameter; 0: every size
            trains pretrain.max_steps on the same tokens.
        overrides: `section.key=value` for every size.
        workdir: the work directory shared by the sizes.
        runner: where the data stages' units run (as forja run).
        if_busy: when another run holds the work directory: `wait` for it, or `fail` at once.
    """
    from tasks import ladder as fit_ladder

    forward_logs()
    presets = list(presets or ["micro", "tiny", "small"])
    fit_ladder.check_presets(presets)  # fewer than three sizes: said before anything trains
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    trials = [{"pretrain.preset": p, **({"pretrain.max_steps": steps_for(p, tokens_per_param, cfg)}
                                        if tokens_per_param > 0 else {})} for p in presets]
    summary, results = run_sweep(config_path, trials, overrides, "val_bits_per_byte", "lower", workdir, runner, 1,
                                 if_busy, grid=[f"pretrain.preset={','.join(presets)}"], kind="ladder")
    rungs = rungs_of(results)
    law = fit_ladder.fit(rungs)  # the sizes that trained; fewer than three: LadderError says so
    plan = fit_ladder.next_rung(rungs, vocab_size=results[0]["training"]["model"]["vocab_size"],
                                seq_len=results[0]["training"]["model"]["block_size"])
    report = record(summary["parent_run_id"], summary["sweep_id"], rungs, law, plan,
                    str(Path(results[0]["workdir"])))
    return {**summary, **report}


def rungs_of(results: list[dict]):
    """The ladder's points from the trials that trained: size, tokens, compute, bits per byte."""
    import model.config
    from tasks.ladder import Rung, training_flops

    rungs = []
    for r in results:
        if "error" in r:
            continue
        t = r["training"]
        flops = training_flops(model.config.ModelConfig(**t["model"]), t["tokens"])
        rungs.append(Rung(r["params"]["pretrain.preset"], int(t["params"]), int(t["tokens"]), flops,
                          float(r["val_bits_per_byte"])))
    return rungs


def record(parent: str, ladder_id: str, rungs, law, plan, workdir: str) -> dict:
    """The fit, its plot and table, and the prediction on the ladder's parent run and the Prefect run."""
    from tasks import ladder as fit_ladder
    from tasks.models import tracking

    md = fit_ladder.report_markdown(rungs, law, plan)
    fit = {"a": law.a, "alpha": law.alpha, "se_alpha": law.se_alpha, "r2": law.r2, "residuals": law.residuals,
           "rungs": [asdict(r) for r in rungs], "next": None if plan is None else {
               "preset": plan.name, "params": plan.params, "tokens": plan.tokens, "flops": plan.flops,
               "bpb": plan.prediction.bpb, "bpb_low": plan.prediction.low, "bpb_high": plan.prediction.high}}
    client = tracking.client(workdir)
    with tempfile.TemporaryDirectory() as tmp:
        png = fit_ladder.plot(rungs, law, plan, Path(tmp) / "ladder.png")
        client.log_artifact(parent, str(png))
    client.log_text(parent, md, "ladder.md")
    client.log_text(parent, json.dumps(fit, indent=2), "ladder.json")
    metrics = {"ladder.alpha": law.alpha, "ladder.se_alpha": law.se_alpha, "ladder.r2": law.r2}
    if plan is not None:
        metrics |= {"next.bpb": plan.prediction.bpb, "next.bpb_low": plan.prediction.low,
                    "next.bpb_high": plan.prediction.high, "next.flops": plan.flops}
        client.set_tag(parent, "forja.ladder.next_preset", plan.name)
    for k, v in metrics.items():
        if math.isfinite(v):
            client.log_metric(parent, k, v)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="ladder-report", markdown=md, description=f"scaling ladder {ladder_id}")
    except Exception as e:  # a view, never a failure
        log.warning("could not publish the ladder report: %s", e)
    log.info("ladder %s: bpb = %.3g * FLOPs^-%.3f (R^2 %.3f)%s", ladder_id, law.a, law.alpha, law.r2,
             "" if plan is None else f"; {plan.name} predicted {plan.prediction.bpb:.3f} bpb "
             f"[{plan.prediction.low:.3f}, {plan.prediction.high:.3f}] at {plan.flops:.3g} FLOPs")
    return {"fit": fit, "report": md}
