"""The OpenAI-compatible request and response shapes of `forja serve`.

Requests are parsed by hand (not by a pydantic model) so that every refusal is a 4xx in OpenAI's
error shape, {"error": {"message", "type", "param", "code"}}, whose `param` names the field and
whose message says what to change. Bounds come from model.serving.Limits (FORJA_SERVE_* variables).

Supported: model, messages (chat) or prompt (completions: a string or a list of strings),
max_tokens (or max_completion_tokens), temperature, top_p, seed, stop (a string or up to 4), stream,
stream_options.include_usage, n (1 only) and, as in vLLM, ignore_eos (benchmarks). Fields forja
cannot honour (logprobs, penalties, best_of > 1, echo, suffix, tools) are refused, never ignored.
"""
from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field

from model.chat import ROLES
from model.generate import Sampling, fit_prompt

DEFAULT_MAX_TOKENS = 128
MAX_STOPS = 4


class ApiError(Exception):
    """A refused request: HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code=code)


@dataclass
class Parsed:
    """A validated generation request: token ids of each prompt and how to sample."""

    prompts: list[list[int]]
    texts: list[str]  # the prompts as given (completions) or the chat's last user message
    sampling: Sampling
    stops: list[str]
    stream: bool
    include_usage: bool
    deterministic: bool
    ignore_eos: bool
    messages: list[dict] = field(default_factory=list)  # chat only

    def cache_key(self, kind: str, label: str, index: int) -> tuple:
        s = self.sampling
        return (label, kind, tuple(self.prompts[index]), s.max_new_tokens, s.temperature, s.top_p,
                s.seed if s.temperature > 0 else None, tuple(self.stops), self.ignore_eos)


def parse_body(raw: bytes, max_bytes: int) -> dict:
    if len(raw) > max_bytes:
        raise ApiError(413, f"the request body has {len(raw)} bytes; at most {max_bytes} "
                            "(FORJA_SERVE_MAX_BODY_BYTES): send a shorter prompt", None, code="body_too_large")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not JSON ({e}); send a JSON object", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {type(body).__name__}", None, "invalid_json")
    return body


def check_model(body: dict, served) -> None:
    """The `model` field may be omitted, the registered name, or NAME/VERSION of the served version."""
    asked = body.get("model")
    if asked in (None, "", served.name, served.label):
        return
    raise ApiError(404, f"model {asked!r} is not served here; this server answers with {served.name} "
                        f"(now version {served.label}): send model={served.name!r} or leave it out", "model",
                   code="model_not_found")


UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "frequency_penalty": (None, 0, 0.0),
               "presence_penalty": (None, 0, 0.0), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
               "tools": (None, []), "logit_bias": (None, {}), "response_format": (None, {"type": "text"})}


def _number(body: dict, name: str, default, low, high, integer=False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}", name)
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        span = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise bad(f"{name}={value!r} is out of range: it must be {span}", name)
    return value


def parse_sampling(body: dict, limits, block_size: int) -> tuple[Sampling, list[str], bool, bool, bool, bool]:
    """(Sampling, stops, stream, include_usage, deterministic, ignore_eos) of a request body."""
    for name, fine in UNSUPPORTED.items():
        if name in body and body[name] not in fine:
            raise bad(f"{name}={body[name]!r} is not supported by forja serve; leave {name} out", name,
                      "unsupported_parameter")
    n = body.get("n")
    if n not in (None, 1):
        raise bad(f"n={n!r}: forja serve makes one choice per prompt; send n=1 (or several requests)", "n",
                  "unsupported_parameter")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    cap = min(limits.max_new_tokens, block_size - 1)
    max_tokens = _number(body, name, min(DEFAULT_MAX_TOKENS, cap), 1, None, integer=True)
    if max_tokens > cap:
        raise bad(f"{name}={max_tokens} is over the limit of {cap} (FORJA_SERVE_MAX_NEW_TOKENS "
                  f"{limits.max_new_tokens}; the model's context is {block_size} tokens): ask for fewer", name)
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings, not "
                  f"{stop!r}", "stop")
    flags = {}
    for flag in ("stream", "ignore_eos"):
        flags[flag] = body.get(flag) or False
        if not isinstance(flags[flag], bool):
            raise bad(f"{flag} must be true or false, not {body.get(flag)!r}", flag)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad(f"stream_options must be {{\"include_usage\": true|false}}, not {options!r}", "stream_options")
    sampling = Sampling(max_new_tokens=max_tokens, temperature=float(temperature), top_k=None,
                        top_p=float(top_p) if top_p < 1 else None,
                        seed=(seed % 2**63) if seed is not None else random.randrange(2**31))
    deterministic = temperature == 0 or seed is not None
    return sampling, stops, flags["stream"], bool(options.get("include_usage")), deterministic, flags["ignore_eos"]


def parse_messages(body: dict) -> list[dict]:
    """The chat's messages, each {role, content} with a known role and non-empty text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, not {messages!r:.80}",
                  "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content, not {m!r:.80}", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content parts must all be {{\"type\": \"text\", \"text\": ...}}; forja serves "
                          "text only", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or not content.strip():
            raise bad(f"{where}.content must be non-empty text, not {content!r:.80}", f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict, limits) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad(f"prompt must be a string or a non-empty list of strings, not {prompt!r:.80}", "prompt")
    if len(prompts) > limits.max_rows:
        raise bad(f"prompt has {len(prompts)} strings; at most {limits.max_rows} per request "
                  "(FORJA_SERVE_MAX_ROWS): send them in several requests", "prompt")
    return prompts


def check_lengths(texts: list[str], ids: list[list[int]], s: Sampling, limits, served, param: str) -> list[list[int]]:
    """Refuse prompts past the token bounds; cut what fits the bounds but not the context (from the left)."""
    for i, row in enumerate(ids):
        if len(row) > limits.max_prompt_tokens:
            raise bad(f"{param} has {len(row)} tokens; at most {limits.max_prompt_tokens} "
                      "(FORJA_SERVE_MAX_PROMPT_TOKENS): shorten it", param, "prompt_too_long")
    room = served.block_size - s.max_new_tokens
    total = sum(min(len(r), room) + s.max_new_tokens for r in ids)
    if total > limits.max_total_tokens:
        raise bad(f"the request needs {total} tokens (prompt kept + max_tokens, summed over its prompts); at most "
                  f"{limits.max_total_tokens} (FORJA_SERVE_MAX_TOTAL_TOKENS): send a smaller max_tokens or less "
                  "text", "max_tokens", "too_many_tokens")
    return [fit_prompt(r, room, param) or [served.eot_id or 0] for r in ids]


def too_long_untokenized(text_chars: int, limits, served, param: str) -> None:
    if text_chars > limits.max_prompt_tokens * served.max_token_chars:
        raise bad(f"{param} has {text_chars} characters, more than max_prompt_tokens ({limits.max_prompt_tokens}, "
                  "FORJA_SERVE_MAX_PROMPT_TOKENS) tokens can hold: shorten it", param, "prompt_too_long")


def parse_chat(body: dict, served, limits) -> Parsed:
    check_model(body, served)
    s, stops, stream, usage, det, ignore_eos = parse_sampling(body, limits, served.block_size)
    messages = parse_messages(body)
    if served.template is None:
        raise bad(f"{served.label} has no chat tokens (its tokenizer is from before forja reserved them); use "
                  "/v1/completions", "messages")
    too_long_untokenized(sum(len(m["content"]) for m in messages), limits, served, "messages")
    ids = check_lengths(["messages"], [served.template.prompt(messages)], s, limits, served, "messages")
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    return Parsed(ids, [last_user], s, stops, stream, usage, det, ignore_eos, messages)


def parse_completion(body: dict, served, limits) -> Parsed:
    check_model(body, served)
    s, stops, stream, usage, det, ignore_eos = parse_sampling(body, limits, served.block_size)
    prompts = parse_prompts(body, limits)
    for i, p in enumerate(prompts):
        too_long_untokenized(len(p), limits, served, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    ids = [e.ids for e in served.plain.encode_batch(prompts)]
    param = "prompt"
    ids = check_lengths(prompts, ids, s, limits, served, param)
    return Parsed(ids, prompts, s, stops, stream, usage, det, ignore_eos)


# responses -------------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, rid: str, label: str, created: int, results: list[tuple[str, str]], use: dict) -> dict:
    """A whole answer: results are (text, finish_reason) per choice."""
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason) in enumerate(results)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(results)]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": label, "choices": choices, "usage": use}


def chunk(kind: str, rid: str, label: str, created: int, index: int, text: str | None,
          finish: str | None = None, first: bool = False) -> dict:
    """One server-sent event of a streamed answer (text None: no content in this chunk)."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": label, "choices": [choice]}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def now() -> int:
    return int(time.time())
