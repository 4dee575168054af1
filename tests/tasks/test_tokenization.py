from pathlib import Path

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from model.data import read_rows
from tasks import stage
from tasks import tokenization as t
from tasks.config import TokenizeConfig
from tests.fixtures.site import SENTENCES
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
CFG = TokenizeConfig(vocab_size=400, seq_len=16, val_fraction=0.2, min_frequency=1)


def corpus_file(tmp_path):
    texts = [" ".join(SENTENCES[i : i + 4]) for i in range(0, len(SENTENCES), 4)]
    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}), src)
    return src, texts


def test_tokenizer_round_trips_text_exactly(tmp_path):
    _, texts = corpus_file(tmp_path)
    tok = t.train_tokenizer(texts, CFG)
    for s in [texts[0], "Acentuação: ç ã é ü — “aspas” 日本語 🙂\n\ttab  dois espaços"]:
        assert tok.decode(tok.encode(s).ids) == s
    from model.chat import SPECIAL_TOKENS

    # the document separator, padding and the chat template's role markers are single reserved ids
    assert all(tok.token_to_id(s) is not None for s in SPECIAL_TOKENS)
    assert all(tok.encode(s).ids == [tok.token_to_id(s)] for s in SPECIAL_TOKENS)
    assert tok.get_vocab_size() == 400


def test_shards_hold_the_rows_and_checksums_the_manifest_says(tmp_path):
    src, texts = corpus_file(tmp_path)
    m = stage.run_stage("tokenize", CFG, [], tmp_path, lambda out, key: t.build(CFG, [src], out), [t])
    for f in m.files:
        assert stage.sha256_file(m.path(f.path)) == f.sha256
        assert m.path(f.path).stat().st_size == f.bytes
    train = pq.read_table(m.path("train-00000.parquet"))
    col = train.column("tokens").type
    assert col.list_size == CFG.seq_len + 1 and col.value_type == pa.uint16()
    assert train.num_rows == m.stats["rows"]["train"]
    assert pq.read_table(m.path("val-00000.parquet")).num_rows == m.stats["rows"]["val"]
    assert m.stats["documents"]["train"] + m.stats["documents"]["val"] == len(texts)


def test_packing_overlaps_rows_by_one_token(tmp_path):
    _, texts = corpus_file(tmp_path)
    tok = t.train_tokenizer(texts, CFG)
    rows = t.pack(tok, texts, 16)
    assert rows.shape[1] == 17
    assert (rows[1:, 0] == rows[:-1, -1]).all()  # each row's last token starts the next
    assert (rows == tok.token_to_id(t.EOT)).sum() >= len(texts) - 1


def test_vocabulary_report_and_token_page(tmp_path):
    src, texts = corpus_file(tmp_path)
    m = stage.run_stage("tokenize", CFG, [], tmp_path, lambda out, key: t.build(CFG, [src], out), [t])
    assert 1.0 < m.stats["val_bytes_per_token_text"] < 10
    assert 0 < m.stats["vocab_used_fraction"] <= 1
    page = m.path("tokens.html").read_text(encoding="utf-8")
    assert page.count("<span") > 10 and "bytes/token" in page


def test_fast_encoder_gives_the_same_ids_as_tokenizers():
    from tasks.config import TokenizeConfig
    from tasks.tokenization import encode_all, fast_encoder, train_tokenizer
    from tests.fixtures.site import SENTENCES

    corpus = [" ".join(SENTENCES[i : i + 8]) for i in range(0, len(SENTENCES), 4)]
    tok = train_tokenizer(corpus, TokenizeConfig(vocab_size=400, min_frequency=1))
    tricky = ["Ação!  Três\tespaços\n\n\nlinhas 12345 6.7.8 🙂 — «aspas» it's we'll", "   ", "", "ﬁm do ﬂuxo",
              "#" * 300, " x" * 50 + "\r\n"]
    expected = [e.ids for e in tok.encode_batch(corpus + tricky)]
    assert fast_encoder(tok).encode_ordinary_batch(corpus + tricky) == expected
    assert encode_all(tok, corpus + tricky) == expected


def shard_files(folder, n_shards=3, docs_per_shard=12, seed=0, sentences=3):
    """Normalize-like shards of distinct documents (each names its shard and row)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        texts = [f"Documento {s}-{i}. " + " ".join(rng.choices(SENTENCES, k=sentences)) for i in range(docs_per_shard)]
        paths.append(folder / stage.shard_name("documents", s))
        pq.write_table(pa.table({"id": [f"{s}-{i}" for i in range(len(texts))], "text": texts}), paths[-1])
    return paths


def digests(folder):
    return {p.name: stage.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_units_in_any_order_and_a_rerun_write_the_same_files(tmp_path):
    from model.data import open_rows

    docs = shard_files(tmp_path / "norm")
    outs = [tmp_path / n for n in ("a", "b")]
    for o in outs:
        o.mkdir()

    def reversed_units(jobs):  # each unit run on its own, last shard first
        done = {i: t.tokenize_shard.fn(*jobs[i]) for i in reversed(range(len(jobs)))}
        return [done[i] for i in range(len(jobs))]

    stats = [t.build(CFG, docs, outs[0]), t.build(CFG, docs, outs[1], units=reversed_units)]
    assert stats[0] == stats[1] and digests(outs[0]) == digests(outs[1])
    names = set(digests(outs[0]))
    assert {f"{s}-{i:05d}.{x}" for s in ("train", "val") for i in range(3) for x in ("npy", "parquet")} <= names
    before = digests(outs[0])
    t.tokenize_shard.fn(CFG, docs[1], 1, outs[0])  # a unit rerun (a lost worker's retry) rewrites the same bytes
    assert digests(outs[0]) == before and not [p for p in outs[0].iterdir() if p.name.startswith(".")]
    for split in ("train", "val"):  # the .npy copies hold the Parquet rows, and the loader chains them in order
        files = sorted(outs[0].glob(f"{split}-*"))
        rows = open_rows(files)
        assert len(rows) == stats[0]["rows"][split]
        assert (np.asarray(rows) == read_rows(sorted(outs[0].glob(f"{split}-*.parquet")))).all()
    assert stats[0]["documents"]["train"] + stats[0]["documents"]["val"] == 36


def test_each_shard_is_packed_on_its_own(tmp_path):
    docs = shard_files(tmp_path / "norm")
    t.build(CFG, docs, tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = pq.read_table(docs[2]).column("text").to_pylist()
    train = [x for x in texts if not t.is_validation(x, CFG.val_fraction, CFG.seed)]
    expected = t.pack(tok, train, CFG.seq_len)
    assert (np.load(tmp_path / "train-00002.npy") == expected).all()
    assert pq.read_table(tmp_path / "train-00002.parquet").column("tokens").type.list_size == CFG.seq_len + 1


def test_bpe_trains_on_a_bounded_sample_from_every_shard(tmp_path, monkeypatch):
    docs = shard_files(tmp_path / "norm", n_shards=4, docs_per_shard=60)
    corpus = sum(len(x.encode()) for d in docs for x in pq.read_table(d).column("text").to_pylist())
    cfg = CFG.model_copy(update={"train_sample_bytes": 10_000})
    assert corpus > 3 * cfg.train_sample_bytes
    seen, train = [], t.train_tokenizer

    def measured(texts, c):
        def counting():
            for x in texts:
                seen.append(x)
                yield x
        return train(counting(), c)

    monkeypatch.setattr(t, "train_tokenizer", measured)
    t.build(cfg, docs, tmp_path)
    assert 0.7 * cfg.train_sample_bytes <= sum(len(x.encode()) for x in seen) <= cfg.train_sample_bytes
    assert {x.split("-")[0] for x in seen} == {f"Documento {s}" for s in range(4)}  # every shard, not the first
    assert not [x for x in seen if t.is_validation(x, cfg.val_fraction, cfg.seed)]
    again = list(t.sample_texts(docs, cfg.train_sample_bytes, cfg.val_fraction, cfg.seed))
    assert again == seen  # seeded: the same sample every run
    assert list(t.sample_texts(docs, cfg.train_sample_bytes, cfg.val_fraction, 1)) != seen


def test_a_corpus_without_validation_documents_still_holds_the_last_one_out(tmp_path):
    docs = shard_files(tmp_path / "norm", n_shards=2, docs_per_shard=6)
    cfg = CFG.model_copy(update={"val_fraction": 1e-9})
    stats = t.build(cfg, docs, tmp_path)
    assert stats["documents"] == {"train": 11, "val": 1} and stats["rows"]["val"] > 0
    assert (tmp_path / "preview.txt").read_text().replace("|", "").startswith("Documento 1-5. ")  # the last one
    assert np.load(tmp_path / "val-00000.npy").shape == (0, CFG.seq_len + 1)


def test_too_little_text_and_too_few_documents_say_what_to_change(tmp_path):
    docs = shard_files(tmp_path / "norm", n_shards=2, docs_per_shard=3)
    (tmp_path / "o1").mkdir()
    with pytest.raises(ValueError, match="lower tokenize.seq_len"):
        t.build(CFG.model_copy(update={"seq_len": 4096}), docs, tmp_path / "o1")
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"id": ["0"], "text": ["só um"]}), one)
    with pytest.raises(ValueError, match="1 document"):
        t.build(CFG, [one], tmp_path)


PEAK_RSS = """
import resource, sys
from pathlib import Path
from tasks import tokenization as t
from tasks.config import TokenizeConfig
cfg = TokenizeConfig(vocab_size=400, seq_len=64, min_frequency=1, train_sample_bytes=200_000)
t.build(cfg, sorted(Path(sys.argv[1]).glob("documents-*.parquet")), Path(sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_stays_flat_when_the_corpus_doubles(tmp_path):
    """Peak RSS of tokenizing N and 2N documents (about 2.8 and 5.6 MB of text, 1.4 MB shards) in a
    fresh process each. The margin is 5% of the process's peak (~300-450 MB, mostly pyarrow, prefect and
    tokenizers; measured: the same peak for N and 2N), while holding the corpus and
    its ids in Python lists, as tokenize used to, adds ~30 bytes per text byte (measured +61 MB, +19%, for 2.1 MB more text)."""
    import os
    import subprocess
    import sys

    big = shard_files(tmp_path / "2n", n_shards=4, docs_per_shard=1200, sentences=12)
    (tmp_path / "n").mkdir()
    for p in big[:2]:
        (tmp_path / "n" / p.name).write_bytes(p.read_bytes())
    peaks = {}
    for name in ("n", "2n"):
        (tmp_path / f"out-{name}").mkdir()
        env = os.environ | {"OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / name), str(tmp_path / f"out-{name}")],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[name] = int(done.stdout.split()[-1])
    assert len(list((tmp_path / "out-2n").glob("train-*.npy"))) == 4
    assert peaks["2n"] <= 1.05 * peaks["n"], peaks
