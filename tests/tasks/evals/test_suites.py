"""Evaluation suites: file checks, and metrics computed by a real (small, random) model."""
import json
import math
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from tasks.config import TokenizeConfig
from tasks.evals.suites import Scorer, Suite, SuiteError, macro_f1, read_suite, run_suites, score_text, token_f1
from tasks.tokenization import train_tokenizer

SENTENCES = Path(__file__).resolve().parents[2] / "fixtures" / "pt_sentences.txt"


@pytest.fixture(scope="module")
def scorer():
    texts = [x for x in SENTENCES.read_text(encoding="utf-8").splitlines() if x.strip()]
    tok = train_tokenizer(texts * 3, TokenizeConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=2, n_kv_head=2,
                            n_embd=32, tie_embeddings=False))
    return Scorer(model, tok, batch_size=3)


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 1', "not valid JSON"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "'answer' 2 is not an index"),
    ('{"question": "q", "choices": "ab", "answer": 0}', "field 'choices' has the wrong type"),
    ('["q"]', "expected a JSON object"),
])
def test_a_malformed_line_names_the_file_and_line(tmp_path, line, message):
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path = write(tmp_path / "mc.jsonl", [good, good, line])
    with pytest.raises(SuiteError) as e:
        read_suite(path, "choice")
    assert f"{path}:3" in str(e.value) and message in str(e.value)


def test_empty_or_missing_suite_files_and_unknown_kinds_are_named(tmp_path):
    with pytest.raises(SuiteError, match="has no items"):
        read_suite(write(tmp_path / "empty.jsonl", []), "text")
    with pytest.raises(SuiteError, match="does not exist"):
        read_suite(tmp_path / "nope.jsonl", "text")
    with pytest.raises(SuiteError, match="unknown kind 'essay'"):
        read_suite(write(tmp_path / "t.jsonl", [{"text": "x"}]), "essay")


def test_loglik_is_the_models_own_token_probabilities_and_batching_does_not_change_it(scorer):
    a, b = scorer.encode("O sistema de arquivos"), scorer.encode(" guarda os dados do usuário")
    c, d = scorer.encode("A rede"), scorer.encode(" local")
    batched = scorer.loglik([(a, b), (c, d)])  # right-padded together
    alone = [scorer.loglik([(a, b)])[0], scorer.loglik([(c, d)])[0]]
    assert batched == pytest.approx(alone, abs=1e-4)
    seq = torch.tensor([[scorer.eot] + a + b])
    with torch.no_grad():
        logp = torch.log_softmax(scorer.model(seq[:, :-1]), -1)[0]
    start = len(a)  # predictions of b's tokens start at the position of a's last token
    direct = sum(float(logp[start + i, t]) for i, t in enumerate(b))
    assert batched[0] == pytest.approx(direct, abs=1e-4)


def test_text_suite_perplexity_matches_the_models_loss(scorer, tmp_path):
    text = "O Linux é um sistema operacional livre usado em servidores"
    m = score_text(scorer, [{"text": text}])
    ids = [scorer.eot] + scorer.encode(text)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        loss = float(scorer.model(x, y)[1])
    assert m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(loss * len(ids[1:]) / math.log(2) / len(text.encode()), rel=1e-4)


def test_all_four_kinds_run_and_a_model_scores_perfectly_against_its_own_generations(scorer, tmp_path):
    prompts = ["O Linux", "A rede local", "Para copiar arquivos"]
    own = [o.strip() for o in scorer.generate(prompts, 6)]
    suites = [
        Suite("t", "text", str(write(tmp_path / "t.jsonl", [{"text": "O kernel Linux"}]))),
        Suite("mc", "choice", str(write(tmp_path / "mc.jsonl", [
            {"question": "O Linux é", "choices": ["livre", "caro", "azul"], "answer": 0}] * 2))),
        Suite("cls", "classification", str(write(tmp_path / "c.jsonl", [
            {"text": "cp copia arquivos", "label": "arquivos"}, {"text": "ping testa a rede", "label": "rede"}])),
            template="Tema de: {text}\n"),
        Suite("gen", "generation", str(write(tmp_path / "g.jsonl", [
            {"prompt": p, "reference": o} for p, o in zip(prompts, own)])), max_new_tokens=6),
    ]
    metrics, outputs = run_suites(scorer.model, scorer.tokenizer, suites, batch_size=2)
    assert {"t.perplexity", "t.bits_per_byte", "mc.accuracy", "mc.chance", "cls.accuracy", "cls.macro_f1",
            "gen.bleu", "gen.chrf", "gen.token_f1"} <= set(metrics)
    assert metrics["mc.accuracy"] in (0.0, 1.0)  # two identical items: both right or both wrong
    assert metrics["mc.chance"] == pytest.approx(1 / 3)
    assert metrics["gen.chrf"] == pytest.approx(100.0) and metrics["gen.token_f1"] == pytest.approx(1.0)
    assert [o["output"] for o in outputs["gen"]] == own


def test_macro_f1_and_token_f1_by_hand():
    # label a: tp 1, fp 1, fn 1 -> 0.5; label b: tp 1, fp 1, fn 1 -> 0.5; label c: tp 1 -> 1.0
    truth, pred = ["a", "a", "b", "b", "c"], ["a", "b", "b", "a", "c"]
    assert macro_f1(truth, pred, ["a", "b", "c"]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert token_f1("o gato preto", "O gato branco") == pytest.approx(2 / 3)
    assert token_f1("", "algo") == 0.0


def test_classification_labels_outside_the_list_are_named(scorer, tmp_path):
    path = write(tmp_path / "c.jsonl", [{"text": "x", "label": "rede"}])
    with pytest.raises(SuiteError, match=r"labels \['rede'\] are not in"):
        run_suites(scorer.model, scorer.tokenizer, [Suite("c", "classification", str(path), labels=["arquivos"])])
