"""A sweep's record in MLflow and Prefect: one parent run, each trial's training run as its child,
the best trial and a table of all of them (flows/sweep.py runs the trials)."""
from __future__ import annotations

import json
import logging
import math

import mlflow

from tasks.models import tracking

log = logging.getLogger("forja.sweep")
SWEEP_TAG = "forja.sweep.id"


def open_parent(workdir: str, experiment: str, sweep_id: str, config_path: str, grid: list[str], ranges: list[str],
                metric: str, kind: str = "sweep") -> str:
    """The sweep's parent run: the one an earlier attempt of the same sweep made, or a new one."""
    exp_id = tracking.setup(workdir, experiment)
    client = tracking.client(workdir)
    found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND "
                               "tags.`forja.sweep.role` = 'parent'", max_results=1)
    if found:
        log.info("sweep %s: resuming; parent run %s", sweep_id, found[0].info.run_id)
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{kind}-{sweep_id[:8]}",
                            tags={SWEEP_TAG: sweep_id, "forja.sweep.role": "parent", "forja.config": config_path,
                                  **tracking.prefect_tags()})
    params = {"sweep.metric": metric, **{f"sweep.grid.{g.partition('=')[0]}": g.partition("=")[2] for g in grid},
              **{f"sweep.range.{r.partition('=')[0]}": r.partition("=")[2] for r in ranges}}
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v[:6000])
    return run.info.run_id


def adopt_trial(workdir: str, parent: str, sweep_id: str, index: int, trial: dict, result: dict) -> None:
    """Make a finished trial's training run a child of the parent, with the swept values as params."""
    client = tracking.client(workdir)
    run_id = result["mlflow_run_id"]
    # A run has one parent: a trial shared with an earlier sweep (the same stages) moves under this one,
    # and keeps a tag per sweep it belongs to (search runs by tags.`forja.sweep.<id>`).
    client.set_tag(run_id, "mlflow.parentRunId", parent)
    client.set_tag(run_id, SWEEP_TAG, sweep_id)
    client.set_tag(run_id, f"forja.sweep.{sweep_id}", str(index))
    client.set_tag(run_id, "forja.sweep.trial", str(index))
    have = client.get_run(run_id).data.params
    for k, v in trial.items():
        if f"sweep.{k}" not in have:  # params are write-once; a trial shared by two sweeps has the same value
            client.log_param(run_id, f"sweep.{k}", v)


def score(result: dict, metric: str) -> float:
    value = result.get("metrics", {}).get(metric, result.get(metric))
    return float(value) if value is not None else math.nan


def best_of(results: list[dict], metric: str, direction: str) -> dict | None:
    done = [r for r in results if "error" not in r and math.isfinite(score(r, metric))]
    if not done:
        return None
    return (min if direction == "lower" else max)(done, key=lambda r: score(r, metric))


def table(results: list[dict], metric: str, best: dict | None) -> list[dict]:
    """One row per trial: its values, the metric, its registered version and training run."""
    rows = []
    for r in results:
        row = {"trial": r["trial"], **{k: str(v) for k, v in r["params"].items()}}
        if "error" in r:
            row |= {metric: None, "version": None, "run": None, "best": False, "error": r["error"][:600]}
        else:
            row |= {metric: round(score(r, metric), 5), "version": r["model_version"], "run": r["mlflow_run_id"],
                    "best": best is not None and r["trial"] == best["trial"], "error": None}
        rows.append(row)
    return rows


def markdown(sweep_id: str, rows: list[dict], metric: str) -> str:
    keys = list(rows[0]) if rows else []
    lines = [f"# Sweep {sweep_id}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else ("**yes**" if r[k] is True else str(r[k]).replace("|", "/"))
                               for k in keys) + " |" for r in rows]
    return "\n".join(lines) + f"\n\nBest by {metric}: the row marked yes.\n"


def finish_parent(workdir: str, parent: str, sweep_id: str, results: list[dict], metric: str, direction: str) -> dict:
    """Record the best trial and the table on the parent run and on the Prefect run; the summary."""
    client = tracking.client(workdir)
    best = best_of(results, metric, direction)
    rows = table(results, metric, best)
    md = markdown(sweep_id, rows, metric)
    client.log_text(parent, md, "sweep.md")
    client.log_text(parent, json.dumps(rows, indent=2), "sweep.json")
    if best is not None:
        client.log_metric(parent, f"best_{metric}", score(best, metric))
        for k, v in {"forja.sweep.best_trial": best["trial"], "forja.sweep.best_run_id": best["mlflow_run_id"],
                     "forja.sweep.best_version": best["model_version"]}.items():
            client.set_tag(parent, k, str(v))
    client.set_terminated(parent, "FINISHED" if best is not None else "FAILED")
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(key="sweep-trials", table=rows, description=f"sweep {sweep_id}: one row per trial")
        create_markdown_artifact(key="sweep-report", markdown=md, description=f"sweep {sweep_id}")
    except Exception as e:  # a view, never a failure
        log.warning("could not publish the sweep artifacts: %s", e)
    return {"sweep_id": sweep_id, "parent_run_id": parent, "metric": metric, "direction": direction,
            "best": None if best is None else {"trial": best["trial"], "params": best["params"],
                                               metric: score(best, metric), "model_version": best["model_version"],
                                               "mlflow_run_id": best["mlflow_run_id"]},
            "trials": rows}
