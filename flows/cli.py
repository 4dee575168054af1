"""The `forja` command line.

    forja run CONFIG.yaml [--set section.key=value ...] [--workdir DIR] [--runner R]
    forja data CONFIG.yaml [--set ...] [--workdir DIR] [--runner R]  crawl..tokenize only; JSON summary
    forja finetune CONFIG.yaml [--set ...] [--workdir DIR]  fine-tune finetune.base_model on finetune.data
    forja batch models:/NAME@ALIAS INPUT OUTPUT_DIR   prompts (Parquet/JSONL) -> Parquet shards, resumable
    forja evaluate models:/NAME@ALIAS CONFIG.yaml     the config's evaluate suites; JSON last line
    forja promote NAME VERSION                        move the champion alias to VERSION
    forja rollback NAME                               move it back to the champion before
    forja models NAME                                 versions, aliases and metrics
    forja history NAME                                every move of champion, whoever made it
    forja export models:/NAME@ALIAS OUT_DIR [--force] the Hugging Face (Llama) form of a version
    forja sweep CONFIG.yaml --grid KEY=V1,V2 ...     trials as child runs, compared in MLflow (flows/sweep.py)
    forja ladder CONFIG.yaml --presets A,B,C          sizes -> a power-law fit and the next size's prediction

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


def config_command(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that runs a flow on CONFIG: --set overrides, --workdir, --wait."""
    cmd = sub.add_parser(name, help=help, description=description)
    cmd.add_argument("config")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    cmd.add_argument("--workdir", default=None)
    cmd.add_argument("--wait", action="store_true", help="wait for a run holding the work directory")
    return cmd


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
    run.add_argument("--wait", action="store_true",
                     help="if another run holds the work directory, wait for it (default: fail at once, naming it)")
    dt = sub.add_parser("data", help="build the corpus and token shards only (crawl, dedupe, normalize, tokenize)",
                        description="Run the data flow on CONFIG: the pipeline's first four stages, cached in the "
                        "same stage folders. The last line printed is a JSON summary (each stage's key, folder "
                        "and counts).")
    dt.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    dt.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    dt.add_argument("--workdir", default=None)
    dt.add_argument("--wait", action="store_true", help="wait for a run holding the work directory")
    for cmd in (run, dt):
        cmd.add_argument("--runner", default=None, metavar="R",
                         help="where the data stages' units of work run: local (processes on this machine, the "
                         "default), dask (a Dask cluster on this machine for this run) or tcp://HOST:PORT (an "
                         "existing Dask scheduler); default $FORJA_RUNNER, else local")
    from flows import cli_experiments

    cli_experiments.add_parsers(sub)
    config_command(sub, "finetune", "fine-tune a registered model on conversations (the config's finetune section)",
                   "Run the fine-tuning flow: finetune.base_model on finetune.data through the chat template, then "
                   "its suites before and after, then register and gate the result.")
    config_command(sub, "feedback", "fine-tune the served model on its users' rated answers (weekly)",
                   "Run the feedback flow: the consented feedback since the last snapshot (decontaminated against "
                   "the suites), a fine-tune of feedback.alias of the chat model on it plus finetune.data, its suites "
                   "and held-out feedback before and after, register and gate. Skips, saying so, below "
                   "feedback.min_records new conversations.")
    sv = sub.add_parser("serve", help="serve a registered model: OpenAI-compatible API, chat page, feedback",
                        description="Serve MODEL_URI over HTTP: /v1/chat/completions, /v1/completions (stream: "
                        "true for server-sent events), /v1/models, /v1/feedback, and a chat page at /. An @ALIAS "
                        "is followed: when it moves in the registry the new version answers without a restart.")
    sv.add_argument("model_uri", nargs="?", default=None,
                    help="models:/NAME@ALIAS or models:/NAME/VERSION (default: serve.model_uri of the config, "
                    "models:/forja-demo-faq@champion)")
    sv.add_argument("--config", default="configs/demo.yaml", help="the config whose serve section applies")
    sv.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="e.g. --set serve.max_batch=16 --set serve.feedback_db=postgresql+psycopg2://...")
    sv.add_argument("--host", default=None, help="address to listen on (default serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000; 0: a free one)")
    sv.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's device)")
    sv.add_argument("--workdir", default=None)
    bt = sub.add_parser("batch", help="generate for a file of prompts into Parquet shards (resumable)",
                        description="Batch inference with a registered version: INPUT is Parquet (a 'prompt' column) "
                        "or JSONL ({'prompt': ...} a line); OUTPUT_DIR gets part-NNNNN.parquet shards (row, prompt, "
                        "output). A rerun skips finished shards.")
    bt.add_argument("model_uri")
    bt.add_argument("input")
    bt.add_argument("output_dir")
    bt.add_argument("--shard-size", type=int, default=256)
    bt.add_argument("--batch-size", type=int, default=8)
    bt.add_argument("--max-new-tokens", type=int, default=64)
    bt.add_argument("--temperature", type=float, default=0.0)
    bt.add_argument("--top-k", type=int, default=50)
    bt.add_argument("--top-p", type=float, default=1.0)
    bt.add_argument("--seed", type=int, default=0)
    bt.add_argument("--chat", action="store_true", help="each prompt is a user message in the chat template")
    bt.add_argument("--fresh", action="store_true", help="discard OUTPUT_DIR's shards of a previous job (another "
                    "model version, sampling or input) and start over; without it such a rerun is refused")
    bt.add_argument("--device", default="auto", help="auto (CUDA in bf16 when present, else the CPU), cpu, "
                                                     "cuda or cuda:N")
    bt.add_argument("--workdir", default=None)
    ev = sub.add_parser("evaluate", help="score a registered model version on a config's evaluation suites",
                        description="Download MODEL_URI (its weights' sha256 checked), run CONFIG's evaluate.suites "
                        "on it, record the metrics on the model version and print them; the last line is one JSON "
                        "object.")
    ev.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ev.add_argument("config")
    ev.add_argument("--workdir", default=None)
    ev.add_argument("--no-record", action="store_true", help="do not write the metrics to the model version")
    pr = sub.add_parser("promote", help="move the champion alias to a version (the previous one is remembered)")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--workdir", default=None)
    rb = sub.add_parser("rollback", help="move the champion alias back to the version it was on before")
    rb.add_argument("name")
    rb.add_argument("--workdir", default=None)
    ls = sub.add_parser("models", help="a registered model's versions, aliases and metrics")
    ls.add_argument("name")
    ls.add_argument("--workdir", default=None)
    hi = sub.add_parser("history", help="every move of the champion alias (forja's and by hand), oldest first",
                        description="One JSON line per move of champion: the version, who moved it (the gate, "
                        "forja promote/rollback, or by hand in the MLflow UI or API) and when; `forja rollback` "
                        "walks back through it.")
    hi.add_argument("name")
    hi.add_argument("--workdir", default=None)
    ex = sub.add_parser("export", help="write a registered version in the Hugging Face format (Llama layout)")
    ex.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ex.add_argument("out", help="output folder: new, empty, or a previous export (with --force); "
                    "a folder holding anything else is refused, never deleted")
    ex.add_argument("--force", action="store_true", help="replace a previous forja export in OUT")
    ex.add_argument("--workdir", default=None)
    return p


def registry_command(args, workdir: Path) -> int:
    """evaluate / promote / rollback / models / history: the registry from the command line.
    Writes hold the model's registry lock, so they queue behind a gate in progress."""
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    from tasks.models import registry, tracking

    client = tracking.client(workdir)
    try:
        if args.command == "evaluate":
            from tasks.config import ConfigError, load_config
            from tasks.evaluate import evaluate_model, suite_digests

            try:
                full = load_config(args.config, [])
                cfg = full.evaluate
            except ConfigError as e:
                print(f"forja: {e}", file=sys.stderr)
                return 2
            if not cfg.suites:
                print(f"forja: {args.config} lists no evaluate.suites", file=sys.stderr)
                return 2
            version = registry.resolve(client, args.model_uri)
            from model.device import resolve as placement

            model, tokenizer = registry.load_version(client, version, placement(full.device))
            metrics, _ = evaluate_model(model, tokenizer, cfg)
            if not args.no_record:
                with registry.registry_lock(workdir, version.name):
                    registry.reconcile(client, version.name)
                    registry.record_metrics(client, version, metrics, suite_digests(cfg))
            print(json.dumps({"model": version.name, "version": int(version.version), **metrics}))
        elif args.command == "promote":
            with registry.registry_lock(workdir, args.name):
                old = registry.promote(client, args.name, args.version)
            print(f"{args.name}: champion {old} -> {args.version} (forja rollback {args.name} moves it back)")
        elif args.command == "export":
            from model.hf import check_output, export

            check_output(Path(args.out), args.force)  # refuse before downloading anything
            version = registry.resolve(client, args.model_uri)
            lineage = [version]  # the version and its parents (fine-tunes name theirs): the model card's lineage
            while (parent := lineage[-1].tags.get("forja.parent")) and len(lineage) < 10:
                name, _, number = parent.rpartition("/")
                try:
                    lineage.append(client.get_model_version(name, number))
                except MlflowException:
                    break
            with tempfile.TemporaryDirectory() as tmp:
                out = export(registry.download(client, version, Path(tmp)), Path(args.out), replace=args.force,
                             versions=lineage, workdir=str(workdir))
            print(f"{version.name} version {version.version} -> {out} (AutoModelForCausalLM.from_pretrained)")
        elif args.command == "rollback":
            with registry.registry_lock(workdir, args.name):
                old, new = registry.rollback(client, args.name)
            print(f"{args.name}: champion {old} -> {new}")
        else:  # models, history: a hand move they see is recorded when the lock is free at once
            show = registry.describe if args.command == "models" else registry.reconcile
            try:
                with registry.registry_lock(workdir, args.name, timeout_s=10):
                    rows = show(client, args.name)
            except registry.RegistryLockTimeout:  # a gate is running: show now, record next time
                rows = show(client, args.name, write=False)
            for row in rows:
                print(json.dumps(row))
    except (registry.ModelNotFound, registry.RegistryLockTimeout, registry.RegistryLockError, MlflowException,
            ValueError) as e:
        message = e.message if isinstance(e, MlflowException) else str(e)
        print(f"forja: {message}", file=sys.stderr)
        return 2
    return 0


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


def batch_command(args, workdir: Path) -> int:
    import json

    from model.generate import Sampling
    from tasks.models import registry, tracking

    try:
        from model.device import resolve as placement

        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, args.seed)
        placement(args.device)  # a device this machine lacks is refused before anything starts
        registry.resolve(tracking.client(workdir), args.model_uri)  # before Prefect starts
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"batch input {args.input} does not exist")
    except (ValueError, LookupError, FileNotFoundError) as e:
        print(f"forja: {e}", file=sys.stderr)
        return 2
    from flows.batch import BatchConflict, BatchMismatch, batch

    try:
        summary = batch(args.model_uri, args.input, args.output_dir, args.shard_size, sampling.__dict__,
                        args.batch_size, str(workdir), args.chat, args.fresh, args.device)
    except (BatchMismatch, BatchConflict) as e:
        print(f"forja: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def serve_command(args, workdir: Path) -> int:
    """forja serve: the config's serve section, with the command line's model, address and device."""
    from model.device import resolve as placement
    from model.server_model import ModelUnavailable
    from model.serving import TamperedWeights
    from tasks.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        changes = {k: v for k, v in (("model_uri", args.model_uri), ("host", args.host), ("port", args.port))
                   if v is not None}
        serve_cfg = cfg.serve.model_copy(update=changes)
        device = args.device or cfg.device
        placement(device)  # a GPU asked for on a machine without one: refused before loading anything
        from model.server import run

        run(serve_cfg, str(workdir), device)
    except (ConfigError, ValueError, ModelUnavailable, TamperedWeights) as e:
        print(f"forja: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def report_finetune(result: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.rule("[bold]forja finetune: done")
    table = Table("metric", f"base ({result['base_model']})", "fine-tuned")
    for row in result["comparison"]:
        table.add_row(row["metric"], f"{row['base']:.4f}", f"{row['finetuned']:.4f}")
    c.print(table)
    status = "champion" if result["promoted"] else "candidate (champion unchanged)"
    c.print(f"model   [bold]{result['model_uri']}[/]  version {result['model_version']}, {status}  ({seconds:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workdir = Path(args.workdir or os.environ.get("FORJA_WORKDIR", "work")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_env(workdir)
    if args.command == "batch":
        return batch_command(args, workdir)
    if args.command == "serve":
        return serve_command(args, workdir)
    if args.command in ("sweep", "ladder"):
        from flows import cli_experiments

        return cli_experiments.command(args, workdir)
    if args.command not in ("run", "finetune", "data", "feedback"):
        return registry_command(args, workdir)

    from tasks.config import ConfigError, load_config
    from tasks.models.registry import ModelNotFound

    try:
        cfg = load_config(args.config, args.overrides)  # fail fast, before Prefect starts
        if args.command in ("finetune", "feedback"):
            if cfg.finetune is None:
                raise ConfigError(f"{args.config} has no finetune section (base_model, data, ...)"
                                  + (": the feedback flow fine-tunes with it" if args.command == "feedback" else ""))
            from tasks.models import registry, tracking

            base = cfg.finetune.base_model if args.command == "finetune" else \
                f"models:/{cfg.feedback.model_name or cfg.finetune.model_name}@{cfg.feedback.alias}"
            registry.resolve(tracking.client(workdir), base)  # before Prefect starts
        else:
            from flows.runners import check_scheduler, resolve

            runner = resolve(args.runner)  # a bad spelling or a silent scheduler: before Prefect starts
            if runner.startswith("tcp://"):
                check_scheduler(runner)
    except (ConfigError, ModelNotFound, ValueError) as e:
        print(f"forja: {e}", file=sys.stderr)
        return 2
    from flows.runtime import WorkdirBusy

    t0 = time.time()
    busy = "wait" if args.wait else "fail"
    try:
        if args.command == "finetune":
            from flows.finetune import finetune

            result = finetune(config_path=args.config, overrides=args.overrides, workdir=str(workdir), if_busy=busy)
            report_finetune(result, time.time() - t0)
            return 0
        if args.command == "feedback":
            from flows.feedback import feedback

            result = feedback(config_path=args.config, overrides=args.overrides, workdir=str(workdir), if_busy=busy)
            if result.get("skipped"):
                print(f"forja feedback: {result['skipped']}")
            else:
                report_finetune(result, time.time() - t0)
            return 0
        if args.command == "data":
            import json

            from flows.pipeline import data

            print(json.dumps(data(config_path=args.config, overrides=args.overrides, workdir=str(workdir),
                                  if_busy=busy, runner=runner)))
            return 0
        from flows.pipeline import pipeline

        result = pipeline(config_path=args.config, overrides=args.overrides, workdir=str(workdir), if_busy=busy,
                          runner=runner)
    except WorkdirBusy as e:
        print(f"forja: {e} (or pass --wait)", file=sys.stderr)
        return 2
    report(result, time.time() - t0)
    return 0

if __name__ == "__main__":
    sys.exit(main())
