"""`forja serve`: a registered model behind the OpenAI-compatible HTTP API, with a chat page.

    POST /v1/chat/completions   messages in the chat template; the reply stops at its end token
    POST /v1/completions        a prompt (or a list of them) continued as plain text
    GET  /v1/models             the served model
    POST /v1/feedback           {request_id, rating: up/down, correction?, consent}: into the feedback store
    GET  /                      the chat page (model/static/chat.html)
    GET  /health, /v1/forja/stats

Every answer names the version that produced it (`model`: NAME/VERSION, and the header
X-Forja-Model-Version, also NAME/VERSION); an alias URI is followed (model/server_model.py). Requests are
decoded together by one engine thread (model/batcher.py). Deterministic requests (temperature 0 or a
seed) that are not streamed are answered from a response cache when asked before. Bounds:
model.serving.Limits (FORJA_SERVE_* variables), refusals in OpenAI's error shape (model/openai_api.py).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from model import openai_api as api
from model.batcher import Engine
from model.server_feedback import Feedback, Recent
from model.server_generation import Deadline, Generation, GenerationFailed
from model.server_model import Follower

log = logging.getLogger("forja.serve")
STATIC = Path(__file__).resolve().parent / "static"
HEADER = "X-Forja-Model-Version"


class VersionHeader:
    """ASGI middleware: every HTTP response carries X-Forja-Model-Version (the current version where
    the handler did not set the one that answered)."""

    def __init__(self, app, follower: Follower):
        self.app, self.follower = app, follower

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == HEADER.lower().encode() for k, _ in headers):
                    headers.append((HEADER.encode(), self.follower.current.label.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


async def read_body(request: Request, limit: int) -> dict:
    """The JSON body, refused past `limit` bytes without reading more than that."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise api.ApiError(413, f"the request body has {declared} bytes; at most {limit} "
                                "(FORJA_SERVE_MAX_BODY_BYTES): send a shorter prompt", None, code="body_too_large")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            break
    return api.parse_body(bytes(raw), limit)


def build_app(cfg, workdir: str, device: str = "auto", store=None, limits=None) -> FastAPI:
    """The server for cfg (a tasks.config.ServeConfig): loads the model now (an unknown model or alias
    is a ModelUnavailable naming the registered ones), starts decoding and alias following with the app."""
    import mlflow

    from model.device import resolve
    from model.serving import Limits
    from tasks.models import tracking

    placement = resolve(device)
    uri = tracking.tracking_uri(workdir)
    tracking.use(uri)  # registry downloads read MLflow's default store
    follower = Follower(mlflow.MlflowClient(tracking_uri=uri), cfg.model_uri, placement, cfg.refresh_s)
    log.info("forja serve: %s (%s) on %s", follower.current.label, cfg.model_uri, placement)
    limits = limits or Limits.from_env()
    engine = Engine(cfg.max_batch, cfg.batch_wait_ms)
    cache, exchanges = Recent(limits.cache_size), Recent(cfg.exchanges_kept)
    db = cfg.feedback_db
    if db is None and store is None:
        try:
            from tasks.feedback.store import default_url
            db = default_url(workdir)
        except ImportError:
            db = None
    feedback = Feedback(exchanges, store, db)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        follower.start()
        yield
        follower.stop()
        engine.stop()

    app = FastAPI(title="forja serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.follower, app.state.cache, app.state.exchanges = engine, follower, cache, exchanges
    app.state.feedback, app.state.limits = feedback, limits

    @app.exception_handler(api.ApiError)
    async def refused(request, e: api.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    async def generate(request: Request, kind: str):
        body = await read_body(request, limits.max_body_bytes)
        served = follower.current  # this request's version, whatever the alias does meanwhile
        parsed = (api.parse_chat if kind == "chat" else api.parse_completion)(body, served, limits)
        rid, created = api.new_id(kind), api.now()
        deadline = time.monotonic() + limits.timeout_s
        stop_ids = frozenset() if parsed.ignore_eos else frozenset(
            i for i in (served.eot_id, served.template.stop_id if kind == "chat" and served.template else None)
            if i is not None)
        start = lambda i: Generation(engine, served, parsed.prompts[i], parsed.sampling, stop_ids,  # noqa: E731
                                     parsed.stops, deadline, incremental=parsed.stream)
        headers = {HEADER: served.label}
        remember = (lambda answer: exchanges.put(rid, {"model_name": served.name, "model_version": served.version,
                                                       "messages": parsed.messages, "answer": answer})) \
            if kind == "chat" else (lambda answer: None)
        if parsed.stream:
            return StreamingResponse(stream(kind, rid, created, served, parsed, start, remember),
                                     media_type="text/event-stream", headers=headers)
        results: list = [None] * len(parsed.prompts)
        keys = [parsed.cache_key(kind, served.label, i) for i in range(len(parsed.prompts))]
        if parsed.deterministic:
            results = [cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        gens = {i: start(i) for i in todo}
        try:
            texts = await asyncio.gather(*(gens[i].collect() for i in todo))
        except Deadline:
            for g in gens.values():
                g.job.cancel()
            raise timeout_error() from None
        except GenerationFailed as e:
            raise api.ApiError(500, str(e), None, "server_error", "generation_failed") from None
        for i, text in zip(todo, texts):
            results[i] = (text, gens[i].finish, gens[i].tokens)
            if parsed.deterministic:
                cache.put(keys[i], results[i])
        remember(results[0][0])
        use = api.usage(sum(len(p) for p in parsed.prompts), sum(r[2] for r in results))
        log.info("%s %s: %d prompt(s), %d from the cache, %d tokens", rid, served.label, len(results),
                 len(results) - len(todo), use["completion_tokens"])
        return JSONResponse(api.response(kind, rid, served.label, created, [r[:2] for r in results], use),
                            headers=headers)

    def timeout_error() -> api.ApiError:
        return api.ApiError(504, f"the request passed its time limit of {limits.timeout_s:.1f} s "
                                 "(FORJA_SERVE_TIMEOUT_S) before its answer was complete: ask for fewer max_tokens",
                            None, "timeout", "timeout")

    async def stream(kind, rid, created, served, parsed, start, remember):
        """Server-sent events: chunks as tokens arrive (several prompts interleaved), then [DONE]."""
        merged: asyncio.Queue = asyncio.Queue()
        gens = [start(i) for i in range(len(parsed.prompts))]

        async def pump(i, gen):
            try:
                async for delta in gen.deltas():
                    await merged.put((i, delta, None))
                await merged.put((i, None, gen.finish))
            except (Deadline, GenerationFailed) as e:
                await merged.put((i, e, "error"))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        texts, open_ = [""] * len(gens), len(gens)
        try:
            if kind == "chat":
                yield api.sse(api.chunk(kind, rid, served.label, created, 0, None, first=True))
            while open_:
                i, delta, finish = await merged.get()
                if finish == "error":
                    err = timeout_error() if isinstance(delta, Deadline) else \
                        api.ApiError(500, str(delta), None, "server_error", "generation_failed")
                    yield api.sse(err.body())
                    return
                if finish is None:
                    texts[i] += delta
                    yield api.sse(api.chunk(kind, rid, served.label, created, i, delta))
                    continue
                open_ -= 1
                yield api.sse(api.chunk(kind, rid, served.label, created, i, None, finish))
                if parsed.deterministic:
                    cache.put(parsed.cache_key(kind, served.label, i), (texts[i], finish, gens[i].tokens))
            remember(texts[0])
            if parsed.include_usage:
                use = api.usage(sum(len(p) for p in parsed.prompts), sum(g.tokens for g in gens))
                yield api.sse({**api.chunk(kind, rid, served.label, created, 0, None), "choices": [], "usage": use})
            yield api.sse("[DONE]")
        finally:
            for t, g in zip(tasks, gens):
                t.cancel()
                g.job.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.get("/v1/models")
    async def models():
        served = follower.current
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "forja", "version": served.version, "root": served.label}]}

    @app.post("/v1/feedback")
    async def post_feedback(request: Request):
        body = await read_body(request, limits.max_body_bytes)
        record = await run_in_threadpool(feedback.add, body)  # durable once add returns
        return JSONResponse({"id": record, "object": "feedback", "request_id": body["request_id"]}, status_code=201)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": follower.current.label}

    @app.get("/v1/forja/stats")
    async def stats():
        return {**engine.stats.as_dict(), "model": follower.current.label, "swaps": follower.swaps,
                "failed_versions": follower.failed, "cached": len(cache), "exchanges": len(exchanges)}

    app.add_middleware(VersionHeader, follower=follower)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one, so the URL is known before serving)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def run(cfg, workdir: str, device: str = "auto") -> None:
    """Serve until interrupted, printing the URL it listens on."""
    import uvicorn

    app = build_app(cfg, workdir, device)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    print(f"forja serve: {app.state.follower.current.label} at http://{host}:{port}/  (chat page at /, "
          f"OpenAI API at http://{host}:{port}/v1)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run app with uvicorn in a background thread on a free port; yield its URL; stop it after
    (tests and benchmarks/serve.py)."""
    import uvicorn

    sock = bind(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
