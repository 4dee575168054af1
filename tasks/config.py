"""The typed config tree: one YAML file in configs/, one pydantic model per stage.

Unknown keys fail at load time (extra="forbid"), naming the key and the file; a flow
hands each task only its own slice.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import PRESETS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonlSource(Section):
    path: str
    text_field: str = "text"
    id_field: str | None = Field(None, description="a field to name each record by; default: its line number")


class ParquetSource(Section):
    path: str = Field(description="a Parquet file, or a glob of them (one unit of work per file)")
    text_field: str = "text"
    id_field: str | None = Field(None, description="a column to name each row by; default: its row number")


class CrawlConfig(Section):
    seeds: list[str] = Field(default_factory=list, description="start URLs; '{serve}' is replaced by serve_dir's address")
    seed_files: list[str] = Field(default_factory=list, description="files of URLs, one a line ('#' comments)")
    warc: list[str] = Field(default_factory=list, description="WARC files (.warc or .warc.gz): response records")
    folders: list[str] = Field(default_factory=list, description="local folders of .html/.htm/.txt/.md documents "
                               "(like every local source, their content is part of the crawl key)")
    jsonl: list[JsonlSource] = Field(default_factory=list, description="JSONL files (.jsonl or .jsonl.gz), one "
                                     "document a line")
    parquet: list[ParquetSource] = Field(default_factory=list, description="Parquet files with a text column")
    serve_dir: str | None = Field(None, description="a local folder to serve on 127.0.0.1 while crawling (demo, "
                                  "tests); its pages are named {serve}/path and its content is part of the crawl key")
    path_prefixes: list[str] = Field(default_factory=list, description="in-scope path prefixes; default: each seed's folder")
    follow_links: bool = Field(True, description="false: fetch only the seeds (seed lists of JavaScript sites)")
    max_depth: int = Field(3, ge=0)
    max_pages: int = Field(200, ge=1, description="most documents from the web seeds in all; each host's walk "
                           "also stops at it (the first max_pages in seed/host order are kept)")
    delay_s: float = Field(1.0, ge=0, description="minimum pause between two requests to the same host")
    timeout_s: float = Field(15.0, gt=0, description="connect/read timeout of one request")
    deadline_s: float = Field(60.0, gt=0, description="total time allowed to read one body")
    retries: int = Field(3, ge=0, description="retries on connection errors, timeouts, 429 and 5xx")
    backoff_s: float = Field(1.0, ge=0, description="first retry pause, doubled each time")
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="largest document kept: a fetched body after "
                                "decompression, a WARC record, a folder file or a JSONL line")
    allow_loopback: bool = Field(False, description="allow 127.0.0.0/8 and ::1 (the SSRF guard refuses them by default)")
    user_agent: str = "forja/0.1 (+https://github.com/forja-llm/forja)"
    licence: str = Field("", description="licence or source note stored with every document")
    shard_docs: int = Field(5000, ge=1, description="documents per output shard; later stages map over shards")
    max_file_bytes: int = Field(64 * 2**30, ge=1024, description="most bytes read (after decompression) from one "
                                "input file (WARC, JSONL, Parquet; a folder: all its files together); the rest past it is "
                                "skipped and counted as <kind>_file_limit")
    concurrency: int = Field(8, ge=1, description="hosts crawled at once; each host keeps its own delay, robots "
                             "and connection limit")
    host_connections: int = Field(1, ge=1, description="requests in flight to one host at a time")
    max_frontier: int = Field(100_000, ge=1, description="most URLs waiting to be fetched per host; links found past it are "
                              "counted as frontier_full and not queued")
    refresh: str | None = Field(
        None, description="web seeds: revalidate the pages after this long (e.g. 7d, 12h, 30m) with conditional "
        "requests (If-None-Match / If-Modified-Since): an unchanged page costs a 304 and keeps its document, a "
        "changed one is fetched again, and the crawl key follows the documents produced. Within the period the last "
        "crawl is reused without touching the network. Default: no refresh, a crawl of the same config is reused. "
        "Local sources (folders, warc, jsonl, seed_files, serve_dir) always count by a fingerprint of their content")

    @model_validator(mode="after")
    def _check(self):
        if not (self.seeds or self.seed_files or self.warc or self.folders or self.jsonl or self.parquet):
            raise ValueError("crawl needs at least one source: seeds, seed_files, warc, folders, jsonl or parquet")
        if self.refresh is not None:
            self.refresh_seconds  # noqa: B018 - parses, raising a message that names the field
        return self

    @property
    def refresh_seconds(self) -> float | None:
        """crawl.refresh in seconds (None when unset)."""
        import re

        if self.refresh is None:
            return None
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", self.refresh)
        if not m or float(m.group(1)) <= 0:
            raise ValueError(f"crawl.refresh ({self.refresh!r}) must be a positive duration such as 7d, 12h, 30m, "
                             "90s or 2w")
        return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


class DedupeConfig(Section):
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity above which two documents are duplicates")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(5, ge=1, description="words per shingle")
    seed: int = 1
    index: Literal["memory", "redis"] = Field("memory", description="where the LSH index lives")
    redis_url: str = "redis://127.0.0.1:6379/0"
    index_name: str | None = Field(None, description="keep the index across runs under this name (incremental): "
                                   "later runs are deduplicated against every document kept before")
    incremental: Literal["corpus", "new_only"] = Field(
        "corpus", description="with index_name: 'corpus' outputs the whole current corpus (a document kept before "
        "with the same text stays, a changed one replaces its own old entry, a new one that duplicates anything kept "
        "before is removed); 'new_only' outputs only new or changed documents (unchanged ones are removed as 'seen')")

    @model_validator(mode="after")
    def _check(self):
        from datasketch import MinHashLSH

        try:  # datasketch needs at least two bands for this threshold and permutation count
            MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        except ValueError:
            raise ValueError(f"dedupe.threshold ({self.threshold}) is too high for num_perm ({self.num_perm}): "
                             "lower the threshold or raise num_perm") from None
        return self


class QualityConfig(Section):
    """Gopher/C4-style document rules; the defaults tolerate technical documentation."""

    enabled: bool = True
    min_words: int = Field(50, ge=0)
    max_words: int = Field(200_000, ge=1)
    min_mean_word_length: float = Field(2.5, ge=0)
    max_mean_word_length: float = Field(10.0, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_digit_ratio: float = Field(0.25, ge=0, le=1)
    max_ellipsis_lines: float = Field(0.3, ge=0, le=1)
    max_bullet_lines: float = Field(0.9, ge=0, le=1)
    max_duplicate_line_chars: float = Field(0.3, ge=0, le=1)
    max_duplicate_paragraph_chars: float = Field(0.3, ge=0, le=1)
    max_top_2gram_chars: float = Field(0.2, ge=0, le=1)
    max_duplicate_5gram_chars: float = Field(0.3, ge=0, le=1)


class NormalizeConfig(Section):
    languages: list[str] = Field(default_factory=lambda: ["pt"], min_length=1)
    language_id: bool = Field(True, description="false: no language detection (lang empty, every language kept; "
                              "for corpora known to be in one language, and the data benchmark)")
    min_lang_confidence: float = Field(0.8, ge=0, le=1)
    min_chars: int = Field(200, ge=0)
    lang_seed: int = 0
    quality: QualityConfig = QualityConfig()
    scrub_pii: bool = Field(True, description="replace e-mails, IPs, phones and CPFs with <TYPE> placeholders")
    examples_per_reason: int = Field(3, ge=0, description="dropped documents kept as examples in the report")


class TokenizeConfig(Section):
    vocab_size: int = Field(4096, ge=300, le=2**20)
    min_frequency: int = Field(2, ge=1)
    seq_len: int = Field(256, ge=8, description="tokens per training sequence (the model's context)")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    shard_rows: int = Field(8192, ge=1, description="rows per Parquet row group and per write batch of a tokenize "
                            "unit (bounds its memory); each normalize shard gives one train and one val file")
    train_sample_bytes: int = Field(200_000_000, ge=10_000, description="the BPE is trained on at most this many "
                                    "bytes of training text (a seeded sample spread over every shard), so memory "
                                    "does not grow with the corpus")
    seed: int = 0
    compare_vocab_sizes: list[int] = Field(
        default_factory=list, description="also train BPEs of these sizes on the same bounded sample and compare "
        "them on the validation split (bytes per token, vocabulary used, words split into many tokens): a table and "
        "a plot in the stage folder and the Prefect run, vocab_size marked; [] = no comparison")
    split_tokens: int = Field(3, ge=2, description="compare_vocab_sizes: a word split into more than this many "
                                                   "tokens counts as fragmented")
    tokenizer_from: str | None = Field(
        None, pattern=r"^models:/", description="models:/NAME@ALIAS or /VERSION: encode with that registered "
        "version's tokenizer instead of training one (set by pretrain.init_from; vocab_size is then the version's)")


class PretrainConfig(Section):
    preset: str = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    n_embd: int | None = None
    max_steps: int = Field(300, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    global_batch_size: int = Field(
        0, ge=0, description="sequences per optimizer step over every rank; 0: micro_batch_size x grad_accum_steps x "
        "ranks. Set, it decides grad_accum_steps (which must then divide it evenly)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp32; bf16: DeepSpeed's bf16 mode (fp32 "
        "master weights), on a GPU or a CPU that supports it; fp32: full precision everywhere")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip; 0: none")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw: AdamW on every weight; muon: Muon (orthogonalised momentum) on the blocks' 2-D "
        "weight matrices, AdamW at lr on the embedding, norms and output head")
    muon_lr: float = Field(0.02, gt=0, description="optimizer muon: the learning rate of the Muon half")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="optimizer muon: Muon's momentum")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1, description="validation rows: this many global batches of the held-out split "
                              "(the same rows however the ranks split a batch), shared out among the ranks")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 1337
    threads: int = Field(0, ge=0, description="torch threads per machine, shared by its ranks; 0 = all cores")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")
    num_gpus: int = Field(1, ge=1, description="processes on this machine (GPUs, or CPU ranks over gloo)")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile: train on the nodes it lists")
    launcher: Literal["pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm"] = Field(
        "pdsh", description="with a hostfile: how DeepSpeed starts the other nodes' ranks (pdsh: over ssh)")
    ssh_port: int = Field(22, ge=1, le=65535, description="with a hostfile: the nodes' ssh port")
    include: str = Field("", description="with a hostfile: only these nodes/slots, DeepSpeed's form 'host1@host2:0,1'")
    exclude: str = Field("", description="with a hostfile: leave out these nodes/slots, the same form")
    master_addr: str = Field("", description="with a hostfile: the address the other nodes reach the first on; "
                             "default: the first host's address")
    run_name: str | None = Field(None, description="checkpoint folder to resume; default: one per configuration")
    sample_every: int = Field(0, ge=0, description="generations from sample_prompts every N steps; 0 = never")
    sample_prompts: list[str] = Field(default_factory=lambda: ["O Linux é"])
    grad_norms_every: int = Field(0, ge=0, description="per-layer gradient norms every N steps; 0 = never")
    init_from: str | None = Field(
        None, pattern=r"^models:/", description="models:/NAME@champion (or /VERSION): continue from that registered "
        "version's weights instead of from scratch (same shape; the tokenize stage then uses its tokenizer)")

    @model_validator(mode="after")
    def _check(self):
        if self.preset not in PRESETS:
            raise ValueError(f"pretrain.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"pretrain.warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        from model.optim import refusal

        if why := refusal(self.optimizer, self.zero_stage, 0, self.grad_clip):  # what training would refuse
            raise ValueError(why)
        if self.global_batch_size and not self.hostfile:  # with a hostfile the launch knows the ranks
            object.__setattr__(self, "grad_accum_steps", self.accum_for(self.num_gpus, "pretrain.num_gpus"))  # frozen model
        return self

    def accum_for(self, ranks: int, where: str) -> int:
        """grad_accum_steps for global_batch_size over `ranks` processes (where: what set their number),
        or an error saying what to change when the numbers do not divide or disagree."""
        if not self.global_batch_size:
            return self.grad_accum_steps
        per_step = self.micro_batch_size * ranks
        accum, left = divmod(self.global_batch_size, per_step)
        if left or not accum:
            raise ValueError(
                f"pretrain.global_batch_size {self.global_batch_size} is not a whole number of micro-batches: "
                f"micro_batch_size {self.micro_batch_size} x {ranks} rank(s) ({where}) = {per_step} sequences per "
                f"accumulation step. Make global_batch_size a multiple of {per_step}, or change micro_batch_size")
        if "grad_accum_steps" in self.model_fields_set and self.grad_accum_steps != accum:
            raise ValueError(
                f"pretrain.grad_accum_steps {self.grad_accum_steps} disagrees with global_batch_size "
                f"{self.global_batch_size} = micro_batch_size {self.micro_batch_size} x {ranks} rank(s) ({where}) x "
                f"{accum}. Set one of them: remove grad_accum_steps, or set it to {accum}")
        return accum


class SuiteConfig(Section):
    """One evaluation suite: a JSONL file (formats in tasks/evals/suites.py and the README)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="prefix of its metrics: NAME.metric")
    kind: Literal["text", "choice", "classification", "generation"]
    path: str
    template: str = Field("{text}\n", description="classification: the prompt before a label ('{text}' is the item)")
    labels: list[str] | str | None = Field(None, description="classification: the labels, or a JSON file listing them")
    max_new_tokens: int = Field(64, ge=1, description="generation: tokens generated per prompt (greedy)")
    chat: bool = Field(False, description="generation: each prompt is a user message in the chat template")
    limit: int | None = Field(None, ge=1, description="score only the first N items")


class EvaluateConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["O Linux é"])
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(50, ge=0)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    suites: list[SuiteConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_suites(self):
        names = [s.name for s in self.suites]
        if len(names) != len(set(names)):
            raise ValueError(f"evaluate.suites: names must be unique; got {names}")
        return self


class RegisterConfig(Section):
    model_name: str = Field("forja-model", min_length=1)
    experiment: str = "forja"
    gate_metric: str = "val_loss"
    gate_direction: Literal["lower", "higher"] = "lower"
    gate_margin: float = Field(0.0, ge=0, description="the candidate must beat the champion by more than this")


# `register` is a stage name; shadowing ABCMeta.register on a data model is harmless.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class LoraConfig(Section):
    rank: int = Field(0, ge=0, description="0: fine-tune every weight; > 0: low-rank adapters of this rank")
    alpha: float = Field(16.0, gt=0)
    targets: list[Literal["qkv", "o_proj", "gate_up", "down"]] = ["qkv", "o_proj", "gate_up", "down"]


def _finetune_training() -> "PretrainConfig":
    return PretrainConfig(max_steps=150, lr=1e-3, warmup_steps=10, log_every=10, eval_every=25, eval_batches=4,
                          checkpoint_every=50, micro_batch_size=8)


class FinetuneConfig(Section):
    """Fine-tuning a registered model on conversations (forja finetune CONFIG)."""

    base_model: str = Field(description="models:/NAME@ALIAS or models:/NAME/VERSION to start from")
    data: str = Field(description='JSONL: {"messages": [{"role", "content"}, ...]} or {"prompt", "response"} a line')
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    seq_len: int | None = Field(None, ge=8, description="tokens per example (default: the base model's context)")
    training: PretrainConfig = Field(default_factory=_finetune_training,
                                     description="the training knobs of pretrain (preset and shape are the base's)")
    lora: LoraConfig = LoraConfig()
    suites: list[SuiteConfig] = Field(default_factory=list, description="scored before and after fine-tuning")
    model_name: str = Field("forja-finetuned", min_length=1)
    gate_metric: str = "val_loss"
    gate_direction: Literal["lower", "higher"] = "lower"
    gate_margin: float = Field(0.0, ge=0)
    seed: int = 0
    scrub_pii: bool = Field(True, description="replace e-mails, IPs, phones and CPFs in the conversations with "
                                              "<TYPE> placeholders before training (normalize's scrubber)")


class ServeConfig(Section):
    """forja serve: a registered model behind the OpenAI-compatible API, with a chat page."""

    model_uri: str = Field("models:/forja-demo-faq@champion",
                           description="models:/NAME@ALIAS (followed: when the alias moves, the new version "
                                       "answers without a restart) or models:/NAME/VERSION (pinned)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0: any free port (printed at start)")
    refresh_s: float = Field(30.0, gt=0, description="how often the alias is looked up in the registry")
    max_batch: int = Field(8, ge=1, description="sequences decoded together: concurrent requests share each step")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long a new batch waits for more requests to join")
    exchanges_kept: int = Field(10_000, ge=1, description="recent answers a feedback may refer to by request id")
    feedback_db: str | None = Field(None, description="SQLAlchemy URL of the feedback database "
                                                      "(postgresql+psycopg2://USER:PW@HOST/DB); default: SQLite "
                                                      "in the work directory (feedback/feedback.db)")


class FeedbackConfig(Section):
    """The feedback flow: consented, rated exchanges become the next fine-tune of the champion.
    The `finetune` section is the template (training knobs, suites, gate, base data in finetune.data);
    its base_model is replaced by the model's current alias."""

    db: str | None = Field(None, description="the feedback database (as serve.feedback_db); default: SQLite in "
                                             "the work directory")
    model_name: str | None = Field(None, description="the registered model whose feedback is used, whose alias "
                                                     "is fine-tuned and under which the result is registered; "
                                                     "default: finetune.model_name (the chat model forja serve "
                                                     "answers with)")
    alias: str = Field("champion", min_length=1)
    min_records: int = Field(20, ge=1, description="fewer new usable conversations than this: the flow skips, "
                                                   "saying so")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of the feedback scored, not trained on")
    decontam_ngram: int = Field(8, ge=3, description="words per n-gram when comparing with the evaluation suites")
    decontam_overlap: float = Field(0.5, gt=0, le=1, description="a conversation sharing this share of its n-grams "
                                                                  "with a suite item is removed")
    seed: int = 0


class ForjaConfig(Section):
    name: str = "forja"
    device: str = Field("auto", description="where trained models run (evaluate, batch inference, the gate, "
                                            "fine-tuning's comparison, serving): auto (CUDA in bf16 when present, "
                                            "else the CPU), cpu, cuda or cuda:N")
    crawl: CrawlConfig
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)  # built on use: its check imports datasketch
    normalize: NormalizeConfig = NormalizeConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    finetune: FinetuneConfig | None = None
    serve: ServeConfig = ServeConfig()
    feedback: FeedbackConfig = FeedbackConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.evaluate.max_new_tokens >= self.tokenize.seq_len:
            raise ValueError(
                f"evaluate.max_new_tokens ({self.evaluate.max_new_tokens}) must be < tokenize.seq_len "
                f"({self.tokenize.seq_len}), the model's context"
            )
        from model.device import resolve

        try:  # the spelling only: whether a GPU is there is known where the model is loaded
            resolve(self.device, cuda_available=True, cuda_count=64, bf16_supported=True)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return self


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, raw = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
    node[leaf] = parse_value(raw)


def parse_value(raw: str):
    """A command-line value as YAML, where 1e-3 is a number too (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ForjaConfig:
    """Read a YAML config, apply --set overrides and validate it into a ForjaConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for o in overrides:
        apply_override(tree, o)
    try:
        return ForjaConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        section: type[BaseModel] = ForjaConfig
        for part in err["loc"][:-1]:
            if isinstance(part, int):  # an item of a list of sections
                continue
            annotation = section.model_fields[part].annotation
            options = [annotation, *getattr(annotation, "__args__", ())]  # X | None, list[X]
            section = next(a for a in options if isinstance(a, type) and issubclass(a, BaseModel))
        return f"unknown key '{key}' (valid keys here: {', '.join(section.model_fields)})"
    return f"{key}: {err['msg']}"
