"""The chat template: conversations as token ids, with the loss only on the assistant's words.

    <|endoftext|><|user|>\n{question}<|end|>\n<|assistant|>\n{answer}<|end|>\n ...

The role markers and <|end|> are special tokens that the tokenize stage reserves in every
vocabulary (SPECIAL_TOKENS); their embeddings learn their meaning during fine-tuning. Only
the template places them: message text is encoded with special tokens disabled
(plain_tokenizer), so a literal "<|end|>" typed by a user is the bytes of that text,
never the id that closes a message. The leading <|endoftext|> is the
document boundary the model saw in pretraining.
"""
from __future__ import annotations

from dataclasses import dataclass

EOT, PAD = "<|endoftext|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, *(f"<|{r}|>" for r in ROLES), END]


def plain_tokenizer(tokenizer):
    """A copy of tokenizer that encodes special-token text ("<|end|>", "<|endoftext|>") as plain
    text, for text that comes from users or data; the original is left as it is."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain


@dataclass
class Encoded:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is one the model should learn to produce
    truncated: bool


class ChatTemplate:
    def __init__(self, tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer has no {missing} tokens: it was trained before forja reserved chat "
                             "tokens; tokenize and pretrain again to fine-tune on conversations")
        self.tok = tokenizer
        self.plain = plain_tokenizer(tokenizer)  # message text: never a special token
        self.special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.newline = self.plain.encode("\n").ids

    def _turn(self, role: str, text: str) -> tuple[list[int], list[int], list[int]]:
        """(header ids, content ids, closing ids) of one message."""
        return [self.special[f"<|{role}|>"], *self.newline], self.plain.encode(text).ids, [self.special[END], *self.newline]

    def encode(self, messages: list[dict], max_len: int | None = None) -> Encoded:
        """A whole conversation; the loss mask covers each assistant message and its <|end|>."""
        ids, mask = [self.special[EOT]], [False]
        for m in messages:
            head, body, close = self._turn(m["role"], m["content"])
            learn = m["role"] == "assistant"
            ids += head + body + close
            mask += [False] * len(head) + [learn] * (len(body) + 1) + [False] * (len(close) - 1)
        truncated = max_len is not None and len(ids) > max_len
        if truncated:  # keep the start (the question); the answer's tail is what is lost
            ids, mask = ids[:max_len], mask[:max_len]
        return Encoded(ids, mask, truncated)

    def prompt(self, messages: list[dict]) -> list[int]:
        """The ids that ask for the next assistant message."""
        ids = self.encode(messages).ids
        return ids + [self.special["<|assistant|>"], *self.newline]

    @property
    def stop_id(self) -> int:
        return self.special[END]


def as_messages(item: dict, where: str) -> list[dict]:
    """A JSONL record as a conversation: {"messages": [...]} or {"prompt", "response"}."""
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a list of {{role: {'/'.join(ROLES)}, content: str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: the conversation has no assistant message to learn from")
        return msgs
    if isinstance(item.get("prompt"), str) and isinstance(item.get("response"), str):
        return [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["response"]}]
    raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": str, \"response\": str}}")
