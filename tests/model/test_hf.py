"""The Hugging Face export: transformers loads it and agrees with forja token for token."""
from pathlib import Path

import pytest
import torch
import transformers

from model.config import ModelConfig
from model.generate import EOT, Sampling, generate, save_folder
from model.gpt import GPT
from model.hf import export
from tasks.config import TokenizeConfig
from tasks.tokenization import train_tokenizer

SENTENCES = Path(__file__).resolve().parents[1] / "fixtures" / "pt_sentences.txt"


@pytest.mark.parametrize("tied, kv_heads", [(True, 4), (False, 2)])  # plain attention, and grouped-query
def test_transformers_loads_the_export_and_generates_the_same_greedy_tokens(tmp_path, tied, kv_heads):
    texts = [x for x in SENTENCES.read_text(encoding="utf-8").splitlines() if x.strip()]
    tok = train_tokenizer(texts * 3, TokenizeConfig(vocab_size=300, min_frequency=1))
    tok.save(str(tmp_path / "tok.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=4, n_kv_head=kv_heads,
                      n_embd=64, tie_embeddings=tied)
    model = GPT(cfg).eval()
    with torch.no_grad():  # trained-looking norms, so a wrong norm mapping cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_folder(model, tmp_path / "tok.json", tmp_path / "forja")
    out = export(tmp_path / "forja", tmp_path / "hf")

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = "O sistema de arquivos do Linux"
    ids = tok.encode(prompt).ids
    assert hf_tok(prompt)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)
        ours = generate(model, [ids], Sampling(12, temperature=0), stop_id=tok.token_to_id(EOT))[0]
        theirs = hf.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=tok.token_to_id(EOT),
                             pad_token_id=tok.token_to_id(EOT))[0, len(ids):].tolist()
    eot = tok.token_to_id(EOT)
    assert ours == (theirs[: theirs.index(eot)] if eot in theirs else theirs)
