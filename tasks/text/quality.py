"""Document quality rules in the spirit of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).

Each rule returns the name of the first rule a text fails, or None. Thresholds come
from normalize.quality in the config.
"""
from __future__ import annotations

import re
from collections import Counter

from tasks.config import QualityConfig

_WORD = re.compile(r"\w+", re.UNICODE)
_BULLETS = ("-", "*", "•", "·", "–", "‣", "○")


def _dup_fraction(items: list[str]) -> float:
    """Fraction of characters in items that repeat an earlier item."""
    seen, dup, total = set(), 0, 0
    for it in items:
        total += len(it)
        if it in seen:
            dup += len(it)
        seen.add(it)
    return dup / total if total else 0.0


def _ngram_fractions(words: list[str], n: int) -> tuple[float, float]:
    """(share of characters in the most common n-gram, share in n-grams seen more than once)."""
    if len(words) < n:
        return 0.0, 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    total = sum(len(w) for w in words)
    top, c = counts.most_common(1)[0]
    top_frac = (sum(map(len, top)) * c) / total if c > 1 else 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    dup_frac = sum(len(w) for w, cov in zip(words, covered) if cov) / total
    return top_frac, dup_frac


def failed_rule(text: str, q: QualityConfig) -> str | None:
    """The first quality rule text breaks, or None when it passes them all."""
    words = _WORD.findall(text)
    n = len(words)
    if n < q.min_words:
        return "too_few_words"
    if n > q.max_words:
        return "too_many_words"
    mean_len = sum(map(len, words)) / n
    if not q.min_mean_word_length <= mean_len <= q.max_mean_word_length:
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > q.max_symbol_word_ratio:
        return "symbol_ratio"
    digits = sum(c.isdigit() for c in text)
    if digits / max(len(text), 1) > q.max_digit_ratio:
        return "digit_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > q.max_ellipsis_lines:
            return "ellipsis_lines"
        if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > q.max_bullet_lines:
            return "bullet_lines"
        if _dup_fraction(lines) > q.max_duplicate_line_chars:
            return "repeated_lines"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if _dup_fraction(paragraphs) > q.max_duplicate_paragraph_chars:
        return "repeated_paragraphs"
    lower = [w.lower() for w in words]
    top2, _ = _ngram_fractions(lower, 2)
    if top2 > q.max_top_2gram_chars:
        return "repeated_ngrams"
    _, dup5 = _ngram_fractions(lower, 5)
    if dup5 > q.max_duplicate_5gram_chars:
        return "repeated_ngrams"
    return None
