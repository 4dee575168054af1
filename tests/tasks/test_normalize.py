import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import normalize as n
from tasks.config import NormalizeConfig
from tests.fixtures.site import ENGLISH, SENTENCES
from tests.fixtures.docs import read_docs

PT = " ".join(SENTENCES[:8])


def write(tmp_path, texts):
    src = tmp_path / "in.parquet"
    ids = [f"d{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "url": [f"http://x/{i}" for i in ids], "text": texts}), src)
    return src


def test_mojibake_is_fixed_and_text_is_nfc():
    broken = "A configuraÃ§Ã£o do sistema Ã© simples."  # UTF-8 read as Latin-1
    assert n.clean(broken) == "A configuração do sistema é simples."
    decomposed = "ac\u0327a\u0303o"  # c + combining cedilla, a + combining tilde
    assert n.clean(decomposed) == "ação"


def test_navigation_lines_and_extra_whitespace_go():
    text = "[ anterior ] [ Conteúdo ] [ 1 ] [ próximo ]\nTítulo   do\tcapítulo\n\n\n\nTexto."
    assert n.clean(text) == "Título do capítulo\n\nTexto."


def test_english_page_is_dropped_with_reason_language(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stats = n.build(NormalizeConfig(), [write(tmp_path, [PT, ENGLISH, "curto"])], out)
    kept = read_docs(out).to_pylist()
    rejected = {r["id"]: r["reason"] for r in read_docs(out, "rejected").to_pylist()}
    assert [k["id"] for k in kept] == ["d0"] and kept[0]["lang"] == "pt"
    assert rejected == {"d1": "language", "d2": "too_short"}
    assert stats["dropped"] == {"language": 1, "too_short": 1}


def test_without_language_id_every_language_is_kept_and_never_detected(tmp_path, monkeypatch):
    def no_detection(*_):
        raise AssertionError("language detection ran with normalize.language_id false")

    monkeypatch.setattr(n, "language", no_detection)
    out = tmp_path / "out"
    out.mkdir()
    english = ENGLISH + (" Long before the harbour was built, fishermen dried their nets on the rocks and sold"
                         " the morning catch in the square. Visitors now come for the old lighthouse, the narrow"
                         " streets and a museum that tells how the village grew from a handful of wooden huts.")
    stats = n.build(NormalizeConfig(language_id=False), [write(tmp_path, [PT, english, "curto"])], out)
    kept = read_docs(out).to_pylist()
    assert [k["id"] for k in kept] == ["d0", "d1"] and {k["lang"] for k in kept} == {""}
    assert stats["dropped"] == {"too_short": 1}


def test_language_detection_is_deterministic():
    text = "Linux é bom. Linux is good. " * 3
    assert len({n.language(text, 0) for _ in range(5)}) == 1


def test_empty_corpus_fails_with_counts_by_reason(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(n.EmptyCorpusError, match=r"language=1.*too_short=1|too_short=1.*language=1"):
        n.build(NormalizeConfig(), [write(tmp_path, [ENGLISH, "curto"])], out)


def test_quality_rules_drop_repetitive_pages_with_a_reason_and_examples(tmp_path):
    spam = "\n".join(["Compre agora o melhor produto da loja com desconto especial hoje."] * 12)
    out = tmp_path / "out"
    out.mkdir()
    stats = n.build(NormalizeConfig(), [write(tmp_path, [PT, spam])], out)
    assert stats["dropped"] == {"quality:repeated_lines": 1}
    assert stats["examples"]["quality:repeated_lines"][0]["url"] == "http://x/d1"
    assert stats["documents_in"] == stats["documents_out"] + sum(stats["dropped"].values())


def test_pii_is_scrubbed_from_kept_text_and_counted(tmp_path):
    text = PT + " Contato: maria.souza@empresa.com.br ou (11) 98765-4321, CPF 529.982.247-25."
    out = tmp_path / "out"
    out.mkdir()
    stats = n.build(NormalizeConfig(), [write(tmp_path, [text])], out)
    (kept,) = read_docs(out).to_pylist()
    assert "<EMAIL>" in kept["text"] and "<PHONE>" in kept["text"] and "<CPF>" in kept["text"]
    assert "maria" not in kept["text"] and "98765" not in kept["text"]
    assert stats["pii_replaced"] == {"EMAIL": 1, "PHONE": 1, "CPF": 1}
