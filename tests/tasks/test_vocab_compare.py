"""The tokenize stage's vocabulary comparison (issue 15, vocabulary choice)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import stage
from tasks import tokenization as t
from tasks.config import TokenizeConfig
from tasks.tokens import compare
from tests.fixtures.site import SENTENCES

CFG = TokenizeConfig(vocab_size=400, seq_len=16, val_fraction=0.2, min_frequency=1)


def corpus(tmp_path):
    texts = [" ".join(SENTENCES[i : i + 4]) for i in range(0, len(SENTENCES), 4)]
    src = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}), src)
    return src


def test_bigger_vocabularies_carry_more_bytes_and_split_fewer_words(tmp_path):
    src = corpus(tmp_path)
    cfg = CFG.model_copy(update={"compare_vocab_sizes": [1000, 300, 600]})
    m = stage.run_stage("tokenize", cfg, [], tmp_path, lambda out, key: t.build(cfg, [src], out), [t, compare])
    result = json.loads(m.path("vocab_compare.json").read_text())
    rows = result["sizes"]
    assert [r["requested"] for r in rows] == [300, 400, 600, 1000]
    bpt = [r["bytes_per_token"] for r in rows]
    split = [r["fragmented_words"] for r in rows]
    assert bpt == sorted(bpt) and bpt[0] < bpt[-1]
    assert split == sorted(split, reverse=True) and split[0] > split[-1]
    assert all(0 < r["vocab_used_fraction"] <= 1 for r in rows)
    # the chosen size is vocab_size, marked in the json, the table and the stats; it is the stage's own tokenizer
    assert [r["requested"] for r in rows if r["chosen"]] == [400] and result["chosen"] == 400
    table = m.path("vocab_compare.md").read_text()
    assert "| 400 **(chosen)** |" in table and table.count("(chosen)") == 1
    assert m.stats["vocab_compare"]["chosen"] == 400
    assert m.stats["vocab_compare"]["400"]["bytes_per_token"] == pytest.approx(m.stats["val_bytes_per_token_text"])
    png = m.path("vocab_compare.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert {"vocab_compare.json", "vocab_compare.md", "vocab_compare.png"} <= {f.path for f in m.files}


def test_fragmented_words_count_the_tokens_over_each_word():
    # "ab" 1 token, "cdef" 4 tokens (the first carries the space), "g," 2 tokens
    text = "ab cdef  g,"
    offsets = [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 9), (9, 10), (10, 11)]
    assert compare.fragmented_words(text, offsets, 3) == (3, 1)
    assert compare.fragmented_words(text, offsets, 1) == (3, 2)
    assert compare.fragmented_words("   ", [(0, 3)], 3) == (0, 0)


def test_a_size_below_the_byte_alphabet_names_the_value(tmp_path):
    cfg = CFG.model_copy(update={"compare_vocab_sizes": [4096, 200]})
    with pytest.raises(ValueError, match=r"compare_vocab_sizes has 200.*>= 26\d"):
        t.build(cfg, [corpus(tmp_path)], tmp_path)
    assert not list(tmp_path.glob("train-*"))  # refused before any work


def test_no_comparison_costs_nothing_when_off(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the comparison ran with compare_vocab_sizes []")

    monkeypatch.setattr(compare, "compare", boom)
    m = stage.run_stage("tokenize", CFG, [], tmp_path, lambda out, key: t.build(CFG, [corpus(tmp_path)], out), [t])
    assert not any("vocab_compare" in f.path for f in m.files) and "vocab_compare" not in m.stats
