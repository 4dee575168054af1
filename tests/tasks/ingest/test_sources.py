import json
from collections import Counter
from io import BytesIO

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks import crawl as c
from tasks.ingest import sources
from tasks.config import CrawlConfig
from tests.fixtures.docs import read_docs


def write_warc(path, gzip=True, corrupt_after=None):
    """Records: html, revisit, pdf, request, html2; optionally garbage after record n."""
    buf = BytesIO()
    w = WARCWriter(buf, gzip=gzip)
    specs = [
        ("response", "http://a.example/1.html", "text/html; charset=utf-8", "<html><body><p>Olá, primeiro.</p></body></html>"),
        ("revisit", "http://a.example/1.html", "text/html", ""),
        ("response", "http://a.example/doc.pdf", "application/pdf", "%PDF-1.4"),
        ("request", "http://a.example/2.html", None, ""),
        ("response", "http://a.example/2.html", "text/html", "<html><body><p>Segundo documento.</p></body></html>"),
    ]
    for n, (kind, url, ctype, body) in enumerate(specs):
        if kind == "request":
            rec = w.create_warc_record(url, "request", payload=BytesIO(b"GET /2.html HTTP/1.1\r\n\r\n"))
        else:
            http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            rec = w.create_warc_record(url, kind, payload=BytesIO(body.encode()), http_headers=http)
        w.write_record(rec)
        if corrupt_after == n:
            buf.write(b"\x1f\x8b\x08\x00garbage that is not a gzip member at all" * 3 if gzip else b"WARC/1.0\r\nbroken\r\n\r\n")
    path.write_bytes(buf.getvalue())
    return path


def test_warc_response_records_become_documents_and_the_rest_is_counted(tmp_path):
    counts = Counter()
    rows = list(sources.read_warc(write_warc(tmp_path / "a.warc.gz"), counts))
    assert [r["url"] for r in rows] == ["http://a.example/1.html", "http://a.example/2.html"]
    assert counts["warc_revisit"] == 1 and counts["warc_not_html"] == 1 and counts["warc_request"] == 1


def test_corrupt_warc_record_is_counted_and_the_rest_still_read(tmp_path):
    for gz in (True, False):
        counts = Counter()
        path = write_warc(tmp_path / f"bad{gz}.warc", gzip=gz, corrupt_after=2)
        rows = list(sources.read_warc(path, counts))
        assert counts["warc_corrupt"] >= 1
        assert "http://a.example/2.html" in [r["url"] for r in rows]


def test_folders_jsonl_and_warc_feed_the_crawl(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.html").write_text("<html><body><p>Página interna sobre backups.</p></body></html>", encoding="utf-8")
    (docs / "sub" / "b.md").write_text("# Nota\nTexto em markdown.", encoding="utf-8")
    (docs / "c.txt").write_text("Texto simples.", encoding="utf-8")
    (docs / "d.png").write_bytes(b"\x89PNG")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"id": "t1", "body": "Cliente pergunta sobre senha."}) + "\n{broken\n"
                     + json.dumps({"id": "t2", "body": "Outra conversa."}) + "\n", encoding="utf-8")
    warc = write_warc(tmp_path / "w.warc.gz")
    cfg = CrawlConfig(folders=[str(docs)], jsonl=[{"path": str(chats), "text_field": "body", "id_field": "id"}],
                      warc=[str(warc)], licence="internal")
    out = tmp_path / "out"
    out.mkdir()
    stats = c.build(cfg, out)
    rows = read_docs(out).to_pylist()
    by_source = Counter(r["source"] for r in rows)
    assert by_source == {"folder": 3, "jsonl": 2, "warc": 2}
    assert stats["counts"]["jsonl_bad_line"] == 1 and stats["counts"]["folder_unsupported_type"] == 1
    texts = {r["url"].rsplit("/", 1)[-1]: r["text"] for r in rows}
    assert "backups" in texts["a.html"] and texts["chats.jsonl#t1"] == "Cliente pergunta sobre senha."
    assert all(r["licence"] == "internal" for r in rows)


def test_bad_documents_are_set_aside_not_fatal(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "nested.html").write_text("<html><body>" + "<div>" * 20000 + "fundo" + "</div>" * 20000 + "</body></html>")
    (docs / "one-line.html").write_text("<html><body><p>" + "a" * 6_000_000 + "</p></body></html>")
    (docs / "latin.txt").write_bytes("texto com acentuação inválida \xff\xfe".encode("latin-1"))
    (docs / "ok.html").write_text("<html><body><p>Documento bom.</p></body></html>")
    out = tmp_path / "out"
    out.mkdir()
    stats = c.build(CrawlConfig(folders=[str(docs)]), out)
    urls = {r["url"].rsplit("/", 1)[1] for r in read_docs(out).to_pylist()}
    assert "ok.html" in urls and "latin.txt" in urls and "one-line.html" not in urls
    assert stats["counts"]["set_aside_html_too_large"] == 1
    total = stats["documents"] + sum(v for k, v in stats["counts"].items() if k.startswith("set_aside"))
    assert total == 4  # every file is either a document or set aside with a reason


def test_seed_list_without_following_links(site, tmp_path):
    from tasks.web.sites import serve_folder

    with serve_folder(site) as base:
        seeds = tmp_path / "seeds.txt"
        seeds.write_text(f"# pages rendered by JavaScript elsewhere\n{base}/docs/p2.html\n{base}/docs/p5.html\n")
        out = tmp_path / "out"
        out.mkdir()
        c.build(CrawlConfig(seed_files=[str(seeds)], follow_links=False, allow_loopback=True, delay_s=0), out)
    urls = sorted(r["url"].rsplit("/", 1)[1] for r in read_docs(out).to_pylist())
    assert urls == ["p2.html", "p5.html"]


def test_loopback_is_refused_unless_allowed(site, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with __import__("pytest").raises(c.CrawlError) as e:
        c.build(CrawlConfig(serve_dir=str(site), seeds=["{serve}/docs/index.html"], delay_s=0), out)
    assert "allow_loopback" in str(e.value)
