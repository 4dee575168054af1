"""datatrove's side of benchmarks/data.py, run with benchmarks/.venv-datatrove's python.

    datatrove_run.py CORPUS_DIR OUT_DIR TOKENIZER_JSON WORKERS

The same work as forja's data stages, on datatrove 0.10.1's LocalPipelineExecutor with WORKERS
tasks and workers: WARC read, trafilatura extraction, ftfy, PII scrub, the Gopher quality and
repetition filters (thresholds set to forja's normalize.quality values; no stop-word or alphabetic-word rule,
which forja does not have; datatrove's stop words are English), MinHash dedupe (signatures, buckets,
clusters, filter), then tokenization with TOKENIZER_JSON (datatrove trains no tokenizer: it gets
the one forja trained). Language ID is left out (datatrove's needs a model download).
Prints one JSON line: seconds per phase, documents kept and removed per step, and the
extractor's timeouts (a silent trafilatura failure counts every document as a timeout).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
from datatrove.pipeline.readers import JsonlReader, WarcReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter

PT = "por"


def stats(logs: Path) -> list[dict]:
    """The merged stats.json of one executor's logging folder (one entry per pipeline step)."""
    return json.loads((logs / "stats.json").read_text())


def step(entries: list[dict], name: str) -> dict:
    for e in entries:
        if name.lower() in e["name"].lower():
            return e.get("stats", {})
    return {}


def main(corpus: str, out: str, tokenizer: str, workers: int) -> dict:
    out_dir = Path(out)
    minhash = MinhashConfig()  # 14 buckets x 8 hashes over 5-grams (datatrove's default)
    filtered, sigs, buckets = out_dir / "filtered", out_dir / "signatures", out_dir / "buckets"
    remove, tokens, logs = out_dir / "remove_ids", out_dir / "tokens", out_dir / "logs"
    times = {}

    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=[
        WarcReader(corpus, glob_pattern="*.warc.gz"),
        Trafilatura(favour_precision=False, timeout=10.0, deduplicate=False),
        FTFYFormatter(),
        PIIFormatter(),
        GopherRepetitionFilter(dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=0.3,
                               dup_para_char_frac=0.3, top_n_grams=((2, 0.2),), dup_n_grams=((5, 0.3),),
                               language=PT),
        GopherQualityFilter(min_doc_words=50, max_doc_words=200_000, min_avg_word_length=2.5,
                            max_avg_word_length=10, max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9,
                            max_ellipsis_lines_ratio=0.3, max_non_alpha_words_ratio=None, min_stop_words=None,
                            language=PT),
        JsonlWriter(str(filtered)),
        MinhashDedupSignature(output_folder=str(sigs), config=minhash, language=PT),
    ], tasks=workers, workers=workers, logging_dir=str(logs / "1-extract")).run()
    times["extract_filter_signatures"] = time.perf_counter() - t

    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(sigs), str(buckets), config=minhash)],
                          tasks=minhash.num_buckets, workers=workers, logging_dir=str(logs / "2-buckets")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(buckets), str(remove), config=minhash)],
                          tasks=1, workers=1, logging_dir=str(logs / "3-cluster")).run()
    times["dedupe_buckets_clusters"] = time.perf_counter() - t

    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(filtered)),
        MinhashDedupFilter(str(remove)),
        DocumentTokenizer(str(tokens), tokenizer_name_or_path=tokenizer, eos_token=None, save_filename="tokens"),
    ], tasks=workers, workers=workers, logging_dir=str(logs / "4-filter-tokenize")).run()
    times["dedupe_filter_tokenize"] = time.perf_counter() - t

    s1, s4 = stats(logs / "1-extract"), stats(logs / "4-filter-tokenize")
    ex = step(s1, "Trafilatura")
    rep, qual = step(s1, "Gopher Repetition"), step(s1, "Gopher Quality")
    dd, tok = step(s4, "MinHash"), step(s4, "TOKENIZER")

    def n(d: dict, key: str) -> int:
        v = d.get(key, 0)
        return int(v["total"] if isinstance(v, dict) else v)

    return {
        "seconds": times,
        "documents_read": n(step(s1, "READER"), "documents"),
        "extracted": n(ex, "forwarded"),
        "extract_timeouts": n(ex, "timeout"),
        "extract_dropped": n(ex, "dropped"),
        "quality_dropped": n(rep, "dropped") + n(qual, "dropped"),
        "after_filters": n(qual, "forwarded"),
        "dedupe_removed": n(dd, "dropped"),
        "kept": n(dd, "forwarded"),
        "tokens": n(tok, "tokens"),
        "steps": {e["name"]: {k: v for k, v in e.get("stats", {}).items() if not isinstance(v, dict) or "total" in v}
                  for e in s1 + s4},
    }


if __name__ == "__main__":
    corpus_dir, out_dir, tok, w = sys.argv[1:5]
    print(json.dumps(main(corpus_dir, out_dir, tok, int(w))))
