"""The feedback store: every rated exchange, kept in a real database.

SQLite in the work directory by default (WAL journal, synchronous=FULL: a commit is on disk
before add() returns, so an acknowledged record survives a crash of the server or the
machine), PostgreSQL when the URL says so (postgresql+psycopg2://USER:PW@HOST:PORT/DB).
SQLAlchemy Core, two tables:

  feedback            one row per rating: the exchange (request id, model name and version,
                      messages, answer), the rating (+1/-1), the user's correction, consent
  feedback_snapshots  one row per snapshot the feedback flow trained on: the last record id
                      it took, so the next run starts after it

PII is scrubbed (the normalize stage's scrubber) from the messages, the answer and the
correction before anything is written. A database that is down or refuses the write raises
FeedbackError naming the database, its password hidden, never a hang (connect timeout).
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from tasks.text.pii import scrub

ROLES = ("system", "user", "assistant")
CONNECT_TIMEOUT_S = 5  # PostgreSQL: a server that is down answers in seconds, not never
SQLITE_BUSY_MS = 30_000  # SQLite: wait this long for another writer's lock

metadata = sa.MetaData()
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("request_id", sa.String(200), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False, index=True),
    sa.Column("model_version", sa.String(50), nullable=False),
    sa.Column("messages", sa.JSON, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("rating", sa.SmallInteger, nullable=False),
    sa.Column("correction", sa.Text, nullable=True),
    sa.Column("consent", sa.Boolean, nullable=False),
    sqlite_autoincrement=True,  # ids never reused: "after the last snapshot's id" stays exact
)
snapshots = sa.Table(
    "feedback_snapshots", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False, index=True),
    sa.Column("first_record_id", sa.Integer, nullable=False),
    sa.Column("last_record_id", sa.Integer, nullable=False),
    sa.Column("stage_key", sa.String(64), nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sqlite_autoincrement=True,
)


class FeedbackError(RuntimeError):
    """The feedback database is down or refused the write (its message names the database)."""


def default_url(workdir: str) -> str:
    """The default store: SQLite at <workdir>/feedback/feedback.db (absolute)."""
    return f"sqlite:///{Path(workdir).resolve() / 'feedback' / 'feedback.db'}"


def safe_url(url: str | URL) -> str:
    """The URL as it may be shown: any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show no part of it that could be a secret
        return re.sub(r"//[^@/]*@", "//***@", str(url))


def _hide(text: str, url: URL) -> str:
    """text with the URL's password removed wherever a driver may have echoed it."""
    return text.replace(url.password, "***") if url.password else text


def _engine(url: URL) -> sa.Engine:
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # WAL + FULL: the commit is fsynced before it returns
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            cur.close()
        return engine
    args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        args = {"connect_timeout": CONNECT_TIMEOUT_S}  # (a connect_timeout in the URL's query wins)
    return sa.create_engine(url, connect_args=args, pool_pre_ping=True)


def _text(field: str, value: Any, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"feedback {field} must be a string; got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise ValueError(f"feedback {field} must not be empty")
    return value


def check_messages(messages: Any) -> list[dict]:
    """The messages as [{role, content}], or a ValueError naming the bad one."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"feedback messages must be a non-empty list of {{role, content}}; got "
                         f"{type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"feedback messages[{i}] must be an object {{role, content}}; got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"feedback messages[{i}].role {m.get('role')!r} must be one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _text(f"messages[{i}].content", m.get("content"))})
    return out


def _scrubbed(text: str) -> str:
    return scrub(text)[0]


class FeedbackStore:
    """One database of feedback; thread-safe (a connection pool), cheap to keep open."""

    def __init__(self, url: str):
        self.url = make_url(url)
        self.shown = safe_url(self.url)
        self.engine = _engine(self.url)

    def _fail(self, doing: str, e: Exception) -> FeedbackError:
        cause = getattr(e, "orig", None) or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        return FeedbackError(f"the feedback database {self.shown} {doing}: {_hide(first, self.url)}")

    def create_schema(self) -> None:
        try:
            metadata.create_all(self.engine)
        except sa.exc.SQLAlchemyError as e:
            raise self._fail("could not be opened", e) from None

    def add(self, *, request_id: str, model_name: str, model_version: str, messages: list[dict], answer: str,
            rating: int, correction: str | None, consent: bool) -> str:
        """Store one rated exchange (PII scrubbed first); committed durably before the new id returns."""
        if isinstance(rating, bool) or rating not in (1, -1):
            raise ValueError(f"feedback rating must be 1 (thumbs up) or -1 (thumbs down); got {rating!r}")
        if not isinstance(consent, bool):
            raise ValueError(f"feedback consent must be true or false; got {consent!r}")
        if correction is not None:
            correction = _text("correction", correction).strip() or None
        row = {
            "created_at": dt.datetime.now(dt.timezone.utc),
            "request_id": _text("request_id", request_id, empty_ok=False),
            "model_name": _text("model_name", model_name, empty_ok=False),
            "model_version": _text("model_version", str(model_version) if isinstance(model_version, int)
                                   else model_version, empty_ok=False),
            "messages": [{**m, "content": _scrubbed(m["content"])} for m in check_messages(messages)],
            "answer": _scrubbed(_text("answer", answer)),
            "rating": rating,
            "correction": None if correction is None else _scrubbed(correction),
            "consent": consent,
        }
        try:
            with self.engine.begin() as conn:
                new_id = conn.execute(sa.insert(feedback).values(**row).returning(feedback.c.id)).scalar_one()
        except sa.exc.SQLAlchemyError as e:
            raise self._fail("did not store the feedback", e) from None
        return str(new_id)

    def records(self, model_name: str, after: int = 0, upto: int | None = None) -> list[dict]:
        """The model's records with after < id (<= upto when given), in id order; created_at as
        ISO 8601 UTC."""
        q = sa.select(feedback).where(feedback.c.model_name == model_name, feedback.c.id > after)
        if upto is not None:
            q = q.where(feedback.c.id <= upto)
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(q.order_by(feedback.c.id)).mappings().all()
        except sa.exc.SQLAlchemyError as e:
            raise self._fail("could not be read", e) from None
        return [{**r, "created_at": _utc(r["created_at"]).isoformat()} for r in rows]

    def last_snapshot(self, model_name: str) -> dict | None:
        """The model's latest recorded snapshot, or None before the first."""
        q = sa.select(snapshots).where(snapshots.c.model_name == model_name).order_by(snapshots.c.id.desc()).limit(1)
        try:
            with self.engine.connect() as conn:
                row = conn.execute(q).mappings().first()
        except sa.exc.SQLAlchemyError as e:
            raise self._fail("could not be read", e) from None
        return None if row is None else {**row, "created_at": _utc(row["created_at"]).isoformat()}

    def record_snapshot(self, *, model_name: str, first_record_id: int, last_record_id: int, stage_key: str,
                        counts: dict) -> int:
        """Remember that the records up to last_record_id were trained on; the next snapshot starts after it."""
        row = {"created_at": dt.datetime.now(dt.timezone.utc), "model_name": model_name,
               "first_record_id": first_record_id, "last_record_id": last_record_id, "stage_key": stage_key,
               "counts": counts}
        try:
            with self.engine.begin() as conn:
                return conn.execute(sa.insert(snapshots).values(**row).returning(snapshots.c.id)).scalar_one()
        except sa.exc.SQLAlchemyError as e:
            raise self._fail("did not record the snapshot", e) from None

    def close(self) -> None:
        self.engine.dispose()


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def open_store(url: str) -> FeedbackStore:
    """The store at url, its tables created when missing (FeedbackError when the database is down)."""
    try:
        store = FeedbackStore(url)
    except (sa.exc.ArgumentError, ValueError) as e:
        raise ValueError(f"feedback database URL {safe_url(url)} is not a SQLAlchemy URL ({e}); use "
                         "sqlite:///PATH or postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE") from None
    except ImportError as e:
        raise FeedbackError(f"the feedback database {safe_url(url)} needs a driver that is not installed: {e}") from None
    store.create_schema()
    return store
