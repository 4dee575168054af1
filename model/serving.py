"""The MLflow pyfunc that serves a forja model: a table of prompts in, generated text out.

Logged as "models from code": MLflow runs this file at load time instead of
unpickling an object. The weights come from safetensors after their sha256 is checked
against the registry's record (the weights_sha256 tag of the registered version that
holds this logged model), not against a value in the model folder, which whoever can
swap the weights can rewrite too. A model no registered version holds is not served.
The registry is whatever MLflow's tracking URI names (MLFLOW_TRACKING_URI: a local
SQLite file works offline); FORJA_MODEL_URI=models:/NAME/VERSION (or @ALIAS) pins the
version to check against.

Parameters (MLflow `params`): max_new_tokens, temperature (0: greedy), top_k (0: off),
top_p (1: off), seed (-1 or null: a fresh random seed per request), chat (each prompt is a
user message in the chat template: for fine-tuned models). A deterministic request
(temperature 0, or a seed >= 0) is answered from a response cache (least recently used
entries dropped past its size) when the same prompt and parameters were generated before.

Every request is bounded; past a limit it is refused with HTTP 400 naming the parameter,
its value and the limit (environment variables, read when the model loads):

    FORJA_SERVE_MAX_ROWS           prompts per request                  (default 64)
    FORJA_SERVE_MAX_PROMPT_TOKENS  tokens of one prompt                 (default 4096)
    FORJA_SERVE_MAX_NEW_TOKENS     max_new_tokens                       (default 1024; < the context too)
    FORJA_SERVE_MAX_TOTAL_TOKENS   prompt tokens kept + new tokens, summed over the rows (default 65536)
    FORJA_SERVE_BATCH_ROWS         prompts decoded together (memory)    (default 8)
    FORJA_SERVE_CACHE_SIZE         responses kept in the cache          (default 4096)
    FORJA_SERVE_MAX_BODY_BYTES     a request body's size (forja serve; MLflow's server has its own)
                                                                        (default 1048576)
    FORJA_SERVE_TIMEOUT_S          a request's time to generate         (default 0.9 x MLflow's
                                   MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s: answered before it cuts)

A prompt within FORJA_SERVE_MAX_PROMPT_TOKENS but longer than the model's context leaves
room for the new tokens by keeping its last tokens (cut from the left, logged). A request
whose time runs out stops generating at the next token and answers 504 (DEADLINE_EXCEEDED).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from model.checkpoint import file_sha256
from model.generate import DeadlineExceeded, PromptEncoder, Sampling, generate, load_folder

log = logging.getLogger("forja.serving")

DEFAULTS = {"max_new_tokens": 48, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "seed": -1, "chat": False}


class TamperedWeights(RuntimeError):
    pass


def check_weights(path: str, expected: str | None, source: str = "the registered version") -> None:
    """Refuse weights whose sha256 is not the one recorded at registration (in the registry)."""
    if not expected:
        raise TamperedWeights(f"{path}: {source} has no weights_sha256 recorded; refusing to load")
    actual = file_sha256(path)
    if actual != expected:
        raise TamperedWeights(f"{path}: sha256 {actual} differs from the registered {expected} (weights_sha256 "
                              f"of {source}); the weights were changed after registration, refusing to load")


def registered_version(model_root: str):
    """The registered version whose weights these are: FORJA_MODEL_URI's, or the one whose source
    is the logged model of model_root/MLmodel. Read from the registry, never from the folder."""
    from mlflow.models import Model

    client, uri = mlflow.MlflowClient(), mlflow.get_tracking_uri()
    pinned = os.environ.get("FORJA_MODEL_URI", "")
    try:
        if pinned.startswith("models:/"):
            rest = pinned[len("models:/"):]
            name, ref = rest.split("@", 1) if "@" in rest else rest.rsplit("/", 1)
            return client.get_model_version_by_alias(name, ref) if "@" in rest else client.get_model_version(name, ref)
        model_id = Model.load(os.path.join(model_root, "MLmodel")).model_id
        versions = client.search_model_versions(f"source_path = 'models:/{model_id}'") if model_id else []
    except MlflowException as e:
        raise TamperedWeights(f"cannot read the model registry at {uri} to check the weights' sha256 "
                              f"({e.message}); set MLFLOW_TRACKING_URI to the registry the model was registered in") \
            from None
    if not versions:
        raise TamperedWeights(f"no registered model version in the registry at {uri} holds the model in {model_root} "
                              f"(logged model {model_id}); forja serves registered versions only, whose weights "
                              "sha256 the registry records: register it, or point MLFLOW_TRACKING_URI at its registry")
    return min(versions, key=lambda v: int(v.version))  # every version of one logged model has its weights


@dataclass
class Limits:
    """How much one request may ask for (module docstring: the environment variables)."""

    max_rows: int = 64
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024
    max_total_tokens: int = 65536
    batch_rows: int = 8
    cache_size: int = 4096
    timeout_s: float = 54.0
    max_body_bytes: int = 1 << 20

    @classmethod
    def from_env(cls) -> "Limits":
        from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

        values = {}
        for name, kind in (("max_rows", int), ("max_prompt_tokens", int), ("max_new_tokens", int),
                           ("max_total_tokens", int), ("batch_rows", int), ("cache_size", int), ("timeout_s", float),
                           ("max_body_bytes", int)):
            env = f"FORJA_SERVE_{name.upper()}"
            raw = os.environ.get(env)
            if raw is not None:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{env}={raw!r} is not a number") from None
                if values[name] <= 0:
                    raise ValueError(f"{env}={raw!r} must be > 0")
        values.setdefault("timeout_s", 0.9 * MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
        return cls(**values)


def bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def request_params(params: dict | None) -> tuple[Sampling, bool, bool]:
    """MLflow params to (Sampling, chat, deterministic); a null is the default (seed: a random one);
    out-of-range values are a 400 naming the field."""
    p = DEFAULTS | {k: v for k, v in (params or {}).items() if v is not None}
    try:
        seed = int(p["seed"])
        s = Sampling(max_new_tokens=int(p["max_new_tokens"]), temperature=float(p["temperature"]),
                     top_k=int(p["top_k"]) or None, top_p=float(p["top_p"]),
                     seed=seed if seed >= 0 else random.randrange(2**31))
    except (TypeError, ValueError) as e:
        raise bad(f"invalid generation parameter: {e}") from None
    chat = str(p["chat"]).lower() in ("true", "1")
    return s, chat, s.temperature == 0 or seed >= 0


class ForjaLM(PythonModel):
    def load_context(self, context):
        if not log.handlers:  # a serving process: say per request what the cache did
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        weights = context.artifacts["weights"]
        version = registered_version(os.path.dirname(os.path.dirname(weights)))  # <model>/artifacts/<weights>
        check_weights(weights, version.tags.get("weights_sha256"),
                      f"registered version {version.name}/{version.version} (the registry's record)")
        # The three files are logged side by side, so their folder is a model folder.
        self.model, self.tokenizer = load_folder(os.path.dirname(weights))
        self.limits = Limits.from_env()
        self.encoders = {chat: PromptEncoder(self.tokenizer, chat) for chat in (False, True)
                         if not chat or self.tokenizer.token_to_id("<|end|>") is not None}
        # a token covers at most this many (byte-level) characters: a longer prompt is refused untokenized
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        self.cache: OrderedDict[tuple, str] = OrderedDict()
        self.lock = threading.Lock()  # the server may run requests in threads

    def prompts(self, model_input) -> list[str]:
        if isinstance(model_input, pd.DataFrame):
            if "prompt" not in model_input.columns:
                raise bad(f"input needs a 'prompt' column; got {list(model_input.columns)}")
            model_input = model_input["prompt"].tolist()
        elif isinstance(model_input, dict) and "prompt" in model_input:
            model_input = model_input["prompt"]
        rows = [model_input] if isinstance(model_input, str) else list(model_input)
        for i, p in enumerate(rows):
            if not isinstance(p, str):
                raise bad(f"prompt of row {i} is {p!r}, not a string")
        return rows

    def encode(self, texts: list[str], s: Sampling, chat: bool) -> tuple[list[list[int]], int]:
        """Token ids of each prompt and the stop id, after every limit is checked (a 400 otherwise)."""
        lim, block = self.limits, self.model.cfg.block_size
        if len(texts) > lim.max_rows:
            raise bad(f"the request has {len(texts)} rows; at most {lim.max_rows} per request "
                      "(FORJA_SERVE_MAX_ROWS): send them in several requests")
        if s.max_new_tokens > lim.max_new_tokens or s.max_new_tokens >= block:
            cap = min(lim.max_new_tokens, block - 1)
            raise bad(f"max_new_tokens={s.max_new_tokens} is over the limit of {cap} (FORJA_SERVE_MAX_NEW_TOKENS "
                      f"{lim.max_new_tokens}; the model's context is {block} tokens)")
        if chat and chat not in self.encoders:
            raise bad("chat=true needs the chat tokens, which this model's tokenizer lacks (trained before "
                      "forja reserved them); send chat=false")
        encoder = self.encoders[chat]
        for i, text in enumerate(texts):  # surely too long: not even worth tokenizing
            if len(text) > lim.max_prompt_tokens * self.max_token_chars:
                raise bad(f"prompt of row {i} has {len(text)} characters, more than max_prompt_tokens "
                          f"({lim.max_prompt_tokens}, FORJA_SERVE_MAX_PROMPT_TOKENS) tokens can hold: shorten it")
        ids = encoder(texts)
        for i, row in enumerate(ids):
            if len(row) > lim.max_prompt_tokens:
                raise bad(f"prompt of row {i} has {len(row)} tokens; max_prompt_tokens is {lim.max_prompt_tokens} "
                          "(FORJA_SERVE_MAX_PROMPT_TOKENS): shorten it")
        room = block - s.max_new_tokens
        total = sum(min(len(r), room) + s.max_new_tokens for r in ids)
        if total > lim.max_total_tokens:
            raise bad(f"the request needs {total} total tokens (prompts kept + max_new_tokens, over its rows); "
                      f"at most {lim.max_total_tokens} (FORJA_SERVE_MAX_TOTAL_TOKENS): send fewer rows or "
                      "a smaller max_new_tokens")
        return ids, encoder.stop_id

    def predict(self, context, model_input, params=None):
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.limits.timeout_s
        s, chat, deterministic = request_params(params)
        texts = self.prompts(model_input)
        ids, stop = self.encode(texts, s, chat)
        keys = [(t, chat, s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed if s.temperature else None)
                for t in texts]
        out: list[str | None] = [None] * len(texts)
        if deterministic:
            with self.lock:
                for i, k in enumerate(keys):
                    if k in self.cache:
                        self.cache.move_to_end(k)
                        out[i] = self.cache[k]
        todo = [i for i, o in enumerate(out) if o is None]
        step = self.limits.batch_rows
        try:
            for start in range(0, len(todo), step):  # bounded micro-batches: memory grows with rows x length
                chunk = todo[start : start + step]
                made = generate(self.model, [ids[i] for i in chunk], s, stop, deadline=deadline)
                for i, tokens in zip(chunk, made):
                    out[i] = self.tokenizer.decode(tokens)
        except DeadlineExceeded as e:
            raise MlflowException(
                f"the request passed its deadline of {self.limits.timeout_s:.1f} s (FORJA_SERVE_TIMEOUT_S, by "
                f"default 0.9 x MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT) with {len(todo) - start} of {len(texts)} "
                f"prompts unanswered: {e}; send fewer rows or a smaller max_new_tokens",
                error_code=DEADLINE_EXCEEDED) from None
        if deterministic and todo:
            with self.lock:
                for i in todo:
                    self.cache[keys[i]] = out[i]
                    self.cache.move_to_end(keys[i])
                while len(self.cache) > self.limits.cache_size:
                    self.cache.popitem(last=False)
        log.info("forja: %d prompt(s), %d from the response cache, %.2f ms", len(texts), len(texts) - len(todo),
                 (time.perf_counter() - t0) * 1e3)
        return out


mlflow.models.set_model(ForjaLM())
