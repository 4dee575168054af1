"""File sources as units of work: .jsonl.gz and Parquet sources, per-file limits, WARC read
once, and a stage output that does not depend on the order the units ran in."""
import gzip
import json
import logging
import time
from collections import Counter
from io import BytesIO

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.warcwriter import WARCWriter

from tasks import crawl as c
from tasks.config import CrawlConfig
from tasks.ingest import sources, units
from tasks.ingest.documents import DocumentSink
from tests.fixtures.docs import read_docs
from tests.tasks.ingest.test_inputs_bounds import html, peak_while, response, zeros_gzip
from tests.tasks.ingest.test_sources import write_warc


def many_records_warc(path, n=6, size=2000, gz=True):
    buf = BytesIO()
    w = WARCWriter(buf, gzip=gz)
    for i in range(n):
        response(w, f"http://a.example/{i}.html", html(f"Documento {i}. " + "texto " * (size // 6)))
    path.write_bytes(buf.getvalue())
    return path


def sources_in(tmp_path):
    """A WARC, a folder, a .jsonl.gz, the same JSONL again (its ids are dropped as duplicates) and
    two Parquet files through a glob."""
    warc = write_warc(tmp_path / "w.warc.gz")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("Um texto numa pasta.", encoding="utf-8")
    lines = [json.dumps({"k": f"j{i}", "body": f"Linha número {i}."}) for i in range(3)]
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for n in (1, 2):
        pq.write_table(pa.table({"doc": [f"p{n}-{i}" for i in range(4)],
                                 "content": [f"Texto {i} do ficheiro {n}." for i in range(4)]}),
                       tmp_path / f"part-{n}.parquet")
    jsonl = {"path": str(tmp_path / "chats.jsonl.gz"), "text_field": "body", "id_field": "k"}
    return CrawlConfig(warc=[str(warc)], folders=[str(folder)], jsonl=[jsonl, jsonl], shard_docs=3,
                       parquet=[{"path": str(tmp_path / "part-*.parquet"), "text_field": "content", "id_field": "doc"}])


def test_jsonl_gz_and_parquet_sources_become_documents_and_duplicates_across_units_are_kept_once(tmp_path):
    cfg = sources_in(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stats = c.build(cfg, out)
    rows = read_docs(out).to_pylist()
    assert Counter(r["source"] for r in rows) == {"warc": 2, "folder": 1, "jsonl": 3, "parquet": 8}
    texts = {r["url"].rsplit("/", 1)[1]: r["text"] for r in rows}
    assert texts["chats.jsonl.gz#j1"] == "Linha número 1." and texts["part-2.parquet#p2-3"] == "Texto 3 do ficheiro 2."
    assert stats["documents"] == 14 and stats["counts"]["jsonl_documents"] == 3
    assert sorted(p.name for p in out.iterdir()) == [f"documents-{i:05d}.parquet" for i in range(7)]
    assert [r["source"] for r in rows][:3] == ["warc", "warc", "folder"]  # source order


def test_units_run_in_reverse_order_give_the_same_stage_output(tmp_path):
    cfg = sources_in(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = c.build(cfg, tmp_path / "a")
    jobs = [(cfg, kind, path, tf, idf, i, str(tmp_path / "b")) for i, (kind, path, tf, idf) in enumerate(units.plan(cfg))]
    results = [c.crawl_file.fn(*job) for job in reversed(jobs)]
    counts = Counter()
    second = units.assemble(tmp_path / "b", DocumentSink(tmp_path / "b", cfg.shard_docs), results, counts)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        a, b = (pq.read_table(tmp_path / d / name).drop(["fetched_at"]) for d in "ab")
        assert a.equals(b), name
    assert second["content_digest"] == first["content_digest"] and dict(counts) == first["counts"]


def test_a_missing_parquet_column_names_the_file_the_column_and_the_columns_it_has(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": ["1"]}), path)
    with pytest.raises(ValueError, match=r"t\.parquet has no column 'text' \(its text_field\); its columns are body, id"):
        list(sources.read_parquet(path, "text", "id", Counter()))


def test_a_warc_is_read_once(tmp_path):
    for path in (many_records_warc(tmp_path / "a.warc.gz"), many_records_warc(tmp_path / "a.warc", gz=False),
                 write_warc(tmp_path / "b.warc.gz")):
        stats, counts = {}, Counter()
        rows = list(sources.read_warc(path, counts, stats=stats))
        assert rows and not counts["warc_corrupt"]
        assert stats["disk_bytes"] == path.stat().st_size, path.name  # each byte read once, no second pass


def test_per_file_limits_skip_the_rest_of_a_file_and_name_it(tmp_path, caplog):
    warc = many_records_warc(tmp_path / "a.warc.gz", n=6, size=2000)
    jsonl = tmp_path / "a.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.writelines(json.dumps({"text": "x" * 1000}) + "\n" for _ in range(10))
    table = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["y" * 1000] * 10}), table)
    limit = 5000
    with caplog.at_level(logging.WARNING, logger="forja.crawl"):
        for kind, read in (("warc", lambda n: sources.read_warc(warc, n, max_file_bytes=limit)),
                           ("jsonl", lambda n: sources.read_jsonl(jsonl, "text", None, n, max_file_bytes=limit)),
                           ("parquet", lambda n: sources.read_parquet(table, "text", None, n, max_file_bytes=limit))):
            counts = Counter()
            rows = list(read(counts))
            assert 1 <= len(rows) <= 5 and counts[f"{kind}_file_limit"] == 1, (kind, len(rows), counts)
    for path in (warc, jsonl, table):
        assert any(str(path) in r.getMessage() and "max_file_bytes" in r.getMessage() for r in caplog.records)


def test_a_warc_bomb_in_a_crawl_is_a_counted_too_large_within_a_small_memory_bound(tmp_path):
    buf = BytesIO()
    w = WARCWriter(buf, gzip=True)
    response(w, "http://a.example/1.html", html("Primeiro documento."))
    response(w, "http://a.example/bomb.html", zeros_gzip(150 * 2**20), [("Content-Encoding", "gzip")])
    path = tmp_path / "bomb.warc.gz"
    path.write_bytes(buf.getvalue())
    assert path.stat().st_size < 4096  # a few KiB on disk, 150 MiB inflated
    out = tmp_path / "out"
    out.mkdir()
    stats, peak = peak_while(lambda: c.build(CrawlConfig(warc=[str(path)], max_body_bytes=2**20), out))
    assert stats["documents"] == 1 and stats["counts"]["warc_too_large"] == 1
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_the_local_fingerprint_follows_parquet_globs_and_jsonl_gz(tmp_path):
    from tasks.web.freshness import local_fingerprint

    cfg = sources_in(tmp_path)
    before = local_fingerprint(cfg)
    pq.write_table(pa.table({"doc": ["n"], "content": ["Um ficheiro novo."]}), tmp_path / "part-3.parquet")
    added = local_fingerprint(cfg)
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"k": "j9", "body": "Outra."}) + "\n")
    assert len({before, added, local_fingerprint(cfg)}) == 3


@pytest.mark.slow  # starts Prefect's test server
def test_under_prefect_each_file_is_a_crawl_file_task_run_and_the_output_is_the_same(prefect_harness, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.crawl import crawl

    cfg = sources_in(tmp_path)

    @flow(name="crawl-files")
    def crawl_files(workdir: str) -> str:
        return crawl(cfg, workdir).folder

    state = crawl_files(str(tmp_path / "work"), return_state=True)
    expected = {"crawl": 1, "crawl-file": len(units.plan(cfg))}
    for _ in range(50):  # task run states reach the API a moment after the flow returns
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
                state.state_details.flow_run_id])))
        names = Counter(r.name.rsplit("-", 1)[0] for r in runs if r.state is not None and r.state.name == "Completed")
        if names == expected:
            break
        time.sleep(0.1)
    assert names == expected
    plain = tmp_path / "plain"
    plain.mkdir()
    stats = c.build(cfg, plain)
    folder = state.result()
    assert rows_of(folder) == rows_of(plain) and stats["documents"] == 14


def rows_of(folder):
    return [{k: v for k, v in r.items() if k != "fetched_at"} for r in read_docs(folder).to_pylist()]


def test_a_cut_jsonl_gz_keeps_its_whole_lines_and_counts_the_damage(tmp_path, caplog):
    packed = gzip.compress("".join(json.dumps({"text": f"Linha {i}. " * 40}) + "\n" for i in range(50)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    counts = Counter()
    with caplog.at_level(logging.WARNING, logger="forja.crawl"):
        rows = list(sources.read_jsonl(path, "text", None, counts))
    assert 0 < len(rows) < 50 and counts["jsonl_corrupt"] == 1
    assert any(str(path) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
