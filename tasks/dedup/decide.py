"""The dedupe decision, a batch of documents at a time, in input order.

Documents are visited in order, so the first of a group is kept; documents indexed by earlier
runs come before all of them. The batch's index reads happen up front (DedupeIndex.lookup and
signatures: a few Redis round trips for the whole batch), the decisions then run in Python
against those answers plus what earlier documents of the same batch added, and the batch's
writes go out together (flush). The result is the same as deciding one document at a time
against the index, whatever the batch size and whichever index (memory or Redis) is used.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from tasks.config import DedupeConfig
from tasks.dedup.dedupe_index import DedupeIndex


def decide_batch(index: DedupeIndex, cfg: DedupeConfig, ids: list[str], sigs: np.ndarray, digests: list[bytes],
                 tally: Counter, urls: list[str] | None = None) -> dict[int, tuple[str, str, float]]:
    """Removals by position in the batch: (id it duplicates, kind, similarity).

    LSH candidates are confirmed by their signature Jaccard before a document is removed,
    which is why the bands are tuned for recall. Kinds: "exact", "near", and "seen" (an id
    this run already had, or, in new_only mode, a document kept before with the same text).
    tally counts the kept documents as "new", "changed" (an indexed id whose text changed)
    or "unchanged". With urls, the kept documents' urls are recorded for removed.parquet.
    """
    bands = index.bands(sigs)
    run, base = index.lookup(ids, digests, bands)
    run_sigs, base_sigs = index.signatures(set().union(*run.candidates),
                                           set().union(*base.candidates) if base is not None else set())
    # What earlier documents of this batch added to the run's store (not flushed yet).
    local_sigs: dict[str, np.ndarray] = {}
    local_exact: dict[bytes, str] = {}
    local_bands = [defaultdict(set) for _ in index.lsh.hashtables]
    local_seen: set[str] = set()
    adds, kept = [], []
    removed: dict[int, tuple[str, str, float]] = {}
    masked = index.masked

    for i, (key, row, digest, kb) in enumerate(zip(ids, sigs, digests, bands)):
        if run.seen[i] or key in local_seen:  # the same id twice in one input: keep the first
            removed[i] = (key, "seen", 1.0)
            continue
        local_seen.add(key)
        changed = False
        # The run's store holds only ids this run has seen (caught above), so an indexed id is
        # a persistent one.
        if base is not None and base.has[i] and key not in masked:  # kept by an earlier run
            if base.digest_of_id[i] == digest:
                if cfg.incremental == "new_only":
                    removed[i] = (key, "seen", 1.0)
                else:
                    tally["unchanged"] += 1
                    kept.append(i)
                continue
            index.mask(key)  # its text changed: compare the new text with the others, not itself
            changed = True
        dup = local_exact.get(digest) or run.exact[i]
        if dup is None and base is not None and base.exact[i] not in masked:
            dup = base.exact[i]
        if dup is not None:
            removed[i] = (dup, "exact", 1.0)
            continue
        found = set(run.candidates[i])
        for band, table in zip(kb, local_bands):
            found |= table.get(band, set())
        from_base = base.candidates[i] - masked - found if base is not None else set()
        best, best_sim = None, 0.0
        for cand in found | from_base:
            sig = local_sigs.get(cand)
            if sig is None:
                sig = run_sigs.get(cand) if cand in found else base_sigs.get(cand)
            if sig is None:  # not an indexed id: nothing to compare
                continue
            sim = float(np.count_nonzero(sig == row)) / cfg.num_perm
            if sim >= cfg.threshold and (sim > best_sim or (sim == best_sim and cand < best)):
                best, best_sim = cand, sim
        if best is not None:
            removed[i] = (best, "near", best_sim)
            continue
        local_sigs[key] = row
        if digest:
            local_exact[digest] = key
        for band, table in zip(kb, local_bands):
            table[band].add(key)
        adds.append((key, digest, row, kb))
        kept.append(i)
        tally["changed" if changed else "new"] += 1
    index.flush(adds, ids, [(ids[i], urls[i]) for i in kept] if urls is not None else [])
    return removed
