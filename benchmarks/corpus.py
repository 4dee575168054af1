"""The data benchmark's WARC corpus: real Portuguese text, a known number of near-duplicates.

Paragraphs come from documentation that ships with the repository or with Debian:

- data/demo-site/focalinux: Guia Foca GNU/Linux (GFDL-1.1, Debian package focalinux-html);
- /usr/share/debian-reference/*.pt*.html: Debian Reference (GPL-2+, debian-reference-pt/-pt-br);
- /usr/share/doc/debian/FAQ/pt: the Debian FAQ (GPL-2+, debian-faq-pt);
- /usr/share/man/pt*, /usr/share/man/pt_BR: Portuguese man pages (manpages-pt-br: GPL-3+; the
  others under their own packages' licences, /usr/share/doc/<package>/copyright).

`ensure_sources` installs the Debian packages when apt-get is there and they are missing (the
corpus still builds from the bundled site alone). Pages are assembled from seeded random runs
of paragraphs (so there are as many distinct documents as the size asks for), wrapped in a site
template (navigation, footer) for the extractor to remove, and written round-robin into several
.warc.gz files (units of work to map). A known share of pages are near-duplicates of earlier
pages (about 0.5% of words changed, the same layout, other links around it), and a known share are too short for the
quality filters. The same (mb, seed) and sources always build the same bytes, into
CACHE/corpus-<mb>mb-s<seed>-f<files>-<digest of the paragraphs>-v<builder version>.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import io
import json
import random
import re
import shutil
import subprocess
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PACKAGES = ("debian-reference-pt", "debian-reference-pt-br", "debian-faq-pt", "manpages-pt-br")
SOURCES = {
    "focalinux": (ROOT / "data/demo-site/focalinux", "**/*.html", "GFDL-1.1 (focalinux-html)"),
    "debian-reference": (Path("/usr/share/debian-reference"), "*.pt*.html", "GPL-2+ (debian-reference-pt, -pt-br)"),
    "debian-faq": (Path("/usr/share/doc/debian/FAQ/pt"), "*.html", "GPL-2+ (debian-faq-pt)"),
    "man-pt": (Path("/usr/share/man"), "pt*/man*/*.gz", "GPL-3+ (manpages-pt-br) and each package's own"),
}
DUP_SHARE = 0.05     # pages that are near-duplicates of an earlier page
SHORT_SHARE = 0.03   # pages too short for the quality filters (< 50 words)
EDIT_RATE = 0.005    # share of words changed in a near-duplicate
VERSION = 4          # bump when the builder's output changes, so old caches are not reused


def ensure_sources() -> dict:
    """Install the Portuguese Debian documentation packages if missing (root and apt-get only);
    returns {package: installed?}."""
    def installed(p):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        return r.returncode == 0 and "ok installed" in r.stdout

    if not shutil.which("dpkg-query"):
        return {}
    missing = [p for p in DEBIAN_PACKAGES if not installed(p)]
    if missing and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                       capture_output=True, text=True, timeout=600)
    return {p: installed(p) for p in DEBIAN_PACKAGES}


def _html_paragraphs(path: Path) -> list[str]:
    import lxml.html

    raw = path.read_bytes()
    try:
        tree = lxml.html.fromstring(raw)
    except Exception:
        return []
    out = []
    for el in tree.iter("p", "li", "dd"):
        text = " ".join(el.text_content().split())
        if len(text) >= 60:
            out.append(text)
    return out


_ROFF_ESC = re.compile(r"\\f[BIRPC]|\\f\(..|\\[(][a-z]{2}|\\-|\\&|\\e|\\\*\(..|\\\*.|\\s[+-]?\d")


def _man_paragraphs(path: Path) -> list[str]:
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    except (OSError, EOFError):
        return []
    paras, cur = [], []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            macro = line.split(maxsplit=1)[0] if line.strip() else ""
            if macro in (".PP", ".P", ".LP", ".SH", ".SS", ".TP", ".IP", ".sp", ".br", ".HP"):
                if cur:
                    paras.append(" ".join(cur))
                cur = []
            elif macro in (".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB") and len(line) > 3:
                cur.append(line.split(maxsplit=1)[1].replace('"', ""))
            continue
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return [p for p in (" ".join(_ROFF_ESC.sub("", p).split()) for p in paras) if len(p) >= 60]


def paragraph_pool() -> tuple[list[str], dict]:
    """Every usable paragraph of the sources, in a fixed order; and per source its count and licence."""
    pool, info = [], {}
    for name, (root, pattern, licence) in SOURCES.items():
        if not root.is_dir():
            info[name] = {"paragraphs": 0, "licence": licence, "missing": str(root)}
            continue
        n0 = len(pool)
        for path in sorted(root.glob(pattern)):
            pool.extend(_man_paragraphs(path) if path.suffix == ".gz" else _html_paragraphs(path))
        info[name] = {"paragraphs": len(pool) - n0, "licence": licence}
    seen, unique = set(), []
    for p in pool:  # the same paragraph in pt and pt-br chapters, or in two man pages, once
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique, info


_NAV = ["Início", "Documentação", "Guias", "Referência", "Perguntas frequentes", "Manuais", "Contato"]


def page(title: str, blocks: list[str], variant: int, rng: random.Random) -> str:
    """An HTML page around the paragraphs: header, navigation, article, side links and footer."""
    nav = "".join(f'<li><a href="/{i}/{variant}.html">{n}</a></li>' for i, n in enumerate(_NAV))
    body = []
    for i, b in enumerate(blocks):
        if i and i % 4 == 0:
            words = rng.choice(blocks).split()[:3]  # three words: no repeated 5-gram for the filters
            body.append(f"<h2>Seção {i // 4}: {html.escape(' '.join(words))}</h2>")
        if rng.random() < 0.15:
            items = [s for s in re.split(r"(?<=[.;:])\s+", b) if s]
            body.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in items) + "</ul>")
        else:
            body.append(f"<p>{html.escape(b)}</p>")
    side = "".join(f'<li><a href="/rel/{variant}-{k}.html">Veja também {k}</a></li>' for k in range(5))
    return (f'<!DOCTYPE html>\n<html lang="pt-BR"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'</head><body><header><div class="logo">Documentação livre</div><nav><ul>{nav}</ul></nav></header>'
            f'<main><article><h1>{html.escape(title)}</h1>{"".join(body)}</article>'
            f'<aside><h3>Relacionados</h3><ul>{side}</ul></aside></main>'
            f'<footer><p>Página {variant} · Texto sob licença livre; veja os créditos.</p>'
            f'<p><a href="/">Voltar ao início</a> | <a href="/mapa.html">Mapa do site</a></p></footer></body></html>')


def _blocks(pool: list[str], rng: random.Random) -> list[str]:
    """3-6 runs of 1-4 consecutive paragraphs from random places of the pool."""
    out = []
    for _ in range(rng.randint(3, 6)):
        start = rng.randrange(len(pool))
        out.extend(pool[start:start + rng.randint(1, 4)])
    return out


def _edit(blocks: list[str], rng: random.Random) -> list[str]:
    """About EDIT_RATE of the words replaced by another word of the same page."""
    words = [b.split() for b in blocks]
    flat = [w for ws in words for w in ws]
    for ws in words:
        for i in range(len(ws)):
            if rng.random() < EDIT_RATE:
                ws[i] = rng.choice(flat)
    return [" ".join(ws) for ws in words]


def _warc_record(writer, url: str, body: bytes, date: str):
    from warcio.statusandheaders import StatusAndHeaders

    headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                          ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
    rec = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers,
                                    warc_headers_dict={"WARC-Date": date,  # fixed ids and dates: the same bytes each build
                                                       "WARC-Record-ID": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}>"})
    writer.write_record(rec)


def url(n: int) -> str:
    return f"https://docs.example.org/p/{n:07d}.html"


def build(mb: float, cache: Path, seed: int = 0, files: int | None = None) -> dict:
    """Build (or reuse) the corpus of about `mb` MB of HTML; returns its description (also corpus.json)."""
    from warcio.warcwriter import WARCWriter

    files = files or 2 * max(4, min(16, round(mb / 4)))  # even, >= 8: units balance over 2 workers
    pool, sources = paragraph_pool()
    # the sources found on this machine are part of the name: another set of packages, another corpus
    digest = hashlib.sha256("\n".join(pool).encode()).hexdigest()[:8]
    folder = cache / f"corpus-{mb:g}mb-s{seed}-f{files}-{digest}-v{VERSION}"
    meta_path = folder / "corpus.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text()) | {"folder": str(folder)}
    if len(pool) < 100:
        raise SystemExit(f"only {len(pool)} paragraphs found in {list(SOURCES)}: is data/demo-site there?")
    rng = random.Random(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    streams = [open(tmp / f"part-{i:03d}.warc.gz", "wb") for i in range(files)]
    writers = [WARCWriter(s, gzip=True) for s in streams]
    target, written, n = int(mb * 2**20), 0, 0
    originals: list[tuple[int, list[str]]] = []
    pairs = []  # (near-duplicate page, the page it copies)
    counts = {"pages": 0, "near_duplicates": 0, "short": 0, "distinct": 0}
    while written < target:
        roll = rng.random()
        if roll < DUP_SHARE and originals:
            source, copied = rng.choice(originals)
            blocks, kind, layout = _edit(copied, rng), "near_duplicates", source
            pairs.append((n, source))
        elif roll < DUP_SHARE + SHORT_SHARE:
            blocks, kind, layout = [" ".join(rng.choice(pool).split()[:30])], "short", n
        else:
            blocks, kind, layout = _blocks(pool, rng), "distinct", n
            if len(originals) < 5000:
                originals.append((n, blocks))
            else:
                originals[rng.randrange(5000)] = (n, blocks)
        title = " ".join(blocks[0].split()[:8])
        # a near-duplicate keeps its original's layout (headings, lists): only its words differ
        body = page(title, blocks, n, random.Random(f"{seed}-{layout}")).encode("utf-8")
        _warc_record(writers[n % files], url(n), body,
                     f"2026-01-01T00:{(n // 60) % 60:02d}:{n % 60:02d}Z")
        counts[kind] += 1
        counts["pages"] += 1
        written += len(body)
        n += 1
    for s in streams:
        s.close()
    meta = {"mb": written / 2**20, "seed": seed, "files": sorted(p.name for p in tmp.glob("*.warc.gz")),
            "warc_bytes": sum(p.stat().st_size for p in tmp.glob("*.warc.gz")), "counts": counts,
            "pool_paragraphs": len(pool), "sources": sources,
            "near_duplicate_pairs": [[url(a), url(b)] for a, b in pairs]}
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return meta | {"folder": str(folder)}

