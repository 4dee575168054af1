"""The MLflow pyfunc that serves a forja model: a table of prompts in, generated text out.

Logged as "models from code": MLflow runs this file at load time instead of
unpickling an object, and the weights come from safetensors.
"""
from __future__ import annotations

import os

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from model.generate import generate_text, load_folder


class ForjaLM(PythonModel):
    def load_context(self, context):
        # The three files are logged side by side, so their folder is a model folder.
        self.model, self.tokenizer = load_folder(os.path.dirname(context.artifacts["weights"]))

    def predict(self, context, model_input, params=None):
        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            if "prompt" not in model_input.columns:
                raise ValueError(f"input needs a 'prompt' column; got {list(model_input.columns)}")
            prompts = model_input["prompt"].astype(str).tolist()
        else:
            prompts = [str(p) for p in model_input]
        return generate_text(
            self.model, self.tokenizer, prompts,
            max_new_tokens=int(params.get("max_new_tokens", 48)),
            temperature=float(params.get("temperature", 0.8)),
            top_k=int(params.get("top_k", 50)) or None,
            seed=int(params.get("seed", 0)),
        )


mlflow.models.set_model(ForjaLM())
