"""The MLflow pyfunc that serves a forja model: a table of prompts in, generated text out.

Logged as "models from code": MLflow runs this file at load time instead of
unpickling an object, and the weights come from safetensors after their sha256 is
checked against the one recorded when the model was logged.

Parameters (MLflow `params`): max_new_tokens, temperature (0: greedy), top_k (0: off),
top_p (1: off), seed (-1: a fresh random seed per request), chat (each prompt is a user
message in the chat template: for fine-tuned models). A deterministic request (temperature 0, or a
seed >= 0) is answered from a response cache when the same prompt and parameters were
generated before.
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections import OrderedDict

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from model.checkpoint import file_sha256
from model.generate import Sampling, generate_text, load_folder

log = logging.getLogger("forja.serving")

DEFAULTS = {"max_new_tokens": 48, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "seed": -1, "chat": False}
CACHE_SIZE = 4096


class TamperedWeights(RuntimeError):
    pass


def check_weights(path: str, expected: str | None) -> None:
    """Refuse weights whose sha256 is not the one recorded at registration."""
    if not expected:
        raise TamperedWeights(f"{path}: no weights_sha256 recorded in the model's config; refusing to load")
    actual = file_sha256(path)
    if actual != expected:
        raise TamperedWeights(f"{path}: sha256 {actual} differs from the registered {expected}; "
                              "the weights were changed after registration, refusing to load")


def sampling(params: dict | None) -> Sampling:
    """MLflow params to a Sampling; out-of-range values are a 400 naming the field."""
    p = DEFAULTS | {k: v for k, v in (params or {}).items() if v is not None}
    try:
        seed = int(p["seed"])
        return Sampling(max_new_tokens=int(p["max_new_tokens"]), temperature=float(p["temperature"]),
                        top_k=int(p["top_k"]) or None, top_p=float(p["top_p"]),
                        seed=seed if seed >= 0 else random.randrange(2**31))
    except (TypeError, ValueError) as e:
        raise MlflowException(f"invalid generation parameter: {e}", error_code=INVALID_PARAMETER_VALUE) from None


class ForjaLM(PythonModel):
    def load_context(self, context):
        if not log.handlers:  # a serving process: say per request what the cache did
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        weights = context.artifacts["weights"]
        check_weights(weights, (context.model_config or {}).get("weights_sha256"))
        # The three files are logged side by side, so their folder is a model folder.
        self.model, self.tokenizer = load_folder(os.path.dirname(weights))
        self.cache: OrderedDict[tuple, str] = OrderedDict()

    def prompts(self, model_input) -> list[str]:
        if isinstance(model_input, pd.DataFrame):
            if "prompt" not in model_input.columns:
                raise MlflowException(f"input needs a 'prompt' column; got {list(model_input.columns)}",
                                      error_code=INVALID_PARAMETER_VALUE)
            return model_input["prompt"].astype(str).tolist()
        if isinstance(model_input, dict) and "prompt" in model_input:
            model_input = model_input["prompt"]
        return [str(p) for p in ([model_input] if isinstance(model_input, str) else model_input)]

    def predict(self, context, model_input, params=None):
        t0 = time.perf_counter()
        s = sampling(params)
        texts = self.prompts(model_input)
        deterministic = s.temperature == 0 or int((params or {}).get("seed", -1)) >= 0
        chat = str((params or {}).get("chat", False)).lower() in ("true", "1")
        keys = [(t, chat, s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed if s.temperature else None)
                for t in texts]
        todo = [i for i, k in enumerate(keys) if not (deterministic and k in self.cache)]
        if todo:
            # A prompt longer than the context is cut from the left by generate(), with a warning.
            try:
                made = generate_text(self.model, self.tokenizer, [texts[i] for i in todo], s, len(todo), chat)
            except ValueError as e:  # chat with a tokenizer that has no chat tokens
                raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
            for i, text in zip(todo, made):
                self.cache[keys[i]] = text
                self.cache.move_to_end(keys[i])
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        out = [self.cache[k] for k in keys]
        if not deterministic:
            for k in keys:
                self.cache.pop(k, None)
        log.info("forja: %d prompt(s), %d from the response cache, %.2f ms", len(texts), len(texts) - len(todo),
                 (time.perf_counter() - t0) * 1e3)
        return out


mlflow.models.set_model(ForjaLM())
