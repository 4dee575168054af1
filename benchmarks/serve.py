"""Serving throughput: `forja serve` answering 1, then 8 concurrent clients over real HTTP.

    .venv/bin/python benchmarks/serve.py [--model-uri models:/forja-demo-faq@champion --workdir WORKDIR]
                                         [--tokens 64] [--requests 4] [--device auto|cpu|cuda|cuda:N]

The server (model/server.py: continuous batching, up to 8 sequences a step) runs in this process on
127.0.0.1; the clients run in another process (so they do not compete with the server for the
interpreter) and post /v1/completions, each asking the same number of new tokens (ignore_eos, so
every answer is exactly --tokens long; temperature 1 without a seed, so nothing comes from the
response cache). Each client sends its requests one after the other.

Without --model-uri a demo-shaped model is registered in a temporary MLflow store (SQLite): the
`tiny` preset with a 256-token context and a 4096-token BPE trained on data/debian-faq-pt, random
weights (speed does not depend on them). With --model-uri, a registered model (after `make demo`:
models:/forja-demo-faq@champion, with --workdir the demo's work directory or MLFLOW_TRACKING_URI set).

Printed: requests/s, tokens/s and p50/p95 latency at each concurrency; the last line is JSON with
tokens_per_s_1, tokens_per_s_8, ratio_8_over_1, p95_ms_8 (and the rest).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for k, v in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(k, v)

PROMPTS = ["O que é o Debian?", "Como instalo um pacote com o apt?", "Onde ficam os arquivos de configuração?",
           "Como atualizo o sistema?", "O que é um gerenciador de janelas?", "Como vejo o espaço em disco?",
           "Para que serve o sudo?", "Como mudo a senha de um usuário?"]


def demo_model(workdir: Path) -> str:
    """Register a demo-shaped random model in workdir's MLflow store; its models:/ URI."""
    import mlflow
    import torch

    from model.checkpoint import file_sha256
    from model.config import from_preset
    from model.generate import save_folder
    from model.gpt import GPT
    from tasks import register
    from tasks.config import RegisterConfig, TokenizeConfig
    from tasks.models import tracking
    from tasks.stage import Manifest
    from tasks.tokens.bpe import train_tokenizer

    texts = []
    for line in (ROOT / "data" / "debian-faq-pt" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        texts += [m["content"] for m in item.get("messages", [])] + [item.get("prompt", ""), item.get("response", "")]
    tok = train_tokenizer([t for t in texts if t], TokenizeConfig(vocab_size=4096, min_frequency=1))
    tok.save(str(workdir / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT(from_preset("tiny", tok.get_vocab_size(), 256))
    folder = workdir / "model"
    save_folder(model, workdir / "tokenizer.json", folder)
    experiment = tracking.setup(workdir, "bench-serve")
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    trained = Manifest(stage="pretrain", key="bench", folder=str(folder), inputs={}, config={}, code_version="x",
                       created_at=0, files=[], stats={"mlflow_run_id": run.info.run_id})
    sha = file_sha256(folder / "model.safetensors")
    cfg = RegisterConfig(model_name="bench-serve", experiment="bench-serve", gate_metric="x")
    mv, _ = register.register_version(cfg, trained, run.info.run_id, sha, {"weights_sha256": sha})
    return f"models:/bench-serve/{mv.version}"


def clients(url: str, concurrency: int, requests: int, tokens: int) -> dict:
    """Runs in the client process: `concurrency` clients, each sending `requests` requests in turn."""
    import asyncio

    import httpx

    async def client(http, c: int, latencies: list, made: list):
        for r in range(requests):
            t0 = time.perf_counter()
            resp = await http.post(f"{url}/v1/completions", json={
                "prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": tokens, "temperature": 1.0,
                "ignore_eos": True})
            resp.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            made.append(resp.json()["usage"]["completion_tokens"])

    async def main():
        latencies, made = [], []
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(http, c, latencies, made) for c in range(concurrency)))
            return {"seconds": time.perf_counter() - t0, "latencies": latencies, "tokens": sum(made)}

    return asyncio.run(main())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-uri", help="a registered model (default: a demo-shaped random one, registered here)")
    ap.add_argument("--workdir", help="work directory of the MLflow store holding --model-uri (or MLFLOW_TRACKING_URI)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens each request asks for")
    ap.add_argument("--requests", type=int, default=4, help="requests per client at 8 clients (x2 at 1 client)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server")
    ap.add_argument("--device", default="auto", help="auto (CUDA in bf16 when present, else the CPU), cpu, cuda, cuda:N")
    args = ap.parse_args()

    import torch

    from model.device import from_option
    from model.server import build_app, serve_in_thread
    from tasks.config import ServeConfig

    torch.set_num_threads(args.threads)
    placement = from_option(args.device)
    print(f"device: {placement}", flush=True)
    with tempfile.TemporaryDirectory(prefix="forja-bench-serve-") as tmp:
        workdir = args.workdir or tmp
        uri = args.model_uri or demo_model(Path(tmp))
        app = build_app(ServeConfig(model_uri=uri, max_batch=8, batch_wait_ms=5), workdir, args.device)
        served = app.state.follower.current
        print(f"model: {served.label}, {sum(p.numel() for p in served.model.parameters()) / 1e6:.1f}M parameters, "
              f"context {served.block_size}", flush=True)
        results = {}
        spawn = multiprocessing.get_context("spawn")
        with serve_in_thread(app) as url, spawn.Pool(1) as pool:
            pool.apply(clients, (url, 2, 1, 8))  # warm-up: both processes, the batch path
            for concurrency in (1, 8):
                requests = args.requests * (2 if concurrency == 1 else 1)
                steps = app.state.engine.stats.steps
                run = pool.apply(clients, (url, concurrency, requests, args.tokens))
                lat = run["latencies"]
                results[concurrency] = {
                    "requests_per_s": len(lat) / run["seconds"], "tokens_per_s": run["tokens"] / run["seconds"],
                    "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * percentile(lat, 0.95),
                    "requests": len(lat), "decode_steps": app.state.engine.stats.steps - steps}
                r = results[concurrency]
                print(f"{concurrency} client(s): {r['requests']} requests of {args.tokens} tokens, "
                      f"{r['requests_per_s']:.2f} requests/s, {r['tokens_per_s']:.1f} tokens/s, "
                      f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, {r['decode_steps']} decoding steps",
                      flush=True)
        batches = app.state.engine.stats.as_dict()["batch_sizes"]
    ratio = results[8]["tokens_per_s"] / results[1]["tokens_per_s"]
    print(f"8 clients get {ratio:.2f}x the tokens/s of one (batch sizes used: {batches})")
    print(json.dumps({"tokens_per_s_1": round(results[1]["tokens_per_s"], 1),
                      "tokens_per_s_8": round(results[8]["tokens_per_s"], 1), "ratio_8_over_1": round(ratio, 2),
                      "p95_ms_8": round(results[8]["p95_ms"], 1), "p50_ms_8": round(results[8]["p50_ms"], 1),
                      "p95_ms_1": round(results[1]["p95_ms"], 1), "p50_ms_1": round(results[1]["p50_ms"], 1),
                      "requests_per_s_1": round(results[1]["requests_per_s"], 2),
                      "requests_per_s_8": round(results[8]["requests_per_s"], 2), "tokens": args.tokens,
                      "model": served.label, "device": str(placement), "batch_sizes": batches}))


if __name__ == "__main__":
    main()
