import pyarrow as pa
import pyarrow.parquet as pq

from tasks import stage
from tasks import tokenization as t
from tasks.config import TokenizeConfig
from tests.fixtures.site import SENTENCES

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
