"""The `forja` command line.

    forja run CONFIG.yaml [--set section.key=value ...] [--workdir DIR]

Environment is settled before Prefect is imported: its home, results and the
telemetry switches are read once, at import.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

QUIET = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def prepare_env(workdir: Path) -> None:
    """Defaults that keep a run's Prefect, MLflow and compiled-op state in known places."""
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)
    if "PREFECT_API_URL" not in os.environ:  # the ephemeral API keeps its database in the workdir
        os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(workdir / "prefect" / "results"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "forja")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "forja" / "torch_extensions"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forja", description="Train your own language model: crawl, dedupe, normalize, tokenize, "
        "pretrain, evaluate and register, as one cached Prefect flow.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline on a config file",
                         description="Run the pipeline flow on CONFIG. Finished stages are reused from the work "
                         "directory; changing a stage's settings reruns it and the stages after it.")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value (repeatable), e.g. --set dedupe.threshold=0.9")
    run.add_argument("--workdir", default=None,
                     help="where stage folders, MLflow and Prefect data go (default: $FORJA_WORKDIR or ./work)")
    return p


def report(result: dict, seconds: float) -> None:
    from rich.console import Console

    c = Console()
    wd = result["workdir"]
    c.rule("[bold]forja: done")
    c.print(f"validation perplexity  [bold]{result['val_perplexity']:.2f}[/]  "
            f"({result['val_bits_per_byte']:.3f} bits/byte)")
    sample = result["sample"]
    c.print(f"sample  [italic]{sample['prompt']}[/]{sample['text']}", highlight=False)
    status = "champion" if result["promoted"] else "candidate (champion unchanged)"
    c.print(f"model   [bold]{result['model_uri']}[/]  version {result['model_version']}, {status}")
    c.print(f"stages  {wd}/artifacts/<stage>/<key>/   ({seconds:.0f} s)")
    c.print("\nLook at this run:")
    if "PREFECT_API_URL" not in os.environ:
        c.print(f"  Prefect UI:  PREFECT_HOME={wd}/prefect .venv/bin/prefect server start   -> http://127.0.0.1:4200")
    c.print(f"  MLflow UI:   .venv/bin/mlflow server --backend-store-uri sqlite:///{wd}/mlflow.db "
            "--workers 1 --port 5000   -> http://127.0.0.1:5000")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workdir = Path(args.workdir or os.environ.get("FORJA_WORKDIR", "work")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_env(workdir)

    from tasks.config import ConfigError, load_config

    try:
        load_config(args.config, args.overrides)  # fail fast, before Prefect starts
    except ConfigError as e:
        print(f"forja: {e}", file=sys.stderr)
        return 2
    from flows.pipeline import pipeline

    t0 = time.time()
    result = pipeline(config_path=args.config, overrides=args.overrides, workdir=str(workdir))
    report(result, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
