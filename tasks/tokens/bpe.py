"""The byte-level BPE: trained from a bounded, seeded sample of the corpus, encoded fast with tiktoken."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.chat import SPECIAL_TOKENS

log = logging.getLogger("forja.tokenize")


def train_tokenizer(texts: Iterable[str], cfg) -> Tokenizer:
    """Byte-level BPE: every byte is in the alphabet, so any text encodes and decodes exactly.

    texts may be any iterable (build passes sample_texts, a generator), so the trainer never
    needs the corpus in memory, only its own word counts of the sample."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts) if isinstance(texts, list) else None)
    return tok


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """A document's split depends only on its text, so it is stable across crawls."""
    h = hashlib.sha1(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def text_bytes(path: Path) -> int:
    """The size of a shard's text column as Parquet's footer states it (uncompressed), read without the data."""
    md = pq.ParquetFile(path).metadata
    col = md.schema.to_arrow_schema().get_field_index("text")
    if col < 0:
        raise ValueError(f"{path} has no 'text' column: is it a normalize shard?")
    return sum(md.row_group(g).column(col).total_uncompressed_size for g in range(md.num_row_groups))


def sample_texts(documents: list[Path], budget: int, val_fraction: float, seed: int,
                 batch_rows: int = 1024) -> Iterator[str]:
    """Training documents for the BPE: a seeded sample of at most `budget` UTF-8 bytes, spread over
    every shard in proportion to its size (each shard's share drawn row by row with a probability
    that fills it, the document that overflows it cut to fit), validation documents left out.

    Memory: one batch of rows. When the sample is the whole corpus and it has no validation document,
    the corpus's last document is left out too: build holds it out for validation (tiny corpora).
    """
    sizes = [text_bytes(f) for f in documents]
    total = sum(sizes)
    complete, saw_val, pending = True, False, None
    for i, (path, size) in enumerate(zip(documents, sizes)):
        left = budget * size // total if total else 0
        p = min(1.0, left / size) if size else 0.0
        complete &= p >= 1.0
        rng = np.random.default_rng([seed, i])
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["text"]):
            texts = batch.column(0).to_pylist()
            for text, draw in zip(texts, rng.random(len(texts))):
                if draw >= p or text is None:
                    continue
                if is_validation(text, val_fraction, seed):
                    saw_val = True
                    continue
                raw = text.encode()
                if len(raw) > left:
                    complete, text = False, raw[:left].decode("utf-8", "ignore")
                    raw = text.encode()
                left -= len(raw)
                if pending is not None:
                    yield pending
                pending = text
                if left <= 0:
                    break
            if left <= 0:
                break
    if pending is not None and not (complete and not saw_val):
        yield pending


# The GPT-2 split that tokenizers' ByteLevel pre-tokenizer applies (use_regex=True).
BYTE_LEVEL_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def fast_encoder(tok: Tokenizer):
    """The trained byte-level BPE as a tiktoken Encoding: the same merges, many times faster.

    tiktoken ranks a merge by the id of the token it makes; the BPE trainer gives merged
    tokens ids in merge order, after the byte alphabet, so the ranks agree. Callers still
    compare ids on a sample (see Encoder) and keep tokenizers' ids if anything differs.
    """
    import tiktoken

    byte_of = {ch: b for b, ch in pre_tokenizers_byte_map().items()}
    specials = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    ranks = {bytes(byte_of[ch] for ch in token): i for token, i in tok.get_vocab().items() if token not in specials}
    return tiktoken.Encoding(name="forja-bpe", pat_str=BYTE_LEVEL_SPLIT, mergeable_ranks=ranks, special_tokens=specials)


def pre_tokenizers_byte_map() -> dict[int, str]:
    """Byte value -> the printable character byte-level BPE writes for it (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Encoder:
    """Token ids of texts, batch after batch: tiktoken over the trained merges (on `threads`
    threads, default every core), checked against tokenizers on the first texts it sees (about
    check_bytes of them); on any difference, or if tiktoken cannot take the vocabulary,
    tokenizers encodes everything."""

    def __init__(self, tok: Tokenizer, check_bytes: int = 200_000, threads: int | None = None):
        self.tok, self.check_bytes, self.checked = tok, check_bytes, False
        self.threads = threads or os.cpu_count() or 1
        try:
            self.fast = fast_encoder(tok)
        except Exception as e:  # e.g. a vocabulary tiktoken cannot take
            log.warning("tokenize: fast encoder unavailable (%s); using tokenizers", e)
            self.fast = None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None and not self.checked:
            sample, size = [], 0
            for t in texts:
                if size >= self.check_bytes:
                    break
                sample.append(t[: self.check_bytes])
                size += len(sample[-1])
            if self.fast.encode_ordinary_batch(sample, num_threads=self.threads) != self._slow(sample):
                log.warning("tokenize: fast encoder disagrees with tokenizers on the sample; using tokenizers")
                self.fast = None
            self.checked = True
        if self.fast is None:
            return self._slow(texts)
        return self.fast.encode_ordinary_batch(texts, num_threads=self.threads)

    def _slow(self, texts: list[str]) -> list[list[int]]:
        """tokenizers' ids: its batch call (its own thread pool) where every core is ours, else one by one."""
        if self.threads > 1:
            return [e.ids for e in self.tok.encode_batch(texts)]
        return [self.tok.encode(t).ids for t in texts]


def encode_all(tok: Tokenizer, texts: list[str], check_bytes: int = 200_000) -> list[list[int]]:
    """Token ids of every text (see Encoder)."""
    return Encoder(tok, check_bytes)(texts)
