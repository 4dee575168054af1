"""normalize: repair and clean text, detect language, drop what should not be trained on.

Each document is kept, or dropped with a reason; rejected.parquet holds the dropped
ones with their reason so nothing disappears silently.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path

import ftfy
import pyarrow as pa
import pyarrow.parquet as pq
from langdetect import DetectorFactory, detect_langs
from langdetect.lang_detect_exception import LangDetectException
from prefect import task

from model.faults import fault_point
from tasks import stage
from tasks.mapping import map_units, unit_options
from tasks.config import NormalizeConfig
from tasks.text.pii import scrub
from tasks.text.quality import failed_rule
from tasks.reports import publish_counts

log = logging.getLogger("forja.normalize")

# A line made only of bracketed navigation links, e.g. "[ anterior ] [ Conteúdo ] [ 1 ]".
_NAV_LINE = re.compile(r"^\s*(\[[^\]\n]{1,40}\]\s*){2,}$")
_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


class EmptyCorpusError(ValueError):
    """Every document was dropped; the message gives the counts by reason."""


def clean(text: str) -> str:
    """ftfy repair, Unicode NFC, navigation lines removed, whitespace collapsed."""
    text = unicodedata.normalize("NFC", ftfy.fix_text(text))
    lines = [_SPACES.sub(" ", ln).strip() for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines if not _NAV_LINE.match(ln))
    return _BLANKS.sub("\n\n", text).strip()


def language(text: str, seed: int) -> tuple[str, float]:
    """Most probable language and its probability; deterministic for a given seed."""
    DetectorFactory.seed = seed  # langdetect samples randomly unless seeded
    try:
        best = detect_langs(text[:5000])[0]
    except LangDetectException:
        return "unknown", 0.0
    return best.lang, float(best.prob)


def judge(text: str, cfg: NormalizeConfig) -> tuple[str | None, str, float]:
    """(drop reason or None, language, confidence) for an already cleaned text."""
    if len(text) < cfg.min_chars:
        return "too_short", "", 0.0
    lang, prob = "", 0.0
    if cfg.language_id:
        lang, prob = language(text, cfg.lang_seed)
        if lang not in cfg.languages:
            return "language", lang, prob
        if prob < cfg.min_lang_confidence:
            return "low_language_confidence", lang, prob
    if cfg.quality.enabled and (rule := failed_rule(text, cfg.quality)):
        return f"quality:{rule}", lang, prob
    return None, lang, prob


def build_shard(cfg: NormalizeConfig, documents: Path, out: Path, index: int, batch_rows: int = 1000) -> dict:
    """Normalize one shard in batches into documents-<index> and rejected-<index>; its counts."""
    source = pq.ParquetFile(documents)
    schema = source.schema_arrow.append(pa.field("lang", pa.string())).append(pa.field("lang_score", pa.float64()))
    rejected_schema = schema.append(pa.field("reason", pa.string()))
    n_in = n_kept = chars = 0
    reasons, pii = Counter(), Counter()
    examples: dict[str, list[dict]] = {}
    # Both files are written under temp names and renamed only when the shard is complete: a unit
    # killed mid-shard (a lost worker) leaves nothing a reader would take, and its rerun starts over.
    with stage.partial(out / stage.shard_name("documents", index)) as kept_path, \
         stage.partial(out / stage.shard_name("rejected", index)) as rejected_path, \
         pq.ParquetWriter(kept_path, schema, compression="zstd") as kept_out, \
         pq.ParquetWriter(rejected_path, rejected_schema, compression="zstd") as rejected_out:
        for batch in source.iter_batches(batch_size=batch_rows):
            kept, rejected = [], []
            for row in batch.to_pylist():
                text = clean(row["text"] or "")
                reason, lang, prob = judge(text, cfg)
                if cfg.scrub_pii:  # rejected text is kept for inspection, so it is scrubbed too
                    text, found = scrub(text)
                    pii.update(found)
                row |= {"text": text, "lang": lang, "lang_score": prob}
                if reason:
                    reasons[reason] += 1
                    rejected.append(row | {"reason": reason})
                    if len(ex := examples.setdefault(reason, [])) < cfg.examples_per_reason:
                        ex.append({"url": row["url"], "text": text[:300]})
                else:
                    kept.append(row)
                    chars += len(text)
            n_in += batch.num_rows
            n_kept += len(kept)
            kept_out.write_table(pa.Table.from_pylist(kept, schema=schema))
            rejected_out.write_table(pa.Table.from_pylist(rejected, schema=rejected_schema))
            fault_point("unit:normalize-shard:writing")  # half a shard on disk (the fault tests kill here)
    log.info("normalize: shard %d: kept %d of %d", index, n_kept, n_in)
    return {"documents_in": n_in, "documents_out": n_kept, "dropped": dict(reasons), "pii_replaced": dict(pii),
            "chars_out": chars, "examples": examples}


def combine(parts: list[dict], examples_per_reason: int) -> dict:
    """Add up the shards' counts; keep the first examples of each reason in shard order."""
    total = {"documents_in": 0, "documents_out": 0, "chars_out": 0, "shards": len(parts)}
    reasons, pii = Counter(), Counter()
    examples: dict[str, list[dict]] = {}
    for p in parts:
        for k in ("documents_in", "documents_out", "chars_out"):
            total[k] += p[k]
        reasons.update(p["dropped"])
        pii.update(p["pii_replaced"])
        for reason, ex in p["examples"].items():
            examples.setdefault(reason, []).extend(ex)
    return total | {"dropped": dict(reasons), "pii_replaced": dict(pii),
                    "examples": {r: ex[:examples_per_reason] for r, ex in examples.items()}}


def build(cfg: NormalizeConfig, documents: list[Path], out: Path, mapper=None) -> dict:
    """Normalize every shard (through mapper, e.g. a Prefect map, when given) and combine the counts."""
    if not documents:
        raise ValueError("normalize got no document shards")
    jobs = [(cfg, path, out, i) for i, path in enumerate(documents)]
    parts = mapper(jobs) if mapper else [build_shard(*job) for job in jobs]
    stats = combine(parts, cfg.examples_per_reason)
    if not stats["documents_out"]:
        raise EmptyCorpusError(
            f"normalize dropped all {stats['documents_in']} documents of {documents[0].parent}: "
            + ", ".join(f"{k}={v}" for k, v in Counter(stats["dropped"]).most_common())
            + f"; check normalize.languages ({cfg.languages}), min_chars ({cfg.min_chars}), "
            f"min_lang_confidence ({cfg.min_lang_confidence}) and normalize.quality"
        )
    log.info("normalize: kept %d of %d; dropped %s", stats["documents_out"], stats["documents_in"], stats["dropped"])
    return stats


@task(name="normalize-shard", **unit_options())
def normalize_shard(cfg: NormalizeConfig, documents: Path, out: Path, index: int) -> dict:
    """One shard of the normalize stage (mapped by the normalize task; counts only, no data)."""
    return build_shard(cfg, documents, out, index)


def _map_shards(jobs: list[tuple]) -> list[dict]:
    return map_units(normalize_shard, jobs)


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.normalize", "tasks.text.pii", "tasks.text.quality")


@task(name="normalize", **stage.task_options(*CODE))
def normalize(cfg: NormalizeConfig, deduped: stage.Manifest, workdir: str) -> stage.Manifest:
    """Clean, language-filter and length-filter the deduplicated documents."""
    m = stage.run_stage("normalize", cfg, [deduped], workdir,
                        lambda out, key: build(cfg, stage.shards(deduped.folder), out, _map_shards),
                        CODE)
    publish_counts("normalize", m)
    return m
