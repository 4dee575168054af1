"""tokenize: train a byte-level BPE on the clean corpus and pack it into token shards.

(The module is not called tokenize.py so that it can never shadow the standard
library's tokenize module.)
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.chat import EOT, SPECIAL_TOKENS
from model.faults import fault_point
from tasks import stage
from tasks.config import TokenizeConfig
from tasks.reports import publish_counts

log = logging.getLogger("forja.tokenize")


def train_tokenizer(texts: list[str], cfg: TokenizeConfig) -> Tokenizer:
    """Byte-level BPE: every byte is in the alphabet, so any text encodes and decodes exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


# The GPT-2 split that tokenizers' ByteLevel pre-tokenizer applies (use_regex=True).
BYTE_LEVEL_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def fast_encoder(tok: Tokenizer):
    """The trained byte-level BPE as a tiktoken Encoding: the same merges, many times faster.

    tiktoken ranks a merge by the id of the token it makes; the BPE trainer gives merged
    tokens ids in merge order, after the byte alphabet, so the ranks agree. Callers still
    compare ids on a sample (see encode_all) and keep tokenizers' ids if anything differs.
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


def encode_all(tok: Tokenizer, texts: list[str], check_bytes: int = 200_000) -> list[list[int]]:
    """Token ids of every text: tiktoken over the trained merges (all cores), checked against
    tokenizers on the first texts (about check_bytes of them); on any difference, tokenizers
    encodes everything."""
    try:
        fast = fast_encoder(tok)
    except Exception as e:  # e.g. a vocabulary tiktoken cannot take
        log.warning("tokenize: fast encoder unavailable (%s); using tokenizers", e)
        return [enc.ids for enc in tok.encode_batch(texts)]
    sample, size = [], 0
    for t in texts:
        if size >= check_bytes:
            break
        sample.append(t[:check_bytes])
        size += len(sample[-1])
    if fast.encode_ordinary_batch(sample) != [enc.ids for enc in tok.encode_batch(sample)]:
        log.warning("tokenize: fast encoder disagrees with tokenizers on the sample; using tokenizers")
        return [enc.ids for enc in tok.encode_batch(texts)]
    return fast.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """A document's split depends only on its text, so it is stable across crawls."""
    h = hashlib.sha1(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def pack(tok: Tokenizer, texts: list[str], seq_len: int, encoded: list[list[int]] | None = None) -> np.ndarray:
    """Documents joined by <|endoftext|> and cut into rows of seq_len + 1 tokens.

    Consecutive rows overlap by one token, so each row holds its own inputs and
    next-token targets; the incomplete tail is dropped. encoded: the texts' ids, if known.
    """
    eot = tok.token_to_id(EOT)
    ids = encoded if encoded is not None else encode_all(tok, texts)
    stream = [i for doc in ids for i in (*doc, eot)]
    arr = np.asarray(stream, dtype=np.int64)
    n = (len(arr) - 1) // seq_len
    return np.stack([arr[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]) if n else np.zeros((0, seq_len + 1), np.int64)


def write_shards(rows: np.ndarray, out: Path, split: str, shard_rows: int, vocab: int) -> list[str]:
    """Parquet shards with a fixed-size list column of the smallest integer type that fits."""
    dtype, atype = (np.uint16, pa.uint16()) if vocab <= 2**16 else (np.uint32, pa.uint32())
    names = []
    for s, start in enumerate(range(0, max(len(rows), 1), shard_rows)):
        chunk = rows[start : start + shard_rows].astype(dtype)
        col = pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel(), type=atype), rows.shape[1])
        name = f"{split}-{s:05d}.parquet"
        pq.write_table(pa.table({"tokens": col}), out / name, compression="zstd")
        names.append(name)
        fault_point("tokenize:shard-written")  # the fault tests kill here: a stage with some shards written
    return names


def preview(tok: Tokenizer, text: str, limit: int = 400) -> str:
    """A paragraph with its token boundaries marked by '|', to eyeball the vocabulary."""
    enc = tok.encode(text[:limit])
    return "|".join(text[a:b] for a, b in enc.offsets) + "\n"


_COLOURS = ("#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d7f2e3")


def token_html(tok: Tokenizer, text: str, limit: int = 1200) -> str:
    """An HTML page colouring each token's span of a paragraph; hovering shows its id."""
    import html

    text = text[:limit]
    enc = tok.encode(text)
    spans = [
        f'<span style="background:{_COLOURS[i % len(_COLOURS)]}" title="id {tid}">{html.escape(text[a:b])}</span>'
        for i, (tid, (a, b)) in enumerate(zip(enc.ids, enc.offsets))
    ]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>forja tokens</title></head>"
            "<body style='font-family:monospace;white-space:pre-wrap;line-height:1.8'>"
            f"<p>{len(enc.ids)} tokens for {len(text.encode())} bytes "
            f"({len(text.encode()) / max(len(enc.ids), 1):.2f} bytes/token); each colour is one token.</p>"
            + "".join(spans) + "</body></html>\n")


def vocabulary_report(tok: Tokenizer, texts: list[str], encoded: list[list[int]]) -> dict:
    """How well the vocabulary fits held-out text (encoded: its ids): bytes per token, share used.

    The eot-inclusive figure the evaluation uses for bits per byte counts one separator
    token and byte per document on top of these.
    """
    ids = [i for doc in encoded for i in doc]
    n_bytes = sum(len(t.encode()) for t in texts)
    used = len(set(ids))
    return {"val_bytes_per_token": (n_bytes + len(texts)) / (len(ids) + len(texts)),
            "val_bytes_per_token_text": n_bytes / max(len(ids), 1), "vocab_used": used,
            "vocab_used_fraction": used / tok.get_vocab_size()}


def base_tokenizer(base: dict, workdir: str, out: Path) -> Tokenizer:
    """The tokenizer of a registered version (downloaded, its weights sha256 checked), saved in out."""
    import tempfile

    from tasks.models.tracking import download_base

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(download_base(base, workdir, Path(tmp)) / "tokenizer.json", out / "tokenizer.json")
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def build(cfg: TokenizeConfig, documents: list[Path], out: Path, base: dict | None = None,
          workdir: str | None = None) -> dict:
    texts = [t for f in documents for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    val = [t for t in texts if is_validation(t, cfg.val_fraction, cfg.seed)]
    train = [t for t in texts if not is_validation(t, cfg.val_fraction, cfg.seed)]
    if not val:  # tiny corpora: still hold one document out
        val, train = train[-1:], train[:-1]
    if not train:
        raise ValueError(f"{len(texts)} document(s) in the normalize output: too few to split into train and validation")
    if base:  # the weights this run starts from only make sense with their own tokenizer
        tok = base_tokenizer(base, workdir, out)
        log.info("tokenize: encoding %d documents with the tokenizer of %s (vocab %d)", len(texts), base["version"],
                 tok.get_vocab_size())
    else:
        log.info("tokenize: training BPE (vocab %d) on %d documents", cfg.vocab_size, len(train))
        tok = train_tokenizer(train, cfg)
        tok.save(str(out / "tokenizer.json"))
    val_ids = encode_all(tok, val)  # encoded once: packing and the report
    train_rows, val_rows = pack(tok, train, cfg.seq_len), pack(tok, val, cfg.seq_len, val_ids)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise ValueError(
            f"too little text for sequences of {cfg.seq_len} tokens ({len(train_rows)} train, {len(val_rows)} "
            "validation rows): lower tokenize.seq_len or raise tokenize.val_fraction"
        )
    vocab = tok.get_vocab_size()
    write_shards(train_rows, out, "train", cfg.shard_rows, vocab)
    write_shards(val_rows, out, "val", cfg.shard_rows, vocab)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    np.save(out / "train.npy", train_rows.astype(dtype))  # the memory-mapped copy the loader reads
    np.save(out / "val.npy", val_rows.astype(dtype))
    (out / "preview.txt").write_text(preview(tok, val[0]))
    (out / "tokens.html").write_text(token_html(tok, val[0]), encoding="utf-8")
    return {
        "vocab_size": vocab, "seq_len": cfg.seq_len, "documents": {"train": len(train), "val": len(val)},
        "rows": {"train": len(train_rows), "val": len(val_rows)},
        "tokens": {"train": int(train_rows.shape[0] * cfg.seq_len), "val": int(val_rows.shape[0] * cfg.seq_len)},
        **vocabulary_report(tok, val, val_ids), "tokenizer_from": base,
    }


# The modules whose source is part of this stage's key (and of Prefect's cache key).
CODE = ("tasks.tokenization",)


@task(name="tokenize", **stage.task_options(*CODE))
def tokenize(cfg: TokenizeConfig, normalized: stage.Manifest, workdir: str, base: dict | None = None) -> stage.Manifest:
    """Train the tokenizer (or take a registered version's: base, from tasks.pretrain.init_base, which
    the flow resolves so that the key holds its weights' sha256) and write packed token shards."""
    if cfg.tokenizer_from and not base:
        raise ValueError(f"tokenize.tokenizer_from is {cfg.tokenizer_from}: pass base=init_base(...) for it")
    key_cfg = cfg.model_dump(mode="json") | ({"base": base} if base else {})
    m = stage.run_stage("tokenize", key_cfg, [normalized], workdir,
                        lambda out, key: build(cfg, stage.shards(normalized.folder), out, base, workdir), CODE)
    publish_counts("tokenize", m)
    publish_tokens(m)
    return m


def publish_tokens(m: stage.Manifest) -> None:
    """The token visualisation in the Prefect UI (the same HTML is logged to MLflow by pretrain)."""
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(key="tokenize-tokens", markdown=m.path("tokens.html").read_text(encoding="utf-8"),
                                 description=f"token boundaries of a validation paragraph ({m.key})")
    except Exception as e:  # a view; never fail the stage over it
        log.warning("could not publish the token visualisation: %s", e)
