"""Training-batch throughput: forja's memory-mapped loader against reading Parquet row groups.

    .venv/bin/python benchmarks/loader.py [--rows 20000] [--seconds 5]

Writes a synthetic split of packed 1,025-token rows the way the tokenize stage does
(--shards zstd Parquet shards with row groups of 1,024 rows, each with its uncompressed .npy
copy), then draws random batches of 32 x 1,024 tokens for a fixed time with:
  forja     model.data.Batches over open_rows() (the shards' memory maps chained in order)
  baseline  random rows read from one Parquet file, each needed row group decoded once per batch
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import Batches, open_rows  # noqa: E402

WIDTH, BATCH = 1025, 32


def rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(n)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        rows = np.random.default_rng(0).integers(0, 50000, size=(args.rows, WIDTH), dtype=np.uint16)
        col = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel(), pa.uint16()), WIDTH)
        pq.write_table(pa.table({"tokens": col}), folder / "train-00000.parquet", compression="zstd", row_group_size=1024)
        bounds = np.linspace(0, args.rows, args.shards + 1).astype(int)
        for i in range(args.shards):  # the per-shard .npy copies the tokenize units write
            np.save(folder / f"train-{i:05d}.npy", rows[bounds[i] : bounds[i + 1]])
        del rows, col

        batches = Batches(open_rows(sorted(folder.glob("train-*.npy"))), BATCH, seed=0)
        forja = rate(lambda k: batches.get(k), args.seconds)

        pf = pq.ParquetFile(folder / "train-00000.parquet")
        rng = np.random.default_rng(1)

        def parquet_batch(_k):
            picked = np.sort(rng.choice(args.rows, BATCH, replace=False))
            out = []
            for g in np.unique(picked // 1024):  # each needed row group decoded once per batch
                flat = pf.read_row_group(int(g), columns=["tokens"]).column("tokens").chunk(0).values.to_numpy()
                for r in picked[picked // 1024 == g] - g * 1024:
                    out.append(flat[r * WIDTH : (r + 1) * WIDTH])
            return np.stack(out)

        base = rate(parquet_batch, args.seconds)
    print(f"forja (memory map): {forja:8.0f} batches/s of {BATCH}x{WIDTH - 1} tokens")
    print(f"baseline (Parquet): {base:8.1f} batches/s")
    print(json.dumps({"batches_per_s": round(forja, 1), "baseline_batches_per_s": round(base, 1),
                      "ratio": round(forja / base, 1), "batch": [BATCH, WIDTH - 1],
                      "shards": args.shards}))


if __name__ == "__main__":
    main()
