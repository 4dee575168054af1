"""pretrain: train the model on the token shards with DeepSpeed, tracked in MLflow.

The task writes a training spec and runs `python -m model.train` in a child process,
streaming its progress into the Prefect log. Checkpoints live outside the stage folder
(<workdir>/checkpoints/pretrain/<key>), so a crashed or killed run resumes where it
stopped when the flow is run again.

From scratch by default; with pretrain.init_from (models:/NAME@champion) training starts from
that registered version's weights: the flow resolves it once (init_base), the tokenize stage
encodes with its tokenizer, the shape is checked before training, and the run and the version
it registers carry forja.init_from = NAME/VERSION.

The MLflow run is named after the Prefect flow run and the model, links back to the flow run,
lists the token rows as its dataset inputs, and keeps the data stages' counts as params and a
table (data_counts.json), leaving its metrics page to the training curves.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import task

import model.config
import model.kernels
import model.train
from model.checkpoint import file_sha256
from model.diagram import draw as draw_model
from model.generate import CONFIG, TOKENIZER, WEIGHTS
from tasks import stage
from tasks.models import registry, tracking
from tasks.config import PretrainConfig, TokenizeConfig
from tasks.reports import flat_counts, publish_counts

log = logging.getLogger("forja.pretrain")
MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd")


def model_config(cfg: PretrainConfig, tokens: stage.Manifest) -> model.config.ModelConfig:
    overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS}
    return model.config.from_preset(cfg.preset, tokens.stats["vocab_size"], tokens.stats["seq_len"], **overrides)


# Settings of the launch or of the stage, not of the training loop (init_from: a URI, resolved by the stage).
LAUNCHER_ONLY = ("num_gpus", "hostfile", "run_name", "init_from", "launcher", "ssh_port", "include", "exclude",
                 "master_addr", "global_batch_size")


def train_spec(cfg: PretrainConfig, tokens: stage.Manifest, out: Path, ckpt: Path) -> model.train.TrainSpec:
    hp = cfg.model_dump(exclude={"preset", *MODEL_FIELDS, *LAUNCHER_ONLY})
    hp["threads"] = rank_threads(cfg)
    return model.train.TrainSpec(
        model=asdict(model_config(cfg, tokens)),
        train_files=[str(p) for p in tokens.files_matching("train-")],
        val_files=[str(p) for p in tokens.files_matching("val-")],
        tokenizer=str(tokens.path("tokenizer.json")), out_dir=str(out), checkpoint_dir=str(ckpt),
        data_key=tokens.key, extra={"preset": cfg.preset}, **hp,
    )


def rank_threads(cfg: PretrainConfig) -> int:
    """Torch threads per rank: the machine's share (set deliberately: oversubscription is slow)."""
    return max(1, (cfg.threads or os.cpu_count() or 1) // cfg.num_gpus)


def check_tokens(cfg: PretrainConfig, tokens: stage.Manifest) -> None:
    """Enough training sequences for one global batch, or an error naming the stage that made them."""
    rows = tokens.stats.get("rows", {})
    need = cfg.micro_batch_size * cfg.num_gpus
    if rows.get("train", 0) < need or rows.get("val", 0) < 1:
        raise ValueError(
            f"the tokenize stage ({tokens.folder}) produced {rows.get('train', 0)} training and {rows.get('val', 0)} "
            f"validation sequences of {tokens.stats.get('seq_len')} tokens; pretraining needs at least {need} "
            "(micro_batch_size x processes) and 1. Crawl more text, lower tokenize.seq_len, or lower "
            "pretrain.micro_batch_size")


def check_hostfile(path: str) -> list[str]:
    """The hosts of a DeepSpeed hostfile, each checked reachable on its ssh port."""
    import socket

    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"pretrain.hostfile {path} does not exist")
    hosts = [line.split()[0] for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not hosts:
        raise ValueError(f"pretrain.hostfile {path} lists no hosts (one 'HOST slots=N' a line)")
    for host in hosts:
        try:
            socket.create_connection((host, 22), timeout=5).close()
        except OSError as e:
            raise ConnectionError(f"pretrain.hostfile {path}: host {host!r} is unreachable on its ssh port 22 "
                                  f"({e}); fix the name or remove it from the hostfile") from None
    return hosts


def launch_command(cfg: PretrainConfig, spec_path: Path) -> list[str]:
    """The deepspeed launcher running `model.train` on one machine's processes or a hostfile's nodes;
    one process on this machine runs `model.train` itself, as the whole world (the launcher's runner
    and its per-node launch process would add two interpreters importing DeepSpeed, 5-10 s a run)."""
    port = str(model.train.free_port())
    if not cfg.hostfile and cfg.num_gpus == 1:
        return [sys.executable, "-m", "model.train", "--master_port", port, str(spec_path)]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--master_port", port]
    if cfg.hostfile:
        check_hostfile(cfg.hostfile)
        cmd += ["--hostfile", cfg.hostfile]
    else:
        cmd += ["--num_gpus", str(cfg.num_gpus)]
    return cmd + ["--module", "model.train", str(spec_path)]


def child_env(run_id: str | None, cfg: PretrainConfig) -> dict:
    """The environment of the launcher and its ranks: thread counts, compiled-op cache, the
    accelerator, forja on the import path, the MLflow run to log to (when there is one) and,
    on a CPU, an allocator that keeps freed memory (model.train.cpu_allocator_env)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if run_id is not None:
        env |= {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    env.setdefault("OMP_NUM_THREADS", str(rank_threads(cfg)))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "forja" / "torch_extensions"))
    device = model.train.device_and_dtype()[0]
    env.setdefault("DS_ACCELERATOR", device)
    if device == "cpu":
        for k, v in model.train.cpu_allocator_env().items():
            env.setdefault(k, v)
    root = str(Path(__file__).resolve().parent.parent)  # the ranks import model.train from this checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


REPORTED = ("step", "model:", "resumed", "checkpoint", "samples")  # training lines worth a Prefect log entry


def run_training(cmd: list[str], env: dict, max_steps: int, label: str = "pretrain") -> float:
    """Run the launcher, logging its ranks' progress; raise with the last lines if it fails. Returns
    its wall seconds (the training's GPU-seconds, per GPU, in its cost).

    On a terminal, a progress bar shows step, loss and tokens/s as well.
    """
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=30)
    # Its own process group, so the launcher and every rank can be stopped together; and dying with
    # this process even when it is SIGKILLed, where no `except` runs: the launcher by the kernel's
    # parent-death signal, each rank by model.train's watchdog on this pid.
    env = dict(env, **{model.train.PARENT_ENV: str(os.getpid())})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=die_with_parent())
    try:
        with TrainingProgress(max_steps, label) as bar:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.startswith(REPORTED):
                    logging.getLogger(f"forja.{label}").info("%s: %s", label, line)
                    bar.update(line)
    except BaseException:  # a task timeout, a cancelled run, Ctrl-C: leave no rank training behind
        stop_group(proc)
        model.train.drop_shm_buffers(master_port(cmd))
        raise
    proc.wait()
    model.train.drop_shm_buffers(master_port(cmd))
    if proc.returncode:
        raise RuntimeError(f"training process exited with {proc.returncode}; last lines:\n" + "\n".join(tail))
    return time.monotonic() - started


def master_port(cmd: list[str]) -> int | None:
    """The --master_port of a launch command line (the launcher's, or a lone rank's)."""
    return int(cmd[cmd.index("--master_port") + 1]) if "--master_port" in cmd else None


def die_with_parent():
    """A preexec_fn making the child SIGKILLed when this process dies (Linux PR_SET_PDEATHSIG; None
    elsewhere). prctl is looked up here, so the child between fork and exec only calls it. The
    signal follows the thread that started the child, which waits on it until it ends."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    parent, pr_set_pdeathsig = os.getpid(), 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group of proc (the launcher and its ranks), SIGKILL what is left after
    grace_s. The last committed checkpoint stays, so a retry resumes from it."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap the launcher, or its zombie keeps the group alive
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:  # nobody left in the group
            break
    log.warning("training stopped: its process group %d was terminated", proc.pid)


class TrainingProgress:
    """A rich progress bar fed by the training's `step N key=value ...` lines (terminals only)."""

    def __init__(self, total: int, label: str = "pretrain"):
        self.total, self.label, self.progress, self.task = total, label, None, None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(self.label), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, info="")
        return self

    def update(self, line: str) -> None:
        if self.progress is None or not line.startswith("step "):
            return
        parts = line.split()
        fields = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
        info = f"loss {fields.get('train_loss', '?')}  {fields.get('tokens_per_s', '?')} tok/s"
        self.progress.update(self.task, completed=int(parts[1]), info=info)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()


def loss_curve(metrics_file: Path, png: Path, title: str = "forja pretraining") -> None:
    """A PNG of train and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def base_version(uri: str | None, workdir: str) -> dict | None:
    """The registered version behind models:/NAME@ALIAS (or /VERSION): its URI, NAME/VERSION and
    weights sha256, or None without a URI. Resolved in the flow and passed to tokenize and pretrain,
    so that their cache keys follow the version an alias points at now."""
    if not uri:
        return None
    version = registry.resolve(tracking.client(workdir), uri)
    sha = version.tags.get("weights_sha256")
    if not sha:
        raise ValueError(f"{uri} ({version.name}/{version.version}) has no weights_sha256 tag: it was not "
                         "registered by forja; start from a version forja registered")
    return {"uri": uri, "version": f"{version.name}/{version.version}", "weights_sha256": sha}


def init_base(cfg: PretrainConfig, tokenize_cfg: TokenizeConfig, workdir: str) -> dict | None:
    """The version whose tokenizer the tokenize stage encodes with (pretrain.init_from, else
    tokenize.tokenizer_from), or None: a new tokenizer is trained."""
    if cfg.init_from and tokenize_cfg.tokenizer_from and cfg.init_from != tokenize_cfg.tokenizer_from:
        raise ValueError(f"pretrain.init_from ({cfg.init_from}) and tokenize.tokenizer_from "
                         f"({tokenize_cfg.tokenizer_from}) differ: weights only make sense with their own "
                         "tokenizer; remove tokenize.tokenizer_from")
    return base_version(cfg.init_from or tokenize_cfg.tokenizer_from, workdir)


def fetch_base(base: dict, workdir: str, dst: Path) -> Path:
    """The base version's model folder under dst: downloaded once (a resumed run finds it), its
    weights' sha256 checked every time."""
    from model.serving import check_weights

    folder = dst / "model"
    if not (folder / WEIGHTS).is_file():
        import tempfile

        dst.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst) as tmp:
            os.replace(tracking.download_base(base, workdir, Path(tmp)), folder)
    check_weights(str(folder / WEIGHTS), base["weights_sha256"])
    return folder


# Where a mismatched field of the model's shape is set.
SHAPE_SOURCE = {"vocab_size": "the tokenizer", "block_size": "tokenize.seq_len", "n_layer": "pretrain.n_layer",
                "n_head": "pretrain.n_head", "n_kv_head": "pretrain.n_kv_head", "n_embd": "pretrain.n_embd"}


def check_init(base: dict, folder: Path, spec: model.train.TrainSpec) -> None:
    """Fail before training unless the base version has this run's shape and tokenizer."""
    have = asdict(model.config.ModelConfig.load(folder / CONFIG))
    diffs = [f"{k} {have[k]} there, {v} here (from {SHAPE_SOURCE.get(k, 'pretrain.preset')})"
             for k, v in spec.model.items() if k != "dropout" and have.get(k) != v]
    if diffs:
        raise ValueError(f"pretrain.init_from {base['uri']} ({base['version']}) has another shape: "
                         + "; ".join(diffs) + ". Set the preset and sizes to the base's, or remove pretrain.init_from")
    mine, theirs = file_sha256(spec.tokenizer), file_sha256(folder / TOKENIZER)
    if mine != theirs:
        raise ValueError(f"pretrain.init_from {base['uri']} ({base['version']}): the tokenize stage's tokenizer "
                         f"({spec.tokenizer}) is not the base's; tokenize with it (tokenize.tokenizer_from "
                         "unset or the same URI)")


def log_data_counts(upstream: list[stage.Manifest]) -> None:
    """The data stages' counts (documents in and out, drops by reason, tokens ...) as params,
    comparable across runs, and as one table artifact (data_counts.json); not as metrics,
    where each would be a one-point chart crowding the training curves."""
    counts = [(m.stage, k, v) for m in upstream for k, v in flat_counts(m.stats).items()]
    mlflow.log_params({f"data.{s}.{k}": v for s, k, v in counts})
    mlflow.log_table({"stage": [s for s, _, _ in counts], "count": [k for _, k, _ in counts],
                      "value": [float(v) for _, _, v in counts]}, artifact_file="data_counts.json")


def build(cfg: PretrainConfig, tokens: stage.Manifest, workdir: str, experiment: str, out: Path, key: str,
          upstream: list[stage.Manifest] = (), model_name: str | None = None, base: dict | None = None) -> dict:
    check_tokens(cfg, tokens)
    ckpt = Path(workdir).resolve() / "checkpoints" / "pretrain" / (cfg.run_name or key)
    ckpt.mkdir(parents=True, exist_ok=True)
    spec = train_spec(cfg, tokens, out, ckpt)
    lineage = {}
    if cfg.init_from:
        folder = fetch_base(base, workdir, ckpt / "init")
        check_init(base, folder, spec)
        spec.init_from = str(folder)
        lineage = {"forja.init_from": base["version"], "forja.init_from_uri": base["uri"],
                   "forja.init_from_sha256": base["weights_sha256"]}
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    exp_id = tracking.setup(workdir, experiment)
    if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
        mlflow.set_system_metrics_sampling_interval(5)  # CPU, memory (and GPU) every 5 s, not 10
    run_file = ckpt / "mlflow_run_id"  # a resumed training continues the same MLflow run
    run_id = run_file.read_text().strip() if run_file.exists() else None
    name = tracking.run_name(f"pretrain-{key[:8]}", model_name or cfg.preset)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=None if run_id else name,
                          log_system_metrics=True) as run:
        run_file.write_text(run.info.run_id)
        if not run_id:
            mlflow.log_params({f"pretrain.{k}": v for k, v in cfg.model_dump().items()})
            mlflow.log_params({f"model.{k}": v for k, v in spec.model.items()})
            log_data_counts([*upstream, tokens])
            tracking.log_token_inputs(tokens)
            mlflow.set_tags({"forja.stage.pretrain": key, "forja.stage.tokenize": tokens.key, **lineage,
                             **tracking.prefect_tags(), **{f"forja.stage.{s}": k for s, k in tokens.inputs.items()}})
        if tokens.path("tokens.html").exists():
            mlflow.log_artifact(str(tokens.path("tokens.html")), "tokenizer")
        # A picture of the network, drawn from its config (model.diagram), beside the run's curves.
        draw_model(model.config.ModelConfig(**spec.model), out / "model.png",
                   f"forja {model_name or cfg.preset} ({cfg.preset})")
        mlflow.log_artifact(str(out / "model.png"))
        training_s = run_training(launch_command(cfg, out / "spec.json"), child_env(run.info.run_id, cfg),
                                  cfg.max_steps)
        if (out / "samples.txt").exists():
            mlflow.log_artifact(str(out / "samples.txt"))
        loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
        mlflow.log_artifact(str(out / "loss_curve.png"))
        mlflow.log_artifact(str(out / "metrics.jsonl"))
    summary = json.loads((out / "train_summary.json").read_text())
    return {**summary, "mlflow_run_id": run.info.run_id, "mlflow_experiment_id": exp_id, "model": spec.model,
            "init_from": base if cfg.init_from else None, "version_tags": lineage,
            "cost": training_cost(summary, out / "metrics.jsonl", training_s, cfg)}


def training_cost(summary: dict, metrics_file: Path, training_s: float, cfg: PretrainConfig) -> dict:
    """Training's own figures for the stage's cost (tasks.cost): tokens trained, tokens per second
    of the training loop, the median MFU its log intervals measured and, on GPUs, GPU-seconds
    (the launcher's wall time times the GPUs it held). A resumed run counts the steps it ran."""
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    mfu = sorted(r["mfu"] for r in rows if r.get("step", 0) > summary.get("resumed_from", 0) and "mfu" in r)
    cost = {"tokens": int(summary["tokens"]),
            "tokens_per_s": round(summary["tokens"] / summary["seconds"], 1) if summary.get("seconds") else None,
            "mfu": round(mfu[len(mfu) // 2], 5) if mfu else None, "resumed_from_step": summary.get("resumed_from", 0)}
    if model.train.device_and_dtype()[0] == "cuda":
        cost["gpu_s"] = round(training_s * summary.get("world_size", cfg.num_gpus), 1)
    return cost


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.pretrain", "model.checkpoint", "model.config", "model.data", "model.generate", "model.gpt", "model.monitor",
        "model.train", "model.kernels", model.kernels.SOURCE)


@task(name="pretrain", **stage.task_options(*CODE))
def pretrain(cfg: PretrainConfig, tokens: stage.Manifest, workdir: str, experiment: str,
             upstream: list[stage.Manifest] = (), model_name: str | None = None,
             base: dict | None = None) -> stage.Manifest:
    """Train a model on the tokenize stage's shards: from scratch, or from the registered version
    pretrain.init_from names (base: init_base(...), resolved by the flow so the cache follows it).

    upstream: earlier data stages, for their counts; model_name: the registered model's name, for
    the MLflow run's name."""
    key_cfg = cfg.model_dump(mode="json")
    if cfg.init_from:
        if not base or base.get("uri") != cfg.init_from:
            raise ValueError(f"pretrain.init_from is {cfg.init_from}: pass base=init_base(...) for it")
        key_cfg["init_from_sha256"] = base["weights_sha256"]
    m = stage.run_stage("pretrain", key_cfg, [tokens], workdir,
                        lambda out, key: build(cfg, tokens, workdir, experiment, out, key, upstream, model_name, base),
                        CODE)
    publish_counts("pretrain", m)
    return m
