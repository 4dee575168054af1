"""Vocabulary choice: BPEs of several sizes, trained on the stage's bounded sample, compared on validation text.

For each size in tokenize.compare_vocab_sizes (and the stage's own tokenizer, the chosen one) it
measures, on a bounded seeded slice of the validation documents: bytes per token (how much text a
token carries), the share of the vocabulary the text uses (how many ids are dead weight), and the
share of whitespace-separated words split into more than tokenize.split_tokens tokens (how often a
word is shredded). The sample is drawn from the corpus once and kept in a temporary file, so each
size costs one BPE training on it and one encoding of the validation slice, never a corpus read.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from model.chat import SPECIAL_TOKENS
from tasks.tokens.bpe import is_validation, sample_texts, train_tokenizer

log = logging.getLogger("forja.tokenize")

# The smallest vocabulary a byte-level BPE can have: every byte, plus forja's reserved tokens.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
VAL_BYTES = 2_000_000  # the validation text the sizes are measured on (a seeded slice of the val split)
WORD = re.compile(r"\S+")
FILES = ("vocab_compare.json", "vocab_compare.md", "vocab_compare.png")


def check_sizes(cfg) -> list[int]:
    """The sizes to compare (compare_vocab_sizes plus vocab_size, sorted), or a ValueError naming a bad one."""
    for v in cfg.compare_vocab_sizes:
        if v < MIN_VOCAB:
            raise ValueError(f"tokenize.compare_vocab_sizes has {v}: below the byte-level BPE's minimum of {MIN_VOCAB} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens); use sizes >= {MIN_VOCAB}")
    return sorted({*cfg.compare_vocab_sizes, cfg.vocab_size})


def validation_texts(documents: list[Path], cfg, budget: int = VAL_BYTES) -> list[str]:
    """At most `budget` UTF-8 bytes of validation documents (the split build uses), shards visited in a
    seeded order. A corpus without any holds out its last document, as build does for tiny corpora."""
    order = np.random.default_rng([cfg.seed, 15]).permutation(len(documents))
    texts, left, last = [], budget, None
    for i in order:
        for batch in pq.ParquetFile(documents[i]).iter_batches(batch_size=1024, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    continue
                last = text
                if not is_validation(text, cfg.val_fraction, cfg.seed):
                    continue
                raw = text.encode()[:left]
                texts.append(raw.decode("utf-8", "ignore"))
                left -= len(raw)
                if left <= 0:
                    return texts
    return texts or ([last.encode()[:budget].decode("utf-8", "ignore")] if last else [])


def fragmented_words(text: str, offsets: list[tuple[int, int]], limit: int) -> tuple[int, int]:
    """(words, words covered by more than `limit` tokens) of one text, from its tokens' character spans.

    A token overlaps a word when it starts before the word ends and ends after it starts; the spans
    are in text order, so two binary searches count them for every word at once."""
    spans = np.array([(m.start(), m.end()) for m in WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)
    if not len(spans):
        return 0, 0
    tok = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = np.sort(tok[:, 0]), np.sort(tok[:, 1])
    count = np.searchsorted(starts, spans[:, 1], "left") - np.searchsorted(ends, spans[:, 0], "right")
    return len(spans), int((count > limit).sum())


def measure(tok: Tokenizer, texts: list[str], split_tokens: int) -> dict:
    """Bytes per token, vocabulary used and fragmented-word share of one tokenizer on texts."""
    n_bytes = n_tokens = n_words = n_split = 0
    used: set[int] = set()
    for text, enc in zip(texts, tok.encode_batch(texts)):
        n_bytes += len(text.encode())
        n_tokens += len(enc.ids)
        used.update(enc.ids)
        w, s = fragmented_words(text, enc.offsets, split_tokens)
        n_words += w
        n_split += s
    vocab = tok.get_vocab_size()
    return {"vocab_size": vocab, "bytes_per_token": n_bytes / max(n_tokens, 1), "vocab_used": len(used),
            "vocab_used_fraction": len(used) / vocab, "fragmented_words": n_split / max(n_words, 1),
            "words": n_words, "tokens": n_tokens}


def kept_sample(documents: list[Path], cfg, folder: Path) -> Path:
    """The BPE's training sample (sample_texts, the same draw build trains on), written once as JSON lines."""
    path = folder / "sample.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for text in sample_texts(documents, cfg.train_sample_bytes, cfg.val_fraction, cfg.seed):
            f.write(json.dumps(text) + "\n")
    return path


def read_sample(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def compare(cfg, documents: list[Path], out: Path, chosen: Tokenizer) -> dict:
    """Train a BPE per compared size on the bounded sample, measure each and the stage's own tokenizer
    (chosen) on validation text, and write vocab_compare.json/.md/.png into out. Returns the stats."""
    sizes = check_sizes(cfg)
    # The size asked for (a tiny corpus may give the BPE fewer merges); a registered version's tokenizer: its own.
    chosen_size = chosen.get_vocab_size() if cfg.tokenizer_from else cfg.vocab_size
    texts = validation_texts(documents, cfg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forja-vocab-") as tmp:
        sample = None
        for size in sizes:
            if size == chosen_size:
                tok = chosen
            else:
                sample = sample or kept_sample(documents, cfg, Path(tmp))
                log.info("tokenize: comparing vocabulary size %d", size)
                tok = train_tokenizer(read_sample(sample), cfg.model_copy(update={"vocab_size": size}))
            rows.append({"requested": size, **measure(tok, texts, cfg.split_tokens), "chosen": size == chosen_size})
    if chosen_size not in sizes:  # a registered version's tokenizer (tokenizer_from): its own size
        rows.append({"requested": chosen_size, **measure(chosen, texts, cfg.split_tokens), "chosen": True})
        rows.sort(key=lambda r: r["requested"])
    result = {"chosen": chosen_size, "split_tokens": cfg.split_tokens, "val_documents": len(texts),
              "val_bytes": sum(len(t.encode()) for t in texts), "sizes": rows}
    (out / "vocab_compare.json").write_text(json.dumps(result, indent=2))
    (out / "vocab_compare.md").write_text(markdown(result))
    plot(result, out / "vocab_compare.png")
    return {"chosen": chosen_size, **{str(r["requested"]): {k: r[k] for k in (
        "bytes_per_token", "vocab_used_fraction", "fragmented_words")} for r in rows}}


def markdown(result: dict) -> str:
    """The comparison as a markdown table, the chosen size marked ("trained to": the size the BPE reached,
    smaller than asked when the sample has too few distinct pairs to merge)."""
    n = result["split_tokens"]
    lines = [f"# Vocabulary sizes on {result['val_bytes']:,} bytes of validation text", "",
             f"| vocabulary | trained to | bytes/token | vocabulary used | words split into > {n} tokens |",
             "|---|---|---|---|---|"]
    for r in result["sizes"]:
        mark = " **(chosen)**" if r["chosen"] else ""
        lines.append(f"| {r['requested']:,}{mark} | {r['vocab_size']:,} | {r['bytes_per_token']:.3f} | "
                     f"{r['vocab_used_fraction']:.1%} | {r['fragmented_words']:.2%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, png: Path) -> None:
    """Bytes per token and the fragmented-word share against vocabulary size (log scale), chosen size marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    x = [r["requested"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((a, "bytes_per_token", "bytes per token"),
                           (b, "fragmented_words", f"share of words in > {result['split_tokens']} tokens")):
        ax.plot(x, [r[key] for r in rows], "o-")
        ax.axvline(result["chosen"], color="tab:red", ls="--", label=f"chosen ({result['chosen']:,})")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="vocabulary size", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("forja: vocabulary sizes on the validation split")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def publish(stats: dict) -> None:
    """The comparison as a Prefect table artifact (a view: never fails the stage)."""
    from prefect.artifacts import create_table_artifact

    rows = [{"vocabulary": k, "chosen": k == str(stats["chosen"]), **v} for k, v in stats.items() if k != "chosen"]
    try:
        create_table_artifact(key="tokenize-vocab-compare", table=rows,
                              description="vocabulary sizes compared on the validation split (chosen marked)")
    except Exception as e:
        log.warning("could not publish the vocabulary comparison: %s", e)
