"""What `forja serve` remembers (the response cache, the exchanges it answered) and how a feedback
becomes a record in the feedback store.

A client sends only request_id, rating, correction and consent: the model, version, messages and
answer of the record are the server's own memory of that exchange (bounded by serve.exchanges_kept),
so nobody can file feedback on words the model never said. The store (tasks.feedback.store, or any
object with its `add`) is imported lazily and opened on the first feedback, so a database that is
down never stops the chat from being answered.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from model.openai_api import ApiError, bad

log = logging.getLogger("forja.serve")


class Recent:
    """A thread-safe mapping that keeps its `size` most recently used entries."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def parse_feedback(body: dict) -> tuple[str, int, str | None, bool]:
    """(request_id, rating +1/-1, correction or None, consent) of a POST /v1/feedback body."""
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise bad(f"request_id must be the id of an answer of this server (the response's `id`), not {rid!r}",
                  "request_id")
    rating = body.get("rating")
    ratings = {"up": 1, "down": -1, 1: 1, -1: -1}
    if isinstance(rating, bool) or not isinstance(rating, (str, int)) or rating not in ratings:
        raise bad(f"rating must be \"up\" or \"down\" (or 1 / -1), not {rating!r}", "rating")
    correction = body.get("correction")
    if correction is not None and not isinstance(correction, str):
        raise bad(f"correction must be text or null, not {correction!r:.80}", "correction")
    consent = body.get("consent", False)
    if not isinstance(consent, bool):
        raise bad(f"consent must be true or false, not {consent!r}", "consent")
    return rid, ratings[rating], (correction.strip() or None) if correction else None, consent


class Feedback:
    """Files feedback on remembered exchanges into the store."""

    def __init__(self, exchanges: Recent, store=None, url: str | None = None):
        self.exchanges, self.store, self.url = exchanges, store, url
        self._lock = threading.Lock()

    def _store(self):
        with self._lock:
            if self.store is None:
                try:
                    from tasks.feedback import store as feedback_store
                except ImportError as e:
                    raise ApiError(503, f"the feedback was NOT stored: this installation has no feedback store "
                                        f"({e})", None, "server_error", "feedback_unavailable") from None
                self.store = feedback_store.open_store(self.url)
            return self.store

    def add(self, body: dict) -> str:
        """Store one feedback (blocking: call it off the event loop); the new record's id."""
        rid, rating, correction, consent = parse_feedback(body)
        exchange = self.exchanges.get(rid)
        if exchange is None:
            raise ApiError(404, f"request_id {rid!r} is not a chat answer this server remembers (it keeps the last "
                                f"{self.exchanges.size}, serve.exchanges_kept, and forgets them on restart); rate "
                                "an answer from this server", "request_id", code="unknown_request_id")
        try:
            store = self._store()
            return str(store.add(request_id=rid, model_name=exchange["model_name"],
                                 model_version=exchange["model_version"], messages=exchange["messages"],
                                 answer=exchange["answer"], rating=rating, correction=correction, consent=consent))
        except ApiError:
            raise
        except Exception as e:  # FeedbackError, or a store that cannot be opened: said, never silent
            log.error("feedback on %s NOT stored: %s: %s", rid, type(e).__name__, e)
            raise ApiError(503, f"the feedback was NOT stored: {e}. The answer was fine; try again later", None,
                           "server_error", "feedback_unavailable") from None
