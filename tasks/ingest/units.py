"""The crawl's file sources as units of work: one WARC file, JSONL file, Parquet file or folder each.

plan() lists the units in source order (warc, folders, jsonl, parquet; a Parquet glob expands
to its files, sorted). read_unit() turns one into Parquet shards `unit-IIIII-NNNNN.parquet`
in the stage's temp folder (each written atomically) and returns small counts, so units can
run anywhere (a process here, a Dask worker) and in any order. assemble() then renames the
shards, in source order, to the stage's `documents-NNNNN.parquet` (no copy), keeping the first
of documents with the same id across sources: it reads only the id column of each shard, and
holds the ids seen so far (the one thing that grows with the corpus: ~70 bytes a document).
"""
from __future__ import annotations

import glob
import hashlib
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks import stage
from tasks.config import CrawlConfig
from tasks.ingest import sources
from tasks.ingest.documents import DOC_SCHEMA, DocumentSink, doc_bytes, to_document

_GLOB = set("*?[")


def parquet_files(pattern: str) -> list[str]:
    """The files of one crawl.parquet path: itself, or the sorted matches of a glob (none is an error)."""
    if not _GLOB & set(pattern):
        return [pattern]
    found = sorted(glob.glob(pattern, recursive=True))
    if not found:
        raise FileNotFoundError(f"crawl.parquet: no file matches {pattern!r}")
    return found


def plan(cfg: CrawlConfig) -> list[tuple[str, str, str | None, str | None]]:
    """(kind, path, text_field, id_field) of every file unit, in source order."""
    out = [("warc", p, None, None) for p in cfg.warc] + [("folder", p, None, None) for p in cfg.folders]
    out += [("jsonl", j.path, j.text_field, j.id_field) for j in cfg.jsonl]
    out += [("parquet", f, s.text_field, s.id_field) for s in cfg.parquet for f in parquet_files(s.path)]
    return out


def _rows(cfg: CrawlConfig, kind: str, path: Path, text_field: str | None, id_field: str | None, counts: Counter):
    cap, file_cap = cfg.max_body_bytes, cfg.max_file_bytes  # one size limit for every document
    if kind == "warc":
        return sources.read_warc(path, counts, cap, file_cap)
    if kind == "folder":
        return sources.read_folder(path, counts, cap, file_cap)
    if kind == "jsonl":
        return sources.read_jsonl(path, text_field, id_field, counts, cap, file_cap)
    if kind == "parquet":
        return sources.read_parquet(path, text_field, id_field, counts, cap, file_cap)
    raise ValueError(f"unknown crawl source kind {kind!r}")


def read_unit(cfg: CrawlConfig, kind: str, path: str, text_field: str | None, id_field: str | None,
              index: int, folder: str) -> dict:
    """Write unit `index`'s documents as shards unit-IIIII-NNNNN.parquet into folder; return its
    counts, shards (name, rows, digest) and text size. Rerunning it rewrites the same files."""
    counts: Counter = Counter()
    sink = DocumentSink(Path(folder), cfg.shard_docs, prefix=f"unit-{index:05d}")
    try:
        for raw in _rows(cfg, kind, Path(path), text_field, id_field, counts):
            doc, _ = to_document(raw, kind, 0, cfg, counts)
            if doc is not None and sink.append(doc):
                counts[f"{kind}_documents"] += 1
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return {"index": index, "kind": kind, "counts": dict(counts), "files": sink.files, "chars": sink.chars}


def assemble(out: Path, first: DocumentSink, results: list[dict], counts: Counter) -> dict:
    """Name the units' shards documents-NNNNN.parquet after first's (the web crawl's), in unit
    order; a document whose id came before is dropped (its shard rewritten without it).
    Returns documents, text_chars and content_digest (over the shards' digests, in order)."""
    from tasks.ingest.documents import combine_digests

    seen = set(first.ids)
    digests = [f["digest"] for f in first.files]
    n, documents, chars = len(first.files), len(first), first.chars
    for res in sorted(results, key=lambda r: r["index"]):
        counts.update(res["counts"])
        chars += res["chars"]
        for f in res["files"]:
            path = out / f["name"]
            ids = pq.read_table(path, columns=["id"]).column("id")
            fresh = pa.array([i not in seen for i in ids.to_pylist()], pa.bool_())
            seen.update(ids.to_pylist())
            final = out / stage.shard_name("documents", n)
            kept = pc.sum(fresh).as_py() or 0
            if kept == len(ids):
                os.replace(path, final)
                digests.append(f["digest"])
            else:
                table = pq.read_table(path)
                counts[f"{res['kind']}_documents"] -= len(ids) - kept
                chars -= sum(len(t) for t in pc.filter(table.column("text"), pc.invert(fresh)).to_pylist())
                table = table.filter(fresh)
                path.unlink()
                if not kept:
                    continue
                with stage.partial(final) as tmp:
                    pq.write_table(table.cast(DOC_SCHEMA), tmp, compression="zstd")
                h = hashlib.sha256()
                for doc in table.to_pylist():
                    h.update(doc_bytes(doc))
                digests.append(h.hexdigest()[:16])
            documents += kept
            n += 1
    return {"documents": documents, "text_chars": chars, "content_digest": combine_digests(digests)}
