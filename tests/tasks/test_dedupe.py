import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import dedupe as d
from tasks.config import DedupeConfig
from tests.fixtures.site import SENTENCES
from tests.fixtures.docs import read_docs


def corpus():
    a = " ".join(SENTENCES[0:12])
    near = a.replace(SENTENCES[3], "Uma frase nova entra no lugar de outra sem mudar o resto do texto.")
    b = " ".join(SENTENCES[12:24])
    c = " ".join(SENTENCES[24:36])
    exact = "  " + b.upper() + "  "  # same words, other case and spacing
    return ["a", "near", "b", "c", "exact"], [a, near, b, c, exact]


def test_planted_near_duplicate_is_removed_and_linked(tmp_path):
    ids, texts = corpus()
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "url": [f"http://x/{i}" for i in ids], "text": texts}), src)
    stats = d.build(DedupeConfig(threshold=0.7), [src], tmp_path)
    kept = read_docs(tmp_path).column("id").to_pylist()
    removed = {r["id"]: r for r in pq.read_table(tmp_path / "removed.parquet").to_pylist()}
    assert kept == ["a", "b", "c"]
    assert removed["near"]["duplicate_of"] == "a" and removed["near"]["kind"] == "near"
    assert removed["near"]["duplicate_of_url"] == "http://x/a" and removed["near"]["similarity"] >= 0.7
    assert removed["exact"]["duplicate_of"] == "b" and removed["exact"]["kind"] == "exact"
    assert stats["documents_in"] == stats["documents_out"] + sum(stats["removed"].values())


def test_threshold_above_similarity_keeps_both():
    ids, texts = corpus()
    removed = d.find_duplicates(ids[:2], texts[:2], DedupeConfig(threshold=0.95))
    assert removed == {}


def test_signatures_do_not_depend_on_python_hash_seed():
    import subprocess
    import sys

    code = ("from tasks.dedupe import signature_matrix; from tasks.config import DedupeConfig;"
            "print(list(signature_matrix(['um dois tres quatro cinco seis sete oito'], DedupeConfig())[0, :4]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": s, "PATH": ""}).stdout for s in ("1", "2")}
    assert len(outs) == 1 and outs.pop().startswith("[")


def test_threshold_too_high_for_num_perm_is_a_config_error():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="raise num_perm"):
        DedupeConfig(threshold=0.99, num_perm=128)


def test_signature_of_a_text_does_not_depend_on_its_batch():
    from tasks.dedup.minhash import Signer

    s = Signer()
    a, b = "um dois tres quatro cinco seis sete oito", "curto"
    both = s.signature_matrix([a, "", b, "  " + a.upper() + "\n"])
    assert (both[0] == s.signature_matrix([a])[0]).all() and (both[2] == s.signature_matrix([b])[0]).all()
    assert (both[3] == both[0]).all()  # case and spacing do not matter
    assert (both[1] == 2**32 - 1).all()  # no words: the empty signature


def test_signature_jaccard_tracks_exact_jaccard():
    from tasks.dedup.minhash import Signer

    words = SENTENCES[0].split() + SENTENCES[1].split() + SENTENCES[2].split()
    a = " ".join(words)
    b = " ".join(words[:-6] + ["outra", "coisa", "bem", "diferente", "no", "fim"])
    sh = lambda t: {" ".join(t.lower().split()[i:i + 5]) for i in range(len(t.split()) - 4)}  # noqa: E731
    exact = len(sh(a) & sh(b)) / len(sh(a) | sh(b))
    m = Signer(num_perm=256).signature_matrix([a, b])
    assert abs((m[0] == m[1]).mean() - exact) < 0.1


def test_redis_index_gives_the_same_decisions_as_memory(redis_url):
    import redis

    ids, texts = corpus()
    in_memory = d.find_duplicates(ids, texts, DedupeConfig(threshold=0.7))
    on_redis = d.find_duplicates(ids, texts, DedupeConfig(threshold=0.7, index="redis", redis_url=redis_url))
    assert on_redis == in_memory and on_redis
    assert not redis.Redis.from_url(redis_url).keys("forja:dedupe:run:*")  # a run-scoped index is dropped


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_block_band_keys_find_what_datasketch_query_finds(storage, request):
    """DedupeIndex derives band keys for a whole block and talks to MinHashLSH's storage
    directly; an index built that way must answer datasketch's own query() the same."""
    from datasketch import LeanMinHash

    from tasks.dedup.dedupe_index import DedupeIndex
    from tasks.dedup.minhash import Signer

    extra = {"index": "redis", "redis_url": request.getfixturevalue("redis_url")} if storage == "redis" else {}
    cfg = DedupeConfig(threshold=0.5, **extra)
    ids, texts = corpus()
    sigs = Signer(cfg.num_perm, cfg.shingle_size, cfg.seed).signature_matrix(texts)
    index = DedupeIndex(cfg)
    try:
        bands = index.bands(sigs)
        for key, row, keys in zip(ids[:3], sigs, bands):
            index.add(key, b"", row, keys)
        for row, keys in zip(sigs, bands):
            public = index.lsh.query(LeanMinHash(seed=cfg.seed, hashvalues=row, scheme="affine32"))
            assert index.candidates(keys) == {k.decode() if isinstance(k, bytes) else k for k in public}
        assert index.candidates(bands[1]) >= {"a"}  # the near copy of "a" collides in some band
    finally:
        index.close(success=True)


def changed(text):
    """The same page with one sentence rewritten: a near-duplicate of its old version."""
    return text.replace(SENTENCES[14], "Esta frase foi reescrita quando a página mudou de versão.")


def incremental(tmp_path, cfg):
    """Two crawls: the second repeats page a, adds a near copy of a, changes page b slightly
    and adds a new page c."""
    ids, texts = corpus()
    first = tmp_path / "first.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "url": ["http://x/a", "http://x/b"], "text": [texts[0], texts[2]]}), first)
    second = tmp_path / "second.parquet"
    pq.write_table(pa.table({"id": ["a", "near", "b", "c"], "url": ["http://x/a", "http://x/near", "http://x/b", "http://x/c"],
                             "text": [texts[0], texts[1], changed(texts[2]), texts[3]]}), second)
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    out1.mkdir()
    out2.mkdir()
    d.build(cfg, [first], out1, str(tmp_path))
    d.commit(cfg, out1, str(tmp_path))  # as the dedupe task does once the folder is committed
    stats = d.build(cfg, [second], out2, str(tmp_path))
    d.commit(cfg, out2, str(tmp_path))
    kept = read_docs(out2).column("id").to_pylist()
    removed = {r["id"]: (r["kind"], r["duplicate_of"], r["duplicate_of_url"])
               for r in pq.read_table(out2 / "removed.parquet").to_pylist()}
    return kept, removed, stats


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_incremental_refresh_keeps_the_whole_current_corpus(storage, tmp_path, request):
    extra = {"index": "redis", "redis_url": request.getfixturevalue("redis_url")} if storage == "redis" else {}
    cfg = DedupeConfig(threshold=0.7, index_name=f"site-{storage}", **extra)
    kept, removed, stats = incremental(tmp_path, cfg)
    # a (kept before, same text) stays; b changed and is not a duplicate of its own old
    # version; the near copy of a is removed naming a; c is new.
    assert kept == ["a", "b", "c"]
    assert removed == {"near": ("near", "a", "http://x/a")}
    assert stats["kept"] == {"new": 1, "changed": 1, "unchanged": 1} and stats["index_before"] == 2
    assert stats["documents_in"] == stats["documents_out"] + sum(stats["removed"].values())
    # The index now holds b's new text: a third run of the same crawl changes nothing.
    out3 = tmp_path / "o3"
    out3.mkdir()
    third = d.build(cfg, [tmp_path / "second.parquet"], out3, str(tmp_path))
    d.commit(cfg, out3, str(tmp_path))
    assert read_docs(out3).column("id").to_pylist() == kept
    assert third["kept"] == {"new": 0, "changed": 0, "unchanged": 3} and third["removed"]["near"] == 1


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_incremental_new_only_outputs_new_and_changed_documents(storage, tmp_path, request):
    extra = {"index": "redis", "redis_url": request.getfixturevalue("redis_url")} if storage == "redis" else {}
    cfg = DedupeConfig(threshold=0.7, index_name=f"site-new-{storage}", incremental="new_only", **extra)
    kept, removed, stats = incremental(tmp_path, cfg)
    assert kept == ["b", "c"]
    assert removed == {"a": ("seen", "a", ""), "near": ("near", "a", "")}
    assert stats["kept"] == {"new": 1, "changed": 1, "unchanged": 0}


def test_a_new_document_duplicating_one_kept_before_is_removed_naming_it(tmp_path):
    """Run 2 no longer has a, but a new page with a's text (a moved page) is still removed as its copy."""
    ids, texts = corpus()
    cfg = DedupeConfig(threshold=0.7, index_name="moved")
    runs = [(["a", "b"], [texts[0], texts[2]]), (["a2", "b"], ["  " + texts[0].upper(), texts[2]])]
    for n, (run_ids, run_texts) in enumerate(runs):
        src, out = tmp_path / f"in{n}.parquet", tmp_path / f"o{n}"
        out.mkdir()
        pq.write_table(pa.table({"id": run_ids, "url": [f"http://x/{i}" for i in run_ids], "text": run_texts}), src)
        stats = d.build(cfg, [src], out, str(tmp_path))
        d.commit(cfg, out, str(tmp_path))
    removed = pq.read_table(tmp_path / "o1" / "removed.parquet").to_pylist()
    assert [(r["id"], r["kind"], r["duplicate_of"]) for r in removed] == [("a2", "exact", "a")]
    assert read_docs(tmp_path / "o1").column("id").to_pylist() == ["b"] and stats["kept"]["unchanged"] == 1


def test_shards_are_deduplicated_against_each_other_and_keep_their_numbers(tmp_path):
    ids, texts = corpus()
    a, b = tmp_path / "documents-00000.parquet", tmp_path / "documents-00001.parquet"
    pq.write_table(pa.table({"id": ids[:3], "url": [f"http://x/{i}" for i in ids[:3]], "text": texts[:3]}), a)
    pq.write_table(pa.table({"id": ids[3:], "url": [f"http://x/{i}" for i in ids[3:]], "text": texts[3:]}), b)
    out = tmp_path / "out"
    out.mkdir()
    d.build(DedupeConfig(threshold=0.7), [a, b], out)
    assert pq.read_table(out / "documents-00001.parquet").column("id").to_pylist() == ["c"]
    removed = {r["id"]: r["duplicate_of"] for r in pq.read_table(out / "removed.parquet").to_pylist()}
    assert removed == {"near": "a", "exact": "b"}  # "exact" in shard 1 duplicates "b" in shard 0
