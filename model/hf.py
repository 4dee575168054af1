"""Export a forja model folder to the Hugging Face layout (a Llama-style checkpoint).

forja's decoder is the Llama architecture (RMSNorm, rotate-half RoPE, SwiGLU, GQA), so
the export only renames tensors and splits the fused projections:

  embed                  -> model.embed_tokens
  blocks.N.attn.qkv      -> model.layers.N.self_attn.{q,k,v}_proj   (rows: q heads, k, v)
  blocks.N.attn.o_proj   -> model.layers.N.self_attn.o_proj
  blocks.N.mlp.gate_up   -> model.layers.N.mlp.{gate,up}_proj       (rows: gate, then up)
  blocks.N.mlp.down      -> model.layers.N.mlp.down_proj
  blocks.N.attn_norm     -> model.layers.N.input_layernorm
  blocks.N.mlp_norm      -> model.layers.N.post_attention_layernorm
  norm, lm_head          -> model.norm, lm_head (absent when tied)

The output folder holds config.json, generation_config.json, model.safetensors,
tokenizer.json and tokenizer_config.json: `AutoModelForCausalLM.from_pretrained(folder)`
and `AutoTokenizer.from_pretrained(folder)` load it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.generate import CONFIG, EOT, TOKENIZER, WEIGHTS


def llama_config(cfg: ModelConfig, eot_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "float32", "dtype": "float32",
        "bos_token_id": eot_id, "eos_token_id": eot_id, "use_cache": True,
    }


def hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].split((q_rows, kv_rows, kv_rows))
        gate, up = state[src + "mlp.gate_up.weight"].split((cfg.mlp_hidden, cfg.mlp_hidden))
        out |= {
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attn.o_proj.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.down.weight"],
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def export(folder: Path, out: Path) -> Path:
    """Write the Hugging Face form of a forja model folder to out (replaced when complete)."""
    from tokenizers import Tokenizer

    folder, out = Path(folder), Path(out)
    cfg = ModelConfig.load(folder / CONFIG)
    eot = Tokenizer.from_file(str(folder / TOKENIZER)).token_to_id(EOT)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(hf_state_dict(load_file(str(folder / WEIGHTS)), cfg), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(llama_config(cfg, eot), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eot, "eos_token_id": eot, "max_length": cfg.block_size}, indent=2))
    shutil.copy(folder / TOKENIZER, tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
        "bos_token": EOT, "eos_token": EOT, "unk_token": None, "pad_token": EOT,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
