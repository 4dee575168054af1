"""The feedback store on SQLite and on a real PostgreSQL server: records come back PII-scrubbed
with their consent, an acknowledged record survives a SIGKILL of the writer, bad input is a
ValueError naming the field, and a database that is down is a FeedbackError (in seconds, the
password hidden)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.feedback.store import FeedbackError, default_url, open_store
from tests.fixtures.postgres import postgres_server  # noqa: F401  (the session fixture)

ROOT = Path(__file__).resolve().parents[3]
EMAIL, CPF = "maria.souza@exemplo.com.br", "529.982.247-25"


def exchange(**kw) -> dict:
    base = dict(request_id="req-1", model_name="chat", model_version="3",
                messages=[{"role": "system", "content": "Seja breve."},
                          {"role": "user", "content": f"Meu e-mail é {EMAIL}, e o CPF {CPF}. Como instalo o vim?"}],
                answer=f"Use apt install vim; escrevo para {EMAIL}.", rating=-1,
                correction="Rode: sudo apt install vim", consent=True)
    return base | kw


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return default_url(str(tmp_path / "work"))
    pg = request.getfixturevalue("postgres_server")
    import psycopg2

    with psycopg2.connect(pg.server + "/feedback") as conn, conn.cursor() as cur:  # a clean database per test
        cur.execute("DROP TABLE IF EXISTS feedback, feedback_snapshots")
    return pg.url


def test_default_url_is_sqlite_in_the_work_directory(tmp_path):
    assert default_url(str(tmp_path / "w")) == f"sqlite:///{tmp_path / 'w' / 'feedback' / 'feedback.db'}"
    store = open_store(default_url(str(tmp_path / "w")))
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        store.close()
    assert (tmp_path / "w" / "feedback" / "feedback.db").is_file()


def test_add_then_read_back_scrubbed_with_consent(url):
    store = open_store(url)
    try:
        first = store.add(**exchange())
        second = store.add(**exchange(request_id="req-2", rating=1, correction=None, consent=False))
        store.add(**exchange(request_id="req-3", model_name="other"))
        rows = store.records("chat")
        assert [r["id"] for r in rows] == [int(first), int(second)] and int(second) > int(first)
        a, b = rows
        text = repr(rows)
        assert EMAIL not in text and CPF not in text
        assert a["messages"][1]["content"] == "Meu e-mail é <EMAIL>, e o CPF <CPF>. Como instalo o vim?"
        assert a["answer"] == "Use apt install vim; escrevo para <EMAIL>."
        assert (a["rating"], a["correction"], a["consent"]) == (-1, "Rode: sudo apt install vim", True)
        assert (b["rating"], b["correction"], b["consent"]) == (1, None, False)
        assert (a["request_id"], a["model_name"], a["model_version"]) == ("req-1", "chat", "3")
        assert a["created_at"].endswith("+00:00")
        assert store.records("chat", after=int(first)) == [b]
        assert store.records("chat", after=0, upto=int(first)) == [a]
        assert store.last_snapshot("chat") is None
        store.record_snapshot(model_name="chat", first_record_id=int(first), last_record_id=int(second),
                              stage_key="k", counts={"kept": 1})
        assert store.last_snapshot("chat")["last_record_id"] == int(second)
    finally:
        store.close()


@pytest.mark.parametrize("change, field", [
    ({"rating": 0}, "rating"), ({"rating": True}, "rating"), ({"rating": 2}, "rating"),
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"consent": "yes"}, "consent"), ({"request_id": ""}, "request_id"), ({"answer": None}, "answer"),
])
def test_bad_input_is_a_value_error_naming_the_field(tmp_path, change, field):
    store = open_store(default_url(str(tmp_path)))
    try:
        with pytest.raises(ValueError, match="feedback " + re.escape(field) + " "):
            store.add(**exchange(**change))
        assert store.records("chat") == []
    finally:
        store.close()


CHILD = """
import sys, time
from tasks.feedback.store import open_store
store = open_store(sys.argv[1])
new = store.add(request_id="killed", model_name="chat", model_version="1", messages=[{"role": "user", "content": "oi"}],
                answer="olá", rating=1, correction=None, consent=True)
print(new, flush=True)
time.sleep(60)
"""


def test_an_acknowledged_record_survives_a_sigkill_of_the_writer(url):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        acknowledged = proc.stdout.readline().strip()
        proc.send_signal(signal.SIGKILL)  # right after add returned: no cleanup, no close
    finally:
        proc.kill()
        proc.wait(10)
    assert acknowledged.isdigit(), "the child did not store its record"
    store = open_store(url)
    try:
        assert [(r["id"], r["request_id"]) for r in store.records("chat")] == [(int(acknowledged), "killed")]
    finally:
        store.close()


def test_a_stopped_postgres_is_a_feedback_error_with_the_password_hidden(postgres_server):
    store = open_store(postgres_server.url)
    try:
        with postgres_server.stopped():
            t0 = time.monotonic()
            with pytest.raises(FeedbackError) as err:
                store.add(**exchange())
            assert time.monotonic() - t0 < 10
        message = str(err.value)
        assert postgres_server.password not in message and "forja:***@127.0.0.1" in message
        assert "/feedback" in message and "refused" in message.lower()
        # the server back: the same store writes again (a dead pooled connection is replaced)
        assert store.add(**exchange()).isdigit()
    finally:
        store.close()


def test_a_server_that_never_answers_fails_within_the_connect_timeout():
    with socket.socket() as silent:  # accepts TCP connections (the backlog) and never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(FeedbackError) as err:
            open_store(f"postgresql+psycopg2://forja:s3cret-pw@127.0.0.1:{port}/feedback?connect_timeout=1")
        assert time.monotonic() - t0 < 8
    assert "s3cret-pw" not in str(err.value) and f"forja:***@127.0.0.1:{port}" in str(err.value)
