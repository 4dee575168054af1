"""Peak memory of the streaming data stages against corpus size.

    .venv/bin/python benchmarks/memory.py [--docs 500] [--factor 10]

Writes a synthetic Portuguese corpus of N and factor*N documents (~2 KB each), runs
normalize and dedupe (memory index, and a Redis index when redis-server is installed)
on each in a fresh process, and prints the peak RSS of each run and the ratio
large/small. Streaming stages should stay near 1.0; the in-memory dedupe index grows
by its signatures (about 0.6 KB per kept document), which is what the Redis index is for.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sentences = (ROOT / "tests" / "fixtures" / "pt_sentences.txt").read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        picked = rng.sample(sentences, 20)
        texts.append(f"Documento {i}, revisão {rng.randint(1, 10**9)}. " + " ".join(picked))
    ids = [f"d{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "url": [f"http://x/{i}" for i in ids], "text": texts}), path)


def child(stage: str, src: str, out: str, redis_url: str) -> None:
    """Run one stage on src and print its peak RSS in MB."""
    from tasks.config import DedupeConfig, NormalizeConfig

    if stage == "normalize":
        from tasks.normalize import build

        build(NormalizeConfig(), [Path(src)], Path(out))
    else:
        from tasks.dedupe import build

        cfg = DedupeConfig(index="redis", redis_url=redis_url) if stage == "dedupe-redis" else DedupeConfig()
        build(cfg, [Path(src)], Path(out))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak(stage: str, src: Path, work: Path, redis_url: str = "") -> float:
    out = work / f"out-{stage}-{src.stem}"
    out.mkdir()
    r = subprocess.run([sys.executable, __file__, "--child", stage, str(src), str(out), redis_url],
                       capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(tempfile.mkdtemp(prefix="forja-mem-"))
    small, large = work / "small.parquet", work / "large.parquet"
    make_corpus(small, args.docs)
    make_corpus(large, args.docs * args.factor, seed=1)
    stages = ["normalize", "dedupe"]
    redis_url, proc = "", None
    if exe := shutil.which("redis-server"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                 "--dir", str(work)], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        redis_url, stages = f"redis://127.0.0.1:{port}/0", stages + ["dedupe-redis"]
    result = {"docs_small": args.docs, "docs_large": args.docs * args.factor}
    try:
        for stage in stages:
            a, b = peak(stage, small, work, redis_url), peak(stage, large, work, redis_url)
            print(f"{stage:13s} peak RSS {a:7.1f} MB at {args.docs} docs, {b:7.1f} MB at {args.docs * args.factor}: "
                  f"ratio {b / a:.2f}")
            result[f"{stage}_ratio"] = round(b / a, 3)
            result[f"{stage}_mb"] = [round(a, 1), round(b, 1)]
    finally:
        if proc:
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
