"""Fine-tuning data goes through the normalize stage's PII scrubber (finetune.scrub_pii)."""
import json

import pyarrow.parquet as pq
import pytest

from tasks import finetune
from tasks.config import FinetuneConfig, TokenizeConfig
from tasks.tokenization import train_tokenizer

EMAIL, CPF, PHONE = "maria.souza@exemplo.com.br", "529.982.247-25", "(11) 91234-5678"


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Meu e-mail é fulano@exemplo.com.br e meu CPF é 123.456.789-09.", "Olá, tudo bem? Sim."] * 20
    return train_tokenizer(texts, TokenizeConfig(vocab_size=300, min_frequency=1))


def render(tmp_path, tokenizer, scrub_pii: bool) -> tuple[str, dict]:
    """Write two conversations with PII, render them as SFT rows, and decode every row back."""
    data = tmp_path / "convs.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"Meu e-mail é {EMAIL} e meu CPF {CPF}."},
                           {"role": "assistant", "content": f"Anotado: {EMAIL}, ligo no {PHONE}."}]},
             {"prompt": "Qual o horário?", "response": "Das 9h às 18h."}]
    data.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    out = tmp_path / ("on" if scrub_pii else "off")
    out.mkdir()
    cfg = FinetuneConfig(base_model="models:/forja-test@champion", data=str(data), scrub_pii=scrub_pii)
    stats = finetune.write_sft_data(cfg, tokenizer, 128, out)
    rendered = []
    for split in ("train", "val"):
        for row in pq.read_table(out / f"{split}-00000.parquet").column("tokens").to_pylist():
            rendered.append(tokenizer.decode(row, skip_special_tokens=True))
    return "\n".join(rendered), stats


def test_conversations_are_scrubbed_before_rendering_and_counted(tmp_path, tokenizer):
    text, stats = render(tmp_path, tokenizer, scrub_pii=True)
    assert EMAIL not in text and CPF not in text and PHONE not in text, text
    assert "<EMAIL>" in text and "<CPF>" in text and "<PHONE>" in text
    assert "Das 9h às 18h." in text  # the rest of the text is untouched
    assert stats["pii_replaced"] == {"EMAIL": 2, "CPF": 1, "PHONE": 1}


def test_the_switch_turns_scrubbing_off(tmp_path, tokenizer):
    text, stats = render(tmp_path, tokenizer, scrub_pii=False)
    assert EMAIL in text and CPF in text and PHONE in text
    assert stats["pii_replaced"] == {}


def test_the_switch_is_part_of_the_data_stage_key():
    from tasks.stage import stage_key

    on = FinetuneConfig(base_model="models:/m@champion", data="x.jsonl")
    off = on.model_copy(update={"scrub_pii": False})
    keys = [finetune.data_key_config(c, "b" * 64, "d" * 64) for c in (on, off)]
    assert keys[0]["scrub_pii"] is True and keys[1]["scrub_pii"] is False
    assert stage_key("sft-data", keys[0], {}, "v") != stage_key("sft-data", keys[1], {}, "v")
