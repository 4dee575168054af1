"""The weekly refresh refreshes: crawl keys follow content (local sources by fingerprint, web
seeds by conditional requests under crawl.refresh), against real HTTP servers on loopback
and, for Cached/Completed, under Prefect's test harness."""
import json
import os
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tasks import crawl as c
from tasks.web import freshness
from tasks.config import CrawlConfig, DedupeConfig
from tests.fixtures.docs import read_docs
from tests.fixtures.site import SENTENCES, page, paragraphs
from tests.fixtures.loopback import loopback_server


def text_page(n: int, version: int = 0) -> bytes:
    own = list(SENTENCES[n * 6:(n + 1) * 6])
    if version:
        own[0] = f"Esta é a versão {version} da página, reescrita depois do primeiro rastreamento."
    return page(f"Página {n}", paragraphs(own))


class Site:
    """Pages with ETag and/or Last-Modified validators; every request is logged with the
    conditional headers it carried and the status it got."""

    def __init__(self):
        self.pages: dict[str, dict] = {}
        self.log: list[dict] = []
        for n, validators in enumerate(["etag", "etag", "both", "lm"]):
            self.set(f"/site/p{n}.html", text_page(n), validators)
        nav = "".join(f'<a href="p{n}.html">p{n}</a> ' for n in range(1, 4))
        self.set("/site/p0.html", page("Índice", paragraphs(list(SENTENCES[:6])) + nav), "etag")

    def set(self, path: str, body: bytes, validators: str = "") -> None:
        old = self.pages.get(path, {})
        version = old.get("version", 0) + 1
        self.pages[path] = {"body": body, "version": version, "validators": validators or old["validators"],
                            "etag": f'"{path}-v{version}"',
                            "last_modified": f"Mon, 0{version} Jan 2024 00:00:00 GMT"}

    def handler(site):  # noqa: N805 - the server's handler class closes over the site
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                p = site.pages.get(self.path)
                inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
                if p is None:
                    status, headers, body = 404, {}, b""
                else:
                    headers = {"Content-Type": "text/html"}
                    if p["validators"] in ("etag", "both"):
                        headers["ETag"] = p["etag"]
                    if p["validators"] in ("lm", "both"):
                        headers["Last-Modified"] = p["last_modified"]
                    fresh = (inm == headers.get("ETag")) if inm is not None else (
                        ims is not None and ims == headers.get("Last-Modified"))
                    status, body = (304, b"") if fresh else (200, p["body"])
                site.log.append({"path": self.path, "inm": inm, "ims": ims, "status": status})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def requests(self, since: int = 0) -> list[dict]:
        return [r for r in self.log[since:] if r["path"] != "/robots.txt"]


@pytest.fixture
def web():
    site = Site()
    with loopback_server(site.handler()) as port:
        site.base = f"http://127.0.0.1:{port}"
        yield site


def web_cfg(site, **kw) -> CrawlConfig:
    return CrawlConfig(**({"seeds": [f"{site.base}/site/p0.html"], "refresh": "1h", "delay_s": 0, "retries": 0,
                           "timeout_s": 5, "allow_loopback": True} | kw))


def texts(manifest) -> dict[str, str]:
    return {r["url"].rsplit("/", 1)[1]: r["text"] for r in read_docs(Path(manifest.folder)).to_pylist()}


def test_due_refresh_revalidates_with_conditional_requests_and_keeps_the_key(web, tmp_path):
    cfg, wd, t0 = web_cfg(web), tmp_path / "work", time.time()
    first = c.crawl_stage(cfg, wd, now=t0)
    assert first.counts["new"] == 4 and len(web.requests()) == 4
    assert all(r["inm"] is None and r["ims"] is None for r in web.requests())

    # Within the refresh period: the same crawl, and no request at all.
    n = len(web.log)
    again = c.crawl_stage(cfg, wd, now=t0 + 1800)
    assert again.manifest.key == first.manifest.key and len(web.log) == n and again.counts == {}
    # ... even when its folder is gone: the pages checked in this period come from the store.
    import shutil

    shutil.rmtree(first.manifest.folder)
    rebuilt = c.crawl_stage(cfg, wd, now=t0 + 1800)
    assert rebuilt.manifest.key == first.manifest.key and not web.requests(n) and rebuilt.counts["reused"] == 4

    # Due: every page is revalidated with the validators it sent, and answers 304.
    n = len(web.log)
    due = c.crawl_stage(cfg, wd, now=t0 + 3601)
    sent = {r["path"]: r for r in web.requests(n)}
    assert {p: r["status"] for p, r in sent.items()} == {f"/site/p{i}.html": 304 for i in range(4)}
    assert sent["/site/p1.html"]["inm"] == '"/site/p1.html-v1"' and sent["/site/p1.html"]["ims"] is None
    assert sent["/site/p2.html"]["inm"] and sent["/site/p2.html"]["ims"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    assert sent["/site/p3.html"]["inm"] is None and sent["/site/p3.html"]["ims"]
    assert due.counts["not_modified"] == 4 and not due.counts.get("changed") and not due.counts.get("new")
    assert due.manifest.key == first.manifest.key  # same documents, same key: later stages are cache hits
    assert due.manifest == rebuilt.manifest  # the very folder: its manifest is returned as it is

    # One page changes: it alone is fetched again (200), its new text makes a new key.
    web.set("/site/p2.html", text_page(2, version=2))
    n = len(web.log)
    changed = c.crawl_stage(cfg, wd, now=t0 + 7300)
    statuses = {r["path"]: r["status"] for r in web.requests(n)}
    assert statuses["/site/p2.html"] == 200 and sorted(statuses.values()) == [200, 304, 304, 304]
    assert changed.counts["changed"] == 1 and changed.counts["not_modified"] == 3
    assert changed.manifest.key != first.manifest.key
    assert "versão 2" in texts(changed.manifest)["p2.html"] and "versão 2" not in texts(first.manifest)["p2.html"]
    assert changed.manifest.stats["counts"]["changed"] == 1  # the new folder's manifest counts it too


def test_a_stored_body_gone_missing_is_fetched_again_unconditionally(web, tmp_path):
    cfg, wd, t0 = web_cfg(web), tmp_path / "work", time.time()
    first = c.crawl_stage(cfg, wd, now=t0)
    c.http_cache(wd)._paths(f"{web.base}/site/p1.html")[1].unlink()  # the stored document is lost
    n = len(web.log)
    due = c.crawl_stage(cfg, wd, now=t0 + 3601)
    sent = {r["path"]: r for r in web.requests(n)}
    assert sent["/site/p1.html"]["inm"] is None and sent["/site/p1.html"]["status"] == 200
    assert due.counts["unchanged"] == 1 and due.counts["not_modified"] == 3
    assert due.manifest.key == first.manifest.key


def test_a_changed_file_in_a_folder_source_changes_the_key_and_mtimes_do_not(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for n in range(3):
        (folder / f"d{n}.txt").write_text(" ".join(SENTENCES[n * 5:(n + 1) * 5]), encoding="utf-8")
    cfg, wd = CrawlConfig(folders=[str(folder)]), tmp_path / "work"
    first = c.crawl_stage(cfg, wd).manifest
    for f in folder.iterdir():  # a fresh checkout: new mtimes, same content
        os.utime(f, (time.time() + 100, time.time() + 100))
    assert c.crawl_stage(cfg, wd).manifest.key == first.key
    (folder / "d1.txt").write_text("Um texto novo no lugar do antigo.", encoding="utf-8")
    second = c.crawl_stage(cfg, wd).manifest
    assert second.key != first.key and second.config["sources_fingerprint"] != first.config["sources_fingerprint"]
    assert texts(second)["d1.txt"] == "Um texto novo no lugar do antigo."


def test_every_local_source_kind_is_in_the_fingerprint(tmp_path):
    files = {name: tmp_path / name for name in ("a.jsonl", "b.warc", "seeds.txt")}
    for p in files.values():
        p.write_text("x\n")
    cfg = CrawlConfig(jsonl=[{"path": str(files["a.jsonl"])}], warc=[str(files["b.warc"])],
                      seed_files=[str(files["seeds.txt"])])
    before = freshness.local_fingerprint(cfg)
    for p in files.values():
        p.write_text("y\n")
        assert freshness.local_fingerprint(cfg) != before
        before = freshness.local_fingerprint(cfg)
    assert freshness.local_fingerprint(CrawlConfig(seeds=["http://example.org/"])) is None


def test_refresh_must_be_a_duration():
    import pydantic

    assert CrawlConfig(seeds=["http://example.org/"], refresh="7d").refresh_seconds == 7 * 86400
    with pytest.raises(pydantic.ValidationError, match=r"crawl.refresh \('weekly'\) must be a positive duration"):
        CrawlConfig(seeds=["http://example.org/"], refresh="weekly")


# Under Prefect: Cached and Completed as a deployment run would see them.


def states(flow_state) -> dict[str, str]:
    """The states of the run's stage tasks (not their mapped units, such as dedupe-signatures)."""
    from tests.flows.test_pipeline import task_states

    return {k: v for k, v in task_states(flow_state.state_details.flow_run_id).items() if k in ("crawl", "dedupe")}


def refresh_flow():
    from prefect import flow

    from tasks.crawl import crawl
    from tasks.dedupe import dedupe

    @flow(name="crawl-dedupe")
    def crawl_dedupe(crawl_cfg: dict, workdir: str) -> dict:
        crawled = crawl(CrawlConfig(**crawl_cfg), workdir)
        deduped = dedupe(DedupeConfig(threshold=0.7, index_name="refresh"), crawled, workdir)
        return {"crawl": crawled.key, "dedupe": deduped.key, "crawl_folder": crawled.folder}

    return crawl_dedupe


@pytest.mark.slow  # starts Prefect's test server
def test_served_folder_change_reruns_the_crawl_under_prefect(prefect_harness, site, tmp_path):
    run = refresh_flow()
    cfg = {"serve_dir": str(site), "seeds": ["{serve}/docs/index.html"], "delay_s": 0, "retries": 0,
           "allow_loopback": True}
    wd = str(tmp_path / "work")
    first = run(cfg, wd, return_state=True)
    assert states(first) == {"crawl": "Completed", "dedupe": "Completed"}
    for f in site.rglob("*"):  # mtimes alone do not count
        os.utime(f, (time.time() + 100, time.time() + 100))
    same = run(cfg, wd, return_state=True)
    assert states(same) == {"crawl": "Cached", "dedupe": "Cached"} and same.result() == first.result()

    (site / "docs" / "p3.html").write_bytes(page("Capítulo 3", "<p>" + " ".join(SENTENCES[:3]) + " Uma frase nova.</p>"
                                                 + paragraphs(list(SENTENCES[40:50]))))
    changed = run(cfg, wd, return_state=True)
    assert states(changed) == {"crawl": "Completed", "dedupe": "Completed"}
    assert changed.result()["crawl"] != first.result()["crawl"]
    docs = {r["url"]: r["text"] for r in read_docs(Path(changed.result()["crawl_folder"])).to_pylist()}
    assert "Uma frase nova." in docs["{serve}/docs/p3.html"]


@pytest.mark.slow  # starts Prefect's test server
def test_web_refresh_under_prefect_is_cached_within_the_period_and_304s_keep_every_key(prefect_harness, web,
                                                                                       tmp_path):
    run = refresh_flow()
    cfg = web_cfg(web).model_dump(mode="json")
    wd = str(tmp_path / "work")
    first = run(cfg, wd, return_state=True)
    assert states(first) == {"crawl": "Completed", "dedupe": "Completed"}
    n = len(web.log)
    within = run(cfg, wd, return_state=True)
    assert states(within) == {"crawl": "Cached", "dedupe": "Cached"} and len(web.log) == n  # no network

    def expire_window():
        for f in (Path(wd) / freshness.STATE_DIR).glob("*.json"):
            state = json.loads(f.read_text())
            f.write_text(json.dumps(state | {"started": state["started"] - 3601}))

    expire_window()
    due = run(cfg, wd, return_state=True)
    assert states(due) == {"crawl": "Completed", "dedupe": "Cached"}  # revalidated; same documents, same key
    assert {r["status"] for r in web.requests(n)} == {304} and due.result() == first.result()

    web.set("/site/p3.html", text_page(3, version=2))
    expire_window()
    changed = run(cfg, wd, return_state=True)
    assert states(changed) == {"crawl": "Completed", "dedupe": "Completed"}
    assert changed.result()["crawl"] != first.result()["crawl"]
