"""One normalize shard into packed token rows: the tokenize stage's unit of work.

Each unit reads its shard in batches, splits documents into train and validation, encodes them,
packs rows of seq_len + 1 tokens per split and writes <split>-NNNNN.parquet (the exchanged form)
plus <split>-NNNNN.npy (the uncompressed copy the training loader memory-maps), NNNNN being the
shard's index. Memory is one batch of documents and one Parquet row group, whatever the shard.
"""
from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from model.chat import EOT
from model.faults import fault_point
from tasks import stage
from tasks.mapping import unit_threads
from tasks.tokens.bpe import Encoder, is_validation

SPLITS = ("train", "val")
NPY_HEADER = 128  # bytes reserved for the .npy header, rewritten with the row count at the end
PREVIEW_CHARS = 1200  # enough of the first validation document for preview.txt and tokens.html


def token_dtype(vocab: int) -> tuple[type, pa.DataType]:
    """The smallest unsigned integer type that holds every id."""
    return (np.uint16, pa.uint16()) if vocab <= 2**16 else (np.uint32, pa.uint32())


class RowPacker:
    """Documents joined by <|endoftext|> and cut into rows of seq_len + 1 tokens, fed in batches.

    Consecutive rows overlap by one token, so each row holds its own inputs and next-token
    targets; what is left after the last full row waits for the next batch (and is dropped at
    the end: the incomplete tail)."""

    def __init__(self, seq_len: int, eot: int):
        self.seq_len, self.eot = seq_len, eot
        self.buf = np.zeros(0, np.int64)

    def add(self, docs: list[list[int]]) -> np.ndarray:
        """The full rows the stream holds after these documents (possibly none)."""
        if docs:
            parts = [self.buf]
            for d in docs:
                parts += [np.asarray(d, np.int64), np.asarray([self.eot], np.int64)]
            self.buf = np.concatenate(parts)
        n = (len(self.buf) - 1) // self.seq_len if len(self.buf) else 0
        if n <= 0:
            return np.zeros((0, self.seq_len + 1), np.int64)
        rows = np.lib.stride_tricks.sliding_window_view(self.buf, self.seq_len + 1)[: n * self.seq_len : self.seq_len]
        rows = rows.copy()
        self.buf = self.buf[n * self.seq_len :]
        return rows


def pack(tok: Tokenizer, texts: list[str], seq_len: int, encoded: list[list[int]] | None = None) -> np.ndarray:
    """All rows of texts at once (encoded: their ids, if known); the unit packs batch by batch instead."""
    ids = encoded if encoded is not None else Encoder(tok)(texts)
    return RowPacker(seq_len, tok.token_to_id(EOT)).add(ids)


def npy_header(dtype, rows: int, width: int) -> bytes:
    """A version 1.0 .npy header of exactly NPY_HEADER bytes (padded with spaces, as the format allows)."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (rows, width)}
    body = repr(d).encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", NPY_HEADER - 10) + body + b" " * (NPY_HEADER - 11 - len(body)) + b"\n"


class SplitWriter:
    """One split's rows of one shard: a Parquet file (row groups of group_rows, the schema the
    stage always had: one fixed-size list column `tokens`) and its .npy copy, both streamed into
    temp names that stage.partial renames only when the unit succeeds."""

    def __init__(self, stack: contextlib.ExitStack, out: Path, name: str, width: int, vocab: int, group_rows: int):
        self.dtype, atype = token_dtype(vocab)
        self.width, self.group_rows, self.rows, self.pending = width, group_rows, 0, []
        self.schema = pa.schema([("tokens", pa.list_(atype, width))])
        self.parquet = pq.ParquetWriter(stack.enter_context(stage.partial(out / f"{name}.parquet")), self.schema,
                                        compression="zstd")
        self.npy = open(stack.enter_context(stage.partial(out / f"{name}.npy")), "wb")
        stack.callback(self.npy.close)
        self.npy.write(npy_header(self.dtype, 0, width))

    def write(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        rows = rows.astype(self.dtype)
        self.npy.write(rows.tobytes())
        self.rows += len(rows)
        self.pending.append(rows)
        if sum(len(r) for r in self.pending) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            rows = np.concatenate(self.pending)
            self.pending = []
            for start in range(0, len(rows), self.group_rows):
                chunk = rows[start : start + self.group_rows]
                col = pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel(), type=self.schema.field(0).type.value_type),
                                                        self.width)
                self.parquet.write_table(pa.table({"tokens": col}, schema=self.schema))

    def close(self) -> None:
        self._flush()
        self.parquet.close()
        self.npy.seek(0)
        self.npy.write(npy_header(self.dtype, self.rows, self.width))
        self.npy.close()


def encode_shard(cfg, documents: Path, index: int, out: Path, hold_out_last: bool = False,
                 batch_rows: int = 512) -> dict:
    """Encode and pack one normalize shard into out (where tokenizer.json already lies); return its counts.

    hold_out_last: the shard's last document goes to validation whatever its hash (the stage asks
    for it when the whole corpus has no validation document). The result is small: document, row
    and token counts, the validation bytes and tokens, the validation ids used (for vocab_used)
    and the start of the shard's first validation document (for the preview)."""
    documents, out = Path(documents), Path(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab, encode = tok.get_vocab_size(), Encoder(tok, threads=unit_threads())
    packers = {s: RowPacker(cfg.seq_len, tok.token_to_id(EOT)) for s in SPLITS}
    docs = {s: 0 for s in SPLITS}
    val_bytes = val_tokens = 0
    used, first_val = np.zeros(vocab, bool), None
    pf = pq.ParquetFile(documents)
    last = pf.metadata.num_rows - 1
    with contextlib.ExitStack() as stack:
        name = lambda s: f"{s}-{index:05d}"  # noqa: E731 - the names depend only on the shard index
        writers = {s: SplitWriter(stack, out, name(s), cfg.seq_len + 1, vocab, cfg.shard_rows) for s in SPLITS}
        seen = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["text"]):
            texts = [t or "" for t in batch.column(0).to_pylist()]
            ids = encode(texts)
            split = {s: [] for s in SPLITS}
            for j, (text, doc) in enumerate(zip(texts, ids)):
                val = is_validation(text, cfg.val_fraction, cfg.seed) or (hold_out_last and seen + j == last)
                split["val" if val else "train"].append(doc)
                if val:
                    val_bytes += len(text.encode())
                    val_tokens += len(doc)
                    used[doc] = True
                    first_val = text[:PREVIEW_CHARS] if first_val is None else first_val
            seen += len(texts)
            for s in SPLITS:
                docs[s] += len(split[s])
                writers[s].write(packers[s].add(split[s]))
        for s in SPLITS:
            writers[s].close()
    fault_point("tokenize:shard-written")  # the fault tests kill here: a stage with some shards written
    return {"documents": docs, "rows": {s: writers[s].rows for s in SPLITS}, "val_bytes": val_bytes,
            "val_tokens": val_tokens, "used": np.flatnonzero(used).tolist(), "first_val": first_val}
