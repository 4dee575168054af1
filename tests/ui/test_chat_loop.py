"""The loop of issue 14, end to end with real parts: `forja serve` (its own process, uvicorn on a free
loopback port) answers in headless Chromium on its chat page; a person's ratings and corrections go
through POST /v1/feedback into the SQLite feedback store; the forja-feedback flow turns them into a
fine-tune of the champion, registered with feedback.records; when the alias moves, the running server
answers from the new version without a restart."""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.serving import serve_env, serving
from tests.ui.browser import chrome, wait

ROOT = Path(__file__).resolve().parents[2]
EXCHANGES = [  # (question, rating, the better answer a person writes)
    ("Como vejo o espaço livre no disco?", -1, "Use o comando df -h para ver o espaço livre."),
    ("Como listo os arquivos de uma pasta?", -1, "Use ls -l para listar os arquivos com detalhes."),
    ("Como vejo os processos em execução?", -1, "Use ps aux ou top para ver os processos."),
    ("O que faz o comando pwd?", 1, None),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_version(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "Olá"}], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers["x-forja-model-version"]


def exchange(driver, question: str, rating: int, correction: str | None) -> str:
    """Ask on the page, wait for the streamed answer, rate it (with consent) and send the feedback;
    the status line's record id."""
    from selenium.webdriver.common.by import By

    find = lambda i: driver.find_element(By.ID, i)  # noqa: E731
    find("new-chat").click()  # one question per conversation
    find("message").send_keys(question)
    find("send").click()
    wait(driver, 60).until(lambda d: find("status").text.startswith(("Answered by", "Error")))
    assert find("status").text.startswith("Answered by"), find("status").text
    assert find("answer").get_attribute("data-request-id").startswith("chatcmpl-")
    find("thumbs-up" if rating > 0 else "thumbs-down").click()
    if correction:
        find("correction").clear()
        find("correction").send_keys(correction)
    if not find("consent").is_selected():
        find("consent").click()
    find("submit-feedback").click()
    wait(driver, 30).until(lambda d: find("status").text.startswith(("Feedback stored", "Feedback not stored")))
    assert find("status").text.startswith("Feedback stored as #"), find("status").text
    return find("status").text.split("#", 1)[1].split(".", 1)[0]


@pytest.mark.slow
def test_ratings_in_the_chat_page_become_a_fine_tune_that_the_server_then_answers_with(prefect_harness, tmp_path):
    import mlflow

    from flows.feedback import feedback
    from tasks.feedback.store import default_url, open_store
    from tasks.models import registry, tracking
    from tests.flows.test_feedback import write_config
    from tests.model.test_serving_bounds import register_tiny

    workdir, name = tmp_path / "work", "chat-loop"
    parent = register_tiny(workdir, name)
    client = mlflow.MlflowClient(tracking.tracking_uri(str(workdir)))
    client.set_registered_model_alias(name, "champion", parent.version)
    config = write_config(tmp_path, min_records=3, model=name)
    tree = yaml.safe_load(config.read_text())
    tree["finetune"]["gate_metric"] = "qa.bits_per_byte"  # a suite: always scored (a held-out share may be empty)
    tree["finetune"]["training"]["micro_batch_size"] = 2  # a few conversations: a few sequences
    config.write_text(yaml.safe_dump(tree, allow_unicode=True))

    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "flows.cli", "serve", f"models:/{name}@champion", "--config", str(config),
           "--set", "serve.refresh_s=0.5", "--port", str(port), "--device", "cpu", "--workdir", str(workdir)]
    with serving(cmd, port, serve_env(OMP_NUM_THREADS="1"), log, timeout=120, ready="/v1/models") as url:
        assert chat_version(url) == f"{name}/{parent.version}"

        with chrome() as driver:
            driver.get(url + "/")
            ids = [exchange(driver, *e) for e in EXCHANGES]
        assert len(set(ids)) == len(EXCHANGES)

        store = open_store(default_url(str(workdir)))  # what the page sent, as the flow will read it
        try:
            records = store.records(name)
        finally:
            store.close()
        assert [r["rating"] for r in records] == [e[1] for e in EXCHANGES]
        assert all(r["consent"] and r["model_version"] == str(parent.version) for r in records)
        assert records[0]["correction"] == EXCHANGES[0][2] and records[0]["messages"][-1]["content"] == EXCHANGES[0][0]

        result = feedback(config_path=str(config), workdir=str(workdir))
        assert not result["skipped"], result
        version = client.get_model_version(name, str(result["model_version"]))
        assert int(version.tags["feedback.records"]) == result["feedback"]["train"] >= 1
        if not result["promoted"]:  # the gate kept the champion: a person promotes it (forja promote)
            with registry.registry_lock(str(workdir), name):
                registry.promote(client, name, version.version)
        deadline = time.time() + 60
        while (seen := chat_version(url)) != f"{name}/{version.version}":
            assert time.time() < deadline, f"the server still answers with {seen}\n" + log.read_text()[-3000:]
            time.sleep(0.5)
