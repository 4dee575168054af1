"""The GPU day: forja's training, generation and serving benchmarks, one after the other, unattended.

    benchmarks/gpu.sh           on a lent GPU: gpt2-124m trained in bf16 (MFU against the card's
                                datasheet peak), generation and serving with --device cuda
    benchmarks/gpu.sh --cpu     the same plan, shrunk to the micro preset on this CPU, so the script
                                is known to run before the day a GPU is there

Each benchmark runs in its own process with a time limit, and the whole plan stays under ten
minutes (--budget): a benchmark started late gets what is left. stdout carries one JSON line per
benchmark and nothing else: {"benchmark", "ok", "seconds", "command", "result" (the benchmark's own
last JSON line) or "error"}. Each benchmark's full output goes to --logs (default
benchmarks/out/gpu-<time>/NAME.log), progress to stderr. A failed or timed-out benchmark is a line
with "ok": false and the next one still runs; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (script and arguments, its own time limit in seconds)
GPU_PLAN = {
    "train": (["benchmarks/train.py", "--preset", "gpt2-124m", "--seq", "1024", "--batch", "16", "--precision", "bf16",
               "--steps", "30", "--warmup", "10", "--rounds", "2"], 300),
    "generate": (["benchmarks/generate.py", "--device", "cuda", "--new-tokens", "256", "--batches", "1", "8", "32"], 120),
    "serve": (["benchmarks/serve.py", "--device", "cuda", "--tokens", "64", "--requests", "4"], 180),
}
CPU_PLAN = {
    "train": (["benchmarks/train.py", "--preset", "micro", "--seq", "64", "--batch", "4", "--precision", "bf16",
               "--steps", "6", "--warmup", "2", "--rounds", "1"], 240),
    "generate": (["benchmarks/generate.py", "--device", "cpu", "--new-tokens", "16", "--batches", "1", "2"], 120),
    "serve": (["benchmarks/serve.py", "--device", "cpu", "--tokens", "8", "--requests", "1"], 180),
}


def last_json(text: str) -> dict | None:
    """The last line of a benchmark's output that is a JSON object (each prints its result last)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_one(name: str, args: list[str], limit: float, logs: Path) -> dict:
    """One benchmark in its own process, killed at `limit` seconds; its output kept in logs/NAME.log."""
    cmd = [sys.executable, *args]
    log = logs / f"{name}.log"
    started = time.monotonic()
    env = dict(os.environ, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=limit,
                                  start_new_session=True)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.monotonic() - started, 1)
    record = {"benchmark": name, "ok": False, "seconds": seconds, "command": " ".join(args), "log": str(log)}
    text = log.read_text(errors="replace")
    if rc is None:
        return record | {"error": f"stopped after its limit of {limit:.0f} s"}
    result = last_json(text)
    if rc or result is None:
        tail = " | ".join(text.strip().splitlines()[-3:])
        return record | {"error": f"exit status {rc}" + ("" if result is None else ", ") + f": {tail[-400:]}"}
    return record | {"ok": True, "result": result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the small CPU plan (micro preset): check that the script runs")
    ap.add_argument("--only", nargs="+", choices=list(GPU_PLAN), help="run these benchmarks only")
    ap.add_argument("--budget", type=float, default=570, help="seconds for the whole plan (default 570: under ten minutes)")
    ap.add_argument("--logs", type=Path, help="folder for each benchmark's output")
    args = ap.parse_args(argv)
    plan = CPU_PLAN if args.cpu else GPU_PLAN
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("benchmarks/gpu.sh: no CUDA device here (torch.cuda.is_available() is False). On a GPU machine, "
                  "install a CUDA build of torch; to check the script on this CPU, run benchmarks/gpu.sh --cpu",
                  file=sys.stderr)
            return 2
    logs = args.logs or ROOT / "benchmarks" / "out" / time.strftime("gpu-%Y%m%dT%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    failed = 0
    for name, (bench_args, limit) in plan.items():
        if args.only and name not in args.only:
            continue
        left = deadline - time.monotonic()
        if left < 10:
            record = {"benchmark": name, "ok": False, "seconds": 0, "error": f"not started: the {args.budget:.0f} s budget is spent"}
        else:
            print(f"gpu.sh: {name} (at most {min(limit, left):.0f} s) ...", file=sys.stderr, flush=True)
            record = run_one(name, bench_args, min(limit, left), logs)
        failed += not record["ok"]
        print(json.dumps(record), flush=True)
    print(f"gpu.sh: logs in {logs}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
