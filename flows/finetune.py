"""The fine-tuning flow: a registered version + conversations -> a registered, gated fine-tune.

    forja finetune CONFIG.yaml      (the config's finetune section; MLflow experiment of register)
"""
from __future__ import annotations

import logging
import os
import time
from typing import Literal

from prefect import flow

from flows.runtime import forward_logs, link_mlflow_run, with_policy, workdir_lock
from tasks.config import ConfigError, RegisterConfig, load_config
from tasks.evaluate import suite_digests
from tasks.finetune import base_digests, compare, finetune_train, sft_data
from tasks.register import register

logging.getLogger("forja").setLevel(logging.INFO)  # stage progress into the Prefect run's log (flows.runtime)


@flow(name="forja-finetune", log_prints=True)
def finetune(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
             workdir: str = "", if_busy: Literal["wait", "fail"] = "wait") -> dict:
    """Fine-tune finetune.base_model on finetune.data, score it against its base, register it.

    Args:
        config_path: YAML config with a finetune section (relative to the repository root).
        overrides: config values to change for this run, one `section.key=value` each,
            e.g. `finetune.training.max_steps=300` or `finetune.lora.rank=8`.
        workdir: where stage folders and checkpoints go; empty: $FORJA_WORKDIR, else ./work.
        if_busy: when another run holds the work directory: `wait` for it, or `fail` at once.
    """
    forward_logs()
    started = time.time()
    cfg = load_config(config_path, overrides or [])
    if cfg.finetune is None:
        raise ConfigError(f"{config_path} has no finetune section (base_model, data, ...)")
    ft = cfg.finetune
    wd = os.path.abspath(workdir or os.environ.get("FORJA_WORKDIR") or "work")
    with workdir_lock(wd, if_busy):
        base_sha, data_sha = base_digests(ft, wd)
        data = with_policy(sft_data)(ft, wd, base_sha, data_sha)
        trained = with_policy(finetune_train)(ft, data, wd, cfg.register.experiment)
        link_mlflow_run(trained.stats["mlflow_run_id"], wd, "MLflow fine-tuning run")
        scored = with_policy(compare)(ft, data, trained, wd, suite_digests(list(ft.suites)), device=cfg.device)
        gate = RegisterConfig(model_name=ft.model_name, experiment=cfg.register.experiment,
                              gate_metric=ft.gate_metric, gate_direction=ft.gate_direction, gate_margin=ft.gate_margin)
        registered = with_policy(register)(gate, trained, scored, {m.stage: m.key for m in (data, trained, scored)},
                                           wd, {"forja.parent": data.stats["base_model"],
                                                "forja.parent_uri": ft.base_model}, device=cfg.device,
                                           run_started=started)
    return {
        "workdir": wd, "base_model": data.stats["base_model"], "comparison": scored.stats["comparison"],
        "model_uri": registered.stats["model_uri"], "model_version": registered.stats["version"],
        "promoted": registered.stats["promoted"], "stages": {m.stage: m.folder for m in (data, trained, scored)},
    }
