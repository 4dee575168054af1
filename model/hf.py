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
and `AutoTokenizer.from_pretrained(folder)` load it; and forja-export.json, the marker that
lists those files with their sha256. The export never deletes a folder forja did not write:
it is built in a temporary sibling and renamed into place; an existing output is replaced
only when it is exactly a previous export (the marker's files, unchanged) and the caller
asks (replace=True, `forja export --force`), and then atomically (old aside, new in, old
removed). Anything else there is refused with an error that names the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
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


MARKER = "forja-export.json"
FORMAT = "forja-hf-export/1"


def export(folder: Path, out: Path, replace: bool = False) -> Path:
    """Write the Hugging Face form of a forja model folder to out.

    out must not exist, be an empty folder, or (with replace=True) hold a previous export;
    see check_output. It is built in a temporary sibling and renamed in only when complete."""
    folder, out = Path(folder), Path(out)
    check_output(out, replace)  # refuse before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))  # ours alone: a fresh name
    try:
        write_export(folder, tmp)
        swap_in(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_export(folder: Path, dst: Path) -> None:
    """The export's files, then the marker that lists them, into the empty folder dst."""
    from tokenizers import Tokenizer

    cfg = ModelConfig.load(folder / CONFIG)
    eot = Tokenizer.from_file(str(folder / TOKENIZER)).token_to_id(EOT)
    save_file(hf_state_dict(load_file(str(folder / WEIGHTS)), cfg), str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(llama_config(cfg, eot), indent=2))
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eot, "eos_token_id": eot, "max_length": cfg.block_size}, indent=2))
    shutil.copy(folder / TOKENIZER, dst / "tokenizer.json")
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
        "bos_token": EOT, "eos_token": EOT, "unk_token": None, "pad_token": EOT,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }, indent=2))
    files = {p.name: sha256(p) for p in sorted(dst.iterdir())}
    (dst / MARKER).write_text(json.dumps({"format": FORMAT, "files": files}, indent=2))


def check_output(out: Path, replace: bool) -> None:
    """Refuse (ValueError naming the folder) an output forja may not write to.

    Free: a path that does not exist, or an empty folder. A previous export (its marker, and
    exactly the files the marker lists, unchanged) is replaced only when replace is true.
    Anything else holds something forja did not write, and is never deleted."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"export: {out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    why = not_an_export(out)
    if why:
        raise ValueError(f"export: {out} is not a previous forja export ({why}); forja never deletes a folder "
                         "it did not write: choose another --out, or empty that folder yourself")
    if not replace:
        raise ValueError(f"export: {out} holds a previous forja export; pass --force to replace it, "
                         "or choose another --out")


def not_an_export(out: Path) -> str | None:
    """Why the non-empty folder out is not a previous export, or None when it is one."""
    try:
        marker = json.loads((out / MARKER).read_text())
        files = marker["files"] if marker.get("format") == FORMAT else None
        if not isinstance(files, dict) or MARKER in files or any("/" in str(f) for f in files):
            raise ValueError
    except FileNotFoundError:
        return f"no {MARKER}"
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return f"{MARKER} is not one forja wrote"
    extra = sorted(p.name for p in out.iterdir() if p.name != MARKER and p.name not in files)
    if extra:
        return "holds files an export does not write: " + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
    for name, digest in files.items():
        p = out / name
        if p.is_symlink() or (p.exists() and not p.is_file()):
            return f"{name} is not a plain file"
        if p.exists() and sha256(p) != digest:
            return f"{name} was changed after the export"
    return None


def swap_in(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished export tmp to out; a previous export there goes aside, then away."""
    check_output(out, replace)  # again: the folder may have changed while the export was written
    if not os.path.lexists(out) or not any(out.iterdir()):
        os.rename(tmp, out)  # replaces an empty folder; fails, deleting nothing, if content appeared meanwhile
        return
    aside = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside)  # a checked previous export


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
