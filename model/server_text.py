"""Token ids to streamed text: incremental decoding with stop strings.

Byte-level BPE can end a step in the middle of a UTF-8 character (decoded as U+FFFD), and a stop
string can arrive split over several tokens, so the text handed out after each token holds back an
unfinished character and any tail that could be the start of a stop string. A stop string ends the
text before it; it is never returned.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stops: list[str], incremental: bool = True):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        # a whole answer without stop strings needs decoding once, at the end
        self.incremental = incremental or bool(self.stops)
        self.ids: list[int] = []
        self.text = ""  # the text given out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the new text that is safe to give out (sets stopped on a stop string)."""
        self.ids.append(token)
        if not self.incremental:
            return ""
        full = self.tokenizer.decode(self.ids)
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        safe = len(full.rstrip(REPLACEMENT))
        held = max((k for s in self.stops for k in range(1, len(s)) if full[:safe].endswith(s[:k])), default=0)
        return self._advance(full[: safe - held])

    def finish(self) -> str:
        """The held-back rest once generation ended without a stop string."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.ids))

    def _stop_at(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        found = [i for s in self.stops if (i := full.find(s, start)) >= 0]
        return min(found) if found else None

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.text):  # decoding changed earlier text (cannot in byte-level BPE): keep going
            return ""
        delta, self.text = upto[len(self.text):], upto
        return delta
