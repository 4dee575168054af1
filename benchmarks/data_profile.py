"""Where forja's data stages spend CPU, per document, in one process (no Prefect, no pool).

    .venv/bin/python benchmarks/data_profile.py [--mb 4] [--docs 300]

Reads --docs pages of the benchmark corpus (benchmarks/corpus.py) and times, in CPU seconds
(time.process_time: steady on a busy machine), each step a page goes through: WARC read,
trafilatura extraction, ftfy/NFC cleaning, langdetect, the quality rules, PII scrubbing, MinHash
signatures, BPE training and encoding. Prints ms per document for each, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import corpus  # noqa: E402


def timed(fn, items):
    t = time.process_time()
    out = [fn(x) for x in items]
    return out, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=4)
    ap.add_argument("--docs", type=int, default=300)
    args = ap.parse_args()
    from tasks.config import DedupeConfig, NormalizeConfig, TokenizeConfig
    from tasks.dedupe import signature_matrix
    from tasks.ingest.documents import extract
    from tasks.ingest.warc import read_warc
    from tasks.normalize import clean, language
    from tasks.text.pii import scrub
    from tasks.text.quality import failed_rule
    from tasks.tokens.bpe import train_tokenizer

    meta = corpus.build(args.mb, ROOT / "benchmarks/.cache")
    folder = Path(meta["folder"])
    t = time.process_time()
    rows = []
    for name in meta["files"]:
        for row in read_warc(folder / name, Counter()):
            rows.append(row)
            if len(rows) >= args.docs:
                break
        if len(rows) >= args.docs:
            break
    sec = {"warc_read": time.process_time() - t}
    htmls = [r["body"].decode("utf-8", "replace") for r in rows]
    texts, sec["extract"] = timed(lambda h: extract(h, "https://x/")[0], htmls)
    ncfg = NormalizeConfig()
    cleaned, sec["clean_ftfy"] = timed(clean, texts)
    _, sec["langdetect"] = timed(lambda x: language(x, 0), cleaned)
    _, sec["quality"] = timed(lambda x: failed_rule(x, ncfg.quality), cleaned)
    _, sec["pii"] = timed(scrub, cleaned)
    t = time.process_time()
    signature_matrix(cleaned, DedupeConfig())
    sec["minhash"] = time.process_time() - t
    t = time.process_time()
    tok = train_tokenizer(cleaned, TokenizeConfig())
    sec["bpe_train"] = time.process_time() - t
    _, sec["encode"] = timed(lambda x: tok.encode(x).ids, cleaned)
    n = len(rows)
    per_doc = {k: round(1000 * v / n, 2) for k, v in sec.items()}
    for k, v in per_doc.items():
        print(f"{k:12s} {v:8.2f} ms/doc")
    print(json.dumps({"docs": n, "ms_per_doc": per_doc, "total_ms_per_doc": round(sum(per_doc.values()), 2)}))


if __name__ == "__main__":
    main()
