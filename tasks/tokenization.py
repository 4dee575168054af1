"""tokenize: train a byte-level BPE on the clean corpus and pack it into token shards.

The stage streams: the BPE trains from a bounded, seeded sample of the training documents
(tokenize.train_sample_bytes), then every normalize shard is one unit of work ("tokenize-shard",
mapped on the run's runner) that encodes and packs that shard alone and writes its own
train-/val-NNNNN.parquet and .npy files. Memory is bounded by the sample, a batch of documents
and a row group, not by the corpus. Helpers live in tasks/tokens/.

(The module is not called tokenize.py so that it can never shadow the standard
library's tokenize module.)
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from tokenizers import Tokenizer

from model.chat import EOT  # noqa: F401 - part of this module's surface (tests, benchmarks)
from tasks import stage
from tasks.config import TokenizeConfig
from tasks.mapping import map_units, unit_options
from tasks.reports import publish_counts
from tasks.tokens import compare
from tasks.tokens.bpe import (BYTE_LEVEL_SPLIT, encode_all, fast_encoder, is_validation,  # noqa: F401
                              pre_tokenizers_byte_map, sample_texts, train_tokenizer)
from tasks.tokens.shard import SPLITS, encode_shard, pack  # noqa: F401
from tasks.tokens.views import preview, token_html, vocabulary_report

log = logging.getLogger("forja.tokenize")


@task(name="tokenize-shard", **unit_options())
def tokenize_shard(cfg: TokenizeConfig, documents: Path, index: int, out: Path, hold_out_last: bool = False) -> dict:
    """One normalize shard of the tokenize stage (mapped by build; writes files, returns counts only)."""
    return encode_shard(cfg, documents, index, out, hold_out_last)


def base_tokenizer(base: dict, workdir: str, out: Path) -> Tokenizer:
    """The tokenizer of a registered version (downloaded, its weights sha256 checked), saved in out."""
    import tempfile

    from tasks.models.tracking import download_base

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(download_base(base, workdir, Path(tmp)) / "tokenizer.json", out / "tokenizer.json")
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def combine(parts: list[dict]) -> dict:
    """Add up the units' counts; the used ids are a union, the preview text the first shard's."""
    total = {k: {s: sum(p[k][s] for p in parts) for s in SPLITS} for k in ("documents", "rows")}
    used = np.zeros(0, np.int64)
    for p in parts:
        used = np.union1d(used, np.asarray(p["used"], np.int64))
    return total | {"val_bytes": sum(p["val_bytes"] for p in parts), "val_tokens": sum(p["val_tokens"] for p in parts),
                    "used": len(used), "first_val": next((p["first_val"] for p in parts if p["first_val"] is not None), None)}


def build(cfg: TokenizeConfig, documents: list[Path], out: Path, base: dict | None = None,
          workdir: str | None = None, units=None) -> dict:
    """Train (or take) the tokenizer, encode every shard as a unit of work, and combine their counts.

    units(jobs) runs the unit jobs and returns their results in job order (default: map_units on
    the run's runner); tests pass their own to run them in another order."""
    documents = [Path(d) for d in documents]
    units = units or (lambda jobs: map_units(tokenize_shard, jobs))
    if cfg.compare_vocab_sizes:
        compare.check_sizes(cfg)  # a bad size fails before any work
    n_docs = sum(pq.ParquetFile(f).metadata.num_rows for f in documents)
    too_few = f"{n_docs} document(s) in the normalize output: too few to split into train and validation"
    if n_docs < 2:
        raise ValueError(too_few)
    if base:  # the weights this run starts from only make sense with their own tokenizer
        tok = base_tokenizer(base, workdir, out)
        log.info("tokenize: encoding %d documents with the tokenizer of %s (vocab %d)", n_docs, base["version"],
                 tok.get_vocab_size())
    else:
        log.info("tokenize: training BPE (vocab %d) on at most %d bytes sampled from %d documents in %d shards",
                 cfg.vocab_size, cfg.train_sample_bytes, n_docs, len(documents))
        tok = train_tokenizer(sample_texts(documents, cfg.train_sample_bytes, cfg.val_fraction, cfg.seed), cfg)
        tok.save(str(out / "tokenizer.json"))
    jobs = [(cfg, path, i, out, False) for i, path in enumerate(documents)]
    parts = units(jobs)
    if not any(p["documents"]["val"] for p in parts):  # tiny corpora: still hold one document out
        last = max(i for i, p in enumerate(parts) if p["documents"]["train"])
        parts[last] = units([(cfg, documents[last], last, out, True)])[0]
    stats = combine(parts)
    if not stats["documents"]["train"]:
        raise ValueError(too_few)
    rows = stats["rows"]
    if not rows["val"] or not rows["train"]:
        raise ValueError(
            f"too little text for sequences of {cfg.seq_len} tokens ({rows['train']} train, {rows['val']} "
            "validation rows): lower tokenize.seq_len or raise tokenize.val_fraction"
        )
    (out / "preview.txt").write_text(preview(tok, stats["first_val"]))
    (out / "tokens.html").write_text(token_html(tok, stats["first_val"]), encoding="utf-8")
    vocab = tok.get_vocab_size()
    extra = {"vocab_compare": compare.compare(cfg, documents, out, tok)} if cfg.compare_vocab_sizes else {}
    return {
        "vocab_size": vocab, "seq_len": cfg.seq_len, "documents": stats["documents"], "rows": rows,
        "tokens": {s: int(rows[s] * cfg.seq_len) for s in SPLITS},
        **vocabulary_report(vocab, stats["documents"]["val"], stats["val_bytes"], stats["val_tokens"], stats["used"]),
        "tokenizer_from": base, **extra,
        "cost": {"tokens": int(sum(rows[s] for s in SPLITS) * cfg.seq_len)},  # tokens written (tasks.cost)
    }


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.tokenization", "tasks.tokens.bpe", "tasks.tokens.shard", "tasks.tokens.views")


@task(name="tokenize", **stage.task_options(*CODE))
def tokenize(cfg: TokenizeConfig, normalized: stage.Manifest, workdir: str, base: dict | None = None) -> stage.Manifest:
    """Train the tokenizer (or take a registered version's: base, from tasks.pretrain.init_base, which
    the flow resolves so that the key holds its weights' sha256) and write packed token shards."""
    if cfg.tokenizer_from and not base:
        raise ValueError(f"tokenize.tokenizer_from is {cfg.tokenizer_from}: pass base=init_base(...) for it")
    key_cfg = cfg.model_dump(mode="json") | ({"base": base} if base else {})
    code = CODE + (("tasks.tokens.compare",) if cfg.compare_vocab_sizes else ())  # its source counts when it runs
    m = stage.run_stage("tokenize", key_cfg, [normalized], workdir,
                        lambda out, key: build(cfg, stage.shards(normalized.folder), out, base, workdir), code)
    publish_counts("tokenize", m)
    publish_tokens(m)
    if m.stats.get("vocab_compare"):
        compare.publish(m.stats["vocab_compare"])
    return m


def publish_tokens(m: stage.Manifest) -> None:
    """The token visualisation in the Prefect UI (the same HTML is logged to MLflow by pretrain)."""
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(key="tokenize-tokens", markdown=m.path("tokens.html").read_text(encoding="utf-8"),
                                 description=f"token boundaries of a validation paragraph ({m.key})")
    except Exception as e:  # a view; never fail the stage over it
        log.warning("could not publish the token visualisation: %s", e)
