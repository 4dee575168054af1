"""Evaluation suites: JSONL files a user writes, scored against a model.

One JSON object a line; the kind of suite says which fields each line has:

  text            {"text": str}                                      perplexity, bits per byte
  choice          {"question": str, "choices": [str, ...], "answer": int}
                                                                     accuracy (sum and per-byte
                                                                     log-likelihood of each choice)
  classification  {"text": str, "label": str}                        accuracy, macro F1; the label
                  whose log-likelihood after the suite's template is highest is the prediction
  generation      {"prompt": str, "reference": str | [str, ...]}     BLEU, chrF (sacrebleu), token F1

A malformed line is an error naming the file and the line.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.generate import EOT, Sampling, fit_prompt, generate_text

FIELDS = {
    "text": {"text": str},
    "choice": {"question": str, "choices": list, "answer": int},
    "classification": {"text": str, "label": str},
    "generation": {"prompt": str, "reference": (str, list)},
}


class SuiteError(ValueError):
    pass


@dataclass
class Suite:
    name: str
    kind: str
    path: str
    template: str = "{text}\n"  # classification: the prompt before a label
    labels: list[str] | None = None  # classification: every label (default: those in the file)
    max_new_tokens: int = 64  # generation
    limit: int | None = None  # score only the first N items
    chat: bool = False  # generation: prompts go through the chat template as user messages

    def load(self) -> list[dict]:
        return read_suite(Path(self.path), self.kind, self.limit)


def jsonl_lines(path: Path, error=SuiteError):
    """(where, value) for each non-blank line of a JSONL file; where is "path:line"."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_suite(path: Path, kind: str, limit: int | None = None) -> list[dict]:
    """The items of a suite file, each checked against its kind's fields."""
    if kind not in FIELDS:
        raise SuiteError(f"suite {path}: unknown kind {kind!r}; choose one of {sorted(FIELDS)}")
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist")
    items = []
    for where, item in jsonl_lines(path):
        if not isinstance(item, dict):
            raise SuiteError(f"{where}: expected a JSON object with {sorted(FIELDS[kind])}")
        for field, typ in FIELDS[kind].items():
            if field not in item:
                raise SuiteError(f"{where}: missing field {field!r} (a {kind} suite line has {sorted(FIELDS[kind])})")
            if not isinstance(item[field], typ) or isinstance(item[field], bool):
                raise SuiteError(f"{where}: field {field!r} has the wrong type ({type(item[field]).__name__})")
        if kind == "choice":
            if len(item["choices"]) < 2 or not all(isinstance(c, str) for c in item["choices"]):
                raise SuiteError(f"{where}: 'choices' must be a list of at least two strings")
            if not 0 <= item["answer"] < len(item["choices"]):
                raise SuiteError(f"{where}: 'answer' {item['answer']} is not an index of 'choices' "
                                 f"(0 to {len(item['choices']) - 1})")
        items.append(item)
        if limit and len(items) >= limit:
            break
    if not items:
        raise SuiteError(f"suite file {path} has no items")
    return items


class Scorer:
    """Log-likelihoods and generations from one model and tokenizer."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.eot = tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    @torch.no_grad()
    def loglik(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of log p(continuation | context) for each (context ids, continuation ids)."""
        block = self.model.cfg.block_size
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = []
            for ctx, cont in pairs[i : i + self.batch_size]:
                ctx = ([self.eot] if self.eot is not None else []) + ctx
                if not ctx:  # no context and no EOT token: the first token is context, unscored
                    ctx, cont = cont[:1], cont[1:]
                cont = cont[-block:]
                chunk.append((fit_prompt(ctx, block + 1 - len(cont), "context"), cont))
            width = max(len(c) + len(t) - 1 for c, t in chunk)
            # Right padding: a causal model's earlier positions never see it.
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, (ctx, cont) in enumerate(chunk):
                seq = (ctx + cont)[:-1]
                x[r, : len(seq)] = torch.tensor(seq)
            logp = F.log_softmax(self.model(x.to(self.device)).float(), dim=-1)
            for r, (ctx, cont) in enumerate(chunk):
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=self.device)
                out.append(float(logp[r, pos, torch.tensor(cont, device=self.device)].sum()))
        return out

    def generate(self, prompts: list[str], max_new_tokens: int, chat: bool = False) -> list[str]:
        s = Sampling(max_new_tokens=max_new_tokens, temperature=0)
        return generate_text(self.model, self.tokenizer, prompts, s, self.batch_size, chat)


def score_text(scorer: Scorer, items: list[dict]) -> dict:
    block = scorer.model.cfg.block_size
    pieces = []  # long texts in context-sized windows
    for item in items:
        ids = scorer.encode(item["text"])
        pieces += [([], ids[start : start + block]) for start in range(0, len(ids), block)]
    nats = -sum(scorer.loglik(pieces))
    tokens = sum(len(p) for _, p in pieces)
    nbytes = sum(len(item["text"].encode("utf-8")) for item in items)
    return {"perplexity": math.exp(nats / tokens), "bits_per_byte": nats / math.log(2) / nbytes, "tokens": tokens}


def score_choice(scorer: Scorer, items: list[dict]) -> dict:
    pairs, spans = [], []
    for item in items:
        ctx = scorer.encode(item["question"])
        spans.append((len(pairs), len(item["choices"])))
        pairs += [(ctx, scorer.encode(" " + c)) for c in item["choices"]]
    ll = scorer.loglik(pairs)
    right = right_norm = 0
    for item, (start, n) in zip(items, spans):
        scores = ll[start : start + n]
        per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, item["choices"])]
        right += max(range(n), key=scores.__getitem__) == item["answer"]
        right_norm += max(range(n), key=per_byte.__getitem__) == item["answer"]
    return {"accuracy": right / len(items), "accuracy_per_byte": right_norm / len(items),
            "chance": sum(1 / len(i["choices"]) for i in items) / len(items)}


def macro_f1(truth: list[str], predicted: list[str], labels: list[str]) -> float:
    f1s = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(truth, predicted))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)


def score_classification(scorer: Scorer, items: list[dict], suite: Suite) -> dict:
    labels = suite.labels or sorted({i["label"] for i in items})
    unknown = sorted({i["label"] for i in items} - set(labels))
    if unknown:
        raise SuiteError(f"suite {suite.name} ({suite.path}): labels {unknown} are not in the suite's labels list")
    label_ids = [scorer.encode(" " + label) for label in labels]
    pairs = [(scorer.encode(suite.template.format(text=i["text"])), ids) for i in items for ids in label_ids]
    ll = scorer.loglik(pairs)
    predicted = [labels[max(range(len(labels)), key=lambda j: ll[k * len(labels) + j])] for k in range(len(items))]
    truth = [i["label"] for i in items]
    return {"accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(items),
            "macro_f1": macro_f1(truth, predicted, labels)}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """Overlap of the bags of words (lower-cased), as reading-comprehension benchmarks score it."""
    p, r = words(prediction), words(reference)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score_generation(scorer: Scorer, items: list[dict], suite: Suite) -> tuple[dict, list[dict]]:
    import sacrebleu

    outputs = [o.strip() for o in scorer.generate([i["prompt"] for i in items], suite.max_new_tokens, suite.chat)]
    refs = [i["reference"] if isinstance(i["reference"], list) else [i["reference"]] for i in items]
    streams = [[r[k] if k < len(r) else r[0] for r in refs] for k in range(max(len(r) for r in refs))]
    metrics = {
        "bleu": sacrebleu.corpus_bleu(outputs, streams).score,
        "chrf": sacrebleu.corpus_chrf(outputs, streams).score,
        "token_f1": sum(max(token_f1(o, x) for x in r) for o, r in zip(outputs, refs)) / len(items),
    }
    return metrics, [{"prompt": i["prompt"], "output": o, "reference": r[0]} for i, o, r in zip(items, outputs, refs)]


def run_suites(model, tokenizer, suites: list[Suite], batch_size: int = 8) -> tuple[dict, dict]:
    """Every suite's metrics, flat as {"suite.metric": value}, and the generations made."""
    scorer = Scorer(model, tokenizer, batch_size)
    metrics, outputs = {}, {}
    for suite in suites:
        items = suite.load()
        if suite.kind == "text":
            m = score_text(scorer, items)
        elif suite.kind == "choice":
            m = score_choice(scorer, items)
        elif suite.kind == "classification":
            m = score_classification(scorer, items, suite)
        else:
            m, outputs[suite.name] = score_generation(scorer, items, suite)
        metrics |= {f"{suite.name}.{k}": float(v) for k, v in m.items()}
        metrics[f"{suite.name}.items"] = float(len(items))
    return metrics, outputs
