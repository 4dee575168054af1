"""Decontamination and duplicate removal for feedback conversations.

A conversation users rated may repeat an evaluation item word for word (someone pasted a
test question, or the answer quotes one). Training on it would inflate the very scores the
gate compares, so it is removed when a large share of its word n-grams occurs in one suite
item: share = |its n-grams found in the item| / |its n-grams|, removed when share >= the
configured overlap. A conversation shorter than n words has no n-gram; it is removed when
all its words occur, in order and contiguous, inside an item (the same rule at its length).

Suite items are read as every string in their JSON line (text, question and choices,
prompt and reference), so every suite kind is covered by one rule. Words are lower-cased
\\w+ runs, so punctuation and spacing do not hide a copy.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from tasks.evals.suites import jsonl_lines

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)}


def strings(value) -> Iterator[str]:
    """Every string inside a JSON value (dict values, list items), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def suite_items(paths: Iterable[str | Path]) -> list[str]:
    """The text of each item of the suite files (all its strings joined), in file order."""
    return [" ".join(strings(item)) for path in paths for _, item in jsonl_lines(Path(path), ValueError)]


class SuiteIndex:
    """The suites' n-grams, each mapped to the items holding it: one pass per conversation."""

    def __init__(self, items: list[str], n: int):
        self.n = n
        self.items = [" ".join(words(t)) for t in items]
        self.index: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for i, text in enumerate(self.items):
            for g in ngrams(text.split(), n):
                self.index[g].add(i)

    def overlap(self, text: str) -> float:
        """The largest share of text's n-grams found in a single suite item (0..1)."""
        tokens = words(text)
        if not tokens:
            return 0.0
        if len(tokens) < self.n:  # too short for an n-gram: contained whole in an item, or not at all
            needle = f" {' '.join(tokens)} "
            return 1.0 if any(needle in f" {item} " for item in self.items) else 0.0
        grams = ngrams(tokens, self.n)
        hits: Counter = Counter()
        for g in grams:
            hits.update(self.index.get(g, ()))
        return max(hits.values(), default=0) / len(grams)


def conversation_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def normal_key(messages: list[dict]) -> str:
    """The conversation with whitespace collapsed and case folded: equal keys are duplicates."""
    return json.dumps([[m["role"], " ".join(m["content"].split()).casefold()] for m in messages], ensure_ascii=False)


def clean(conversations: list[dict], index: SuiteIndex | None, min_overlap: float) -> tuple[list[dict], Counter]:
    """conversations ({"messages", ...}) without those that copy a suite item (`contaminated`) or
    an earlier kept one (`duplicate`), and the count of each reason."""
    kept, seen, dropped = [], set(), Counter()
    for conv in conversations:
        if index is not None and index.overlap(conversation_text(conv["messages"])) >= min_overlap:
            dropped["contaminated"] += 1
            continue
        key = normal_key(conv["messages"])
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(conv)
    return kept, dropped


def heldout_split(conversations: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): a conversation is held out when the hash of (seed, its normalised text)
    falls under fraction, so the same conversation lands on the same side in every run. With a
    fraction > 0 and two or more conversations, each side gets at least one."""
    def position(conv: dict) -> float:
        digest = hashlib.sha256(f"{seed}\0{normal_key(conv['messages'])}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    ranked = sorted(conversations, key=position)
    n_held = sum(position(c) < fraction for c in conversations)
    if fraction > 0 and len(ranked) >= 2:
        n_held = min(max(n_held, 1), len(ranked) - 1)
    held = {id(c) for c in ranked[:n_held]}
    return [c for c in conversations if id(c) not in held], [c for c in conversations if id(c) in held]
