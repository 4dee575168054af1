"""What people look at after tokenizing: a paragraph's token boundaries, and how well the vocabulary fits."""
from __future__ import annotations

import html

from tokenizers import Tokenizer


def preview(tok: Tokenizer, text: str, limit: int = 400) -> str:
    """A paragraph with its token boundaries marked by '|', to eyeball the vocabulary."""
    enc = tok.encode(text[:limit])
    return "|".join(text[a:b] for a, b in enc.offsets) + "\n"


_COLOURS = ("#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d7f2e3")


def token_html(tok: Tokenizer, text: str, limit: int = 1200) -> str:
    """An HTML page colouring each token's span of a paragraph; hovering shows its id."""
    text = text[:limit]
    enc = tok.encode(text)
    spans = [
        f'<span style="background:{_COLOURS[i % len(_COLOURS)]}" title="id {tid}">{html.escape(text[a:b])}</span>'
        for i, (tid, (a, b)) in enumerate(zip(enc.ids, enc.offsets))
    ]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>forja tokens</title></head>"
            "<body style='font-family:monospace;white-space:pre-wrap;line-height:1.8'>"
            f"<p>{len(enc.ids)} tokens for {len(text.encode())} bytes "
            f"({len(text.encode()) / max(len(enc.ids), 1):.2f} bytes/token); each colour is one token.</p>"
            + "".join(spans) + "</body></html>\n")


def vocabulary_report(vocab: int, documents: int, n_bytes: int, n_tokens: int, used: int) -> dict:
    """How well the vocabulary fits held-out text (documents of n_bytes UTF-8 bytes and n_tokens
    tokens, `used` distinct ids among them): bytes per token, share of the vocabulary used.

    The eot-inclusive figure the evaluation uses for bits per byte counts one separator
    token and byte per document on top of these.
    """
    return {"val_bytes_per_token": (n_bytes + documents) / (n_tokens + documents),
            "val_bytes_per_token_text": n_bytes / max(n_tokens, 1), "vocab_used": used,
            "vocab_used_fraction": used / vocab}
