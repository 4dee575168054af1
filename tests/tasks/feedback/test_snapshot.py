"""The feedback snapshot: which records become conversations, suite copies and duplicates removed
and counted, a seeded held-out split, the base data mixed in, and the next snapshot starting after
the last recorded one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import FeedbackConfig
from tasks.feedback import decontam
from tasks.feedback.snapshot import HELDOUT_SUITE, TRAIN_MIX, build, key_config, pending
from tasks.feedback.store import default_url, open_store

SUITE_ITEM = {"prompt": "Pergunta: como eu configuro a rede sem fio no Debian usando o NetworkManager?",
              "reference": "Use o nmcli ou o applet do NetworkManager para escolher a rede e digitar a senha."}


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture
def store(tmp_path):
    s = open_store(default_url(str(tmp_path / "work")))
    yield s
    s.close()


def add(store, question: str, answer: str, rating: int = 1, correction: str | None = None, consent: bool = True,
        model: str = "chat") -> int:
    return int(store.add(request_id=f"r{question[:10]}", model_name=model, model_version="1",
                         messages=[{"role": "user", "content": question}], answer=answer, rating=rating,
                         correction=correction, consent=consent))


@pytest.fixture
def files(tmp_path):
    suite = tmp_path / "qa.jsonl"
    suite.write_text(json.dumps(SUITE_ITEM, ensure_ascii=False) + "\n", encoding="utf-8")
    base = tmp_path / "base.jsonl"
    base.write_text(json.dumps({"prompt": "O que faz o cp?", "response": "Copia arquivos."}) + "\n", encoding="utf-8")
    return suite, base


def test_records_become_conversations_and_every_drop_is_counted(tmp_path, store, files):
    suite, base = files
    up = add(store, "Como vejo o espaço livre no disco?", "Use df -h.")
    fixed = add(store, "Como listo os arquivos ocultos?", "Use ls.", rating=-1, correction="Use ls -a.")
    add(store, "Como desligo o computador agora?", "Não sei.", rating=-1)  # 👎 without a correction
    add(store, "Como mudo minha senha no terminal?", "Use passwd.", consent=False)  # no consent
    # copied from the suite (the reference, reworded in case and punctuation): contaminated
    add(store, SUITE_ITEM["prompt"].upper(), "use o nmcli, ou o applet do NetworkManager, para escolher a rede "
        "e digitar a senha!")
    add(store, "como  vejo o ESPAÇO livre no disco?", "Use   df -h.")  # the first one again: a duplicate
    add(store, "Outra pergunta de outro modelo?", "Outra resposta.", model="other")
    out = tmp_path / "snap"
    out.mkdir()
    stats = build(FeedbackConfig(heldout_fraction=0.4, decontam_ngram=4), store.records("chat"), [str(suite)],
                  str(base), out)
    assert stats["records"] == 6 and stats["ratings"] == {"thumbs_up": 4, "thumbs_down": 2}
    assert stats["dropped"] == {"no_consent": 1, "thumbs_down_without_correction": 1, "contaminated": 1,
                                "duplicate": 1}
    assert stats["kept"] == 2 and stats["train"] + stats["heldout"] == 2 and stats["heldout"] == 1
    kept = read(out / "conversations.jsonl")
    assert {c["record_id"]: c["messages"][-1] for c in kept} == {
        up: {"role": "assistant", "content": "Use df -h."},
        fixed: {"role": "assistant", "content": "Use ls -a."},  # the correction, not the wrong answer
    }
    heldout, train = read(out / "heldout.jsonl"), read(out / "train.jsonl")
    assert read(out / HELDOUT_SUITE) == [{"text": heldout[0]["messages"][-1]["content"]}]
    assert read(out / TRAIN_MIX) == train + [{"prompt": "O que faz o cp?", "response": "Copia arquivos."}]
    assert {d["reason"] for d in read(out / "dropped.jsonl")} == {
        "no_consent", "thumbs_down_without_correction", "contaminated_or_duplicate"}
    assert stats["record_ids"] == {"first": up, "last": up + 5}


def test_a_conversation_copied_from_a_suite_is_removed_and_an_unrelated_one_kept(files):
    suite, _ = files
    index = decontam.SuiteIndex(decontam.suite_items([suite]), n=8)
    copied = {"messages": [{"role": "user", "content": "Me ajuda? " + SUITE_ITEM["prompt"]},
                           {"role": "assistant", "content": "Claro."}]}
    short = {"messages": [{"role": "user", "content": "configuro a rede sem fio"},
                          {"role": "assistant", "content": "no Debian"}]}  # under 8 words, inside the item
    fresh = {"messages": [{"role": "user", "content": "Como eu instalo o pacote vim no Debian estável de hoje?"},
                          {"role": "assistant", "content": "Com apt install vim, como administrador do sistema."}]}
    assert index.overlap(decontam.conversation_text(copied["messages"])) >= 0.5
    assert index.overlap(decontam.conversation_text(fresh["messages"])) == 0
    kept, dropped = decontam.clean([copied, short, fresh], index, 0.5)
    assert kept == [fresh] and dropped == {"contaminated": 2}


def test_the_heldout_split_is_seeded_and_stable():
    convs = [{"messages": [{"role": "user", "content": f"pergunta {i}"}, {"role": "assistant", "content": "r"}]}
             for i in range(40)]
    train, held = decontam.heldout_split(convs, 0.25, seed=1)
    assert 4 <= len(held) <= 16 and len(train) + len(held) == 40
    again_train, again_held = decontam.heldout_split(list(reversed(convs)), 0.25, seed=1)
    assert sorted(map(str, again_held)) == sorted(map(str, held))  # by content, not position
    assert decontam.heldout_split(convs, 0.25, seed=2)[1] != held
    assert decontam.heldout_split(convs, 0.0, seed=1) == (convs, [])


def test_the_next_snapshot_sees_only_newer_records(store):
    first = [add(store, f"Pergunta número {i}?", f"Resposta {i}.") for i in range(3)]
    after, records = pending(store, "chat")
    assert after == 0 and [r["id"] for r in records] == first
    store.record_snapshot(model_name="chat", first_record_id=first[0], last_record_id=first[-1], stage_key="k",
                          counts={})
    assert pending(store, "chat") == (first[-1], [])
    newer = add(store, "Uma pergunta nova?", "Uma resposta nova.")
    after, records = pending(store, "chat")
    assert after == first[-1] and [r["id"] for r in records] == [newer]


def test_the_stage_key_follows_the_id_range_and_hides_the_password(files):
    suite, base = files
    from tasks.config import SuiteConfig

    suites = [SuiteConfig(name="qa", kind="generation", path=str(suite))]
    url = "postgresql+psycopg2://forja:s3cret@127.0.0.1:5432/feedback"
    one = key_config(FeedbackConfig(), "chat", url, 0, 10, suites, str(base))
    assert "s3cret" not in json.dumps(one)
    assert key_config(FeedbackConfig(), "chat", url, 0, 11, suites, str(base)) != one
    with pytest.raises(FileNotFoundError, match="finetune.data"):
        key_config(FeedbackConfig(), "chat", url, 0, 10, suites, str(base) + ".missing")
