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
tokenizer.json, tokenizer_config.json and a model card (README.md):
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load
it; and forja-export.json, the marker that lists those files with their sha256.

The tokenizer carries forja's special tokens (model.chat.SPECIAL_TOKENS) and its chat template
as Jinja, so `apply_chat_template(messages, add_generation_prompt=True)` gives the ids of
ChatTemplate.prompt(messages), and without the generation prompt those of ChatTemplate.encode.
Two private-use characters make that exact (chat_tokenizer): the template writes U+E000 after
the first character of special-token text inside a message, so transformers' added-token matcher
(which runs on the raw text) never sees a special token there, and the tokenizer's normalizer
then deletes U+E000, leaving the text's own bytes, as forja encodes it; and it writes U+E001
before each message's content, which the pre-tokenizer splits on and removes, so the content is
pre-tokenized on its own as forja does (else a content starting with whitespace could merge with
the newline after the role marker). The price: the exported tokenizer drops those two characters
from any text (they are Unicode private-use code points, which text rarely holds).

The export never deletes a folder forja did not write:
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

from model.chat import END, EOT, PAD, ROLES, SPECIAL_TOKENS
from model.config import ModelConfig
from model.generate import CONFIG, TOKENIZER, WEIGHTS

ESCAPE, BOUNDARY = "\ue000", "\ue001"  # see the module docstring


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


def export(folder: Path, out: Path, replace: bool = False, versions: list | tuple = (),
           workdir: str | Path | None = None) -> Path:
    """Write the Hugging Face form of a forja model folder to out.

    out must not exist, be an empty folder, or (with replace=True) hold a previous export;
    see check_output. It is built in a temporary sibling and renamed in only when complete.
    versions: the registered version exported and then its parents (objects with name, version
    and tags, as MLflow's ModelVersion), whose tags give the model card its lineage, metrics
    and data licence; workdir: where the stage folders named by those tags are (the crawl's
    manifest records its licence). Both optional: the card then says what is not known."""
    folder, out = Path(folder), Path(out)
    check_output(out, replace)  # refuse before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))  # ours alone: a fresh name
    try:
        write_export(folder, tmp, versions, workdir)
        swap_in(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_export(folder: Path, dst: Path, versions=(), workdir: str | Path | None = None) -> None:
    """The export's files, then the marker that lists them, into the empty folder dst."""
    from tokenizers import Tokenizer

    cfg = ModelConfig.load(folder / CONFIG)
    tok = Tokenizer.from_file(str(folder / TOKENIZER))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    chat = None not in ids.values()  # tokenizers from before forja reserved the chat tokens have none
    eot = ids[EOT]
    state = hf_state_dict(load_file(str(folder / WEIGHTS)), cfg)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(llama_config(cfg, eot), indent=2))
    # A chat reply ends with <|end|>, a document with <|endoftext|>: generation stops at either.
    stop = [eot, ids[END]] if chat else eot
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eot, "eos_token_id": stop, "pad_token_id": ids[PAD] if chat else eot,
         "max_length": cfg.block_size}, indent=2))
    (chat_tokenizer(tok) if chat else tok).save(str(dst / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
        "bos_token": EOT, "eos_token": EOT, "unk_token": None, "pad_token": PAD if chat else EOT,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }
    if chat:
        tokenizer_config |= {"additional_special_tokens": [f"<|{r}|>" for r in ROLES] + [END],
                             "chat_template": CHAT_TEMPLATE}
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    params = sum(t.numel() for t in state.values())
    (dst / "README.md").write_text(model_card(cfg, params, tok.get_vocab_size(), chat, versions, workdir),
                                   encoding="utf-8")
    files = {p.name: sha256(p) for p in sorted(dst.iterdir())}
    (dst / MARKER).write_text(json.dumps({"format": FORMAT, "files": files}, indent=2))


def chat_template() -> str:
    """forja's ChatTemplate (model/chat.py) in Jinja, for transformers' apply_chat_template:
    <|endoftext|>, then per message <|role|>\n{content}<|end|>\n, then <|assistant|>\n when a
    reply is asked for. Special-token text inside content gets ESCAPE after its "<" and content
    starts with BOUNDARY (see the module docstring); an unknown role is an error naming it."""
    roles = ", ".join(f"'{r}'" for r in ROLES)
    return (
        "{{- '" + EOT + "' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in [" + roles + "] -%}"
        "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ': forja knows " + "/".join(ROLES) + "') -}}"
        "{%- endif -%}"
        "{%- if message['content'] is not string -%}"
        "{{- raise_exception('the content of a ' ~ message['role'] ~ ' message must be a string') -}}"
        "{%- endif -%}"
        "{{- '<|' ~ message['role'] ~ '|>\n" + BOUNDARY + "' ~ message['content'] | replace('<|', '<" + ESCAPE
        + "|') ~ '" + END + "\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template()


def chat_tokenizer(tok):
    """A copy of tok for the export: special tokens matched on the raw text only (never after
    normalization), ESCAPE deleted by the normalizer, BOUNDARY a pre-tokenizer split that is removed.
    Text without those two characters encodes exactly as with tok."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    if any(not t.startswith("<|") for t in SPECIAL_TOKENS):  # the template escapes "<|" only
        raise ValueError("every special token must start with '<|' for the exported chat template to escape it")
    data = json.loads(tok.to_str())
    for added in data.get("added_tokens", []):
        added["normalized"] = False
    out = Tokenizer.from_str(json.dumps(data))
    drop = normalizers.Replace(ESCAPE, "")
    out.normalizer = drop if out.normalizer is None else normalizers.Sequence([drop, out.normalizer])
    split = pre_tokenizers.Split(BOUNDARY, behavior="removed")
    out.pre_tokenizer = split if out.pre_tokenizer is None else pre_tokenizers.Sequence([split, out.pre_tokenizer])
    return out


def model_card(cfg: ModelConfig, params: int, vocab: int, chat: bool, versions=(), workdir=None) -> str:
    """README.md of the export: what the model is, where its data came from and under which
    licence, its recorded metrics, and how to load it; what is not known is said so."""
    first = versions[0] if versions else None
    title = f"{first.name} version {first.version}" if first is not None else "a forja model"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [forja, llama]", "---",
             f"# {title}", "",
             "A decoder-only language model trained from scratch with forja (Prefect + DeepSpeed + MLflow), "
             "exported in the Llama layout.", "",
             "| | |", "|---|---|",
             f"| architecture | LlamaForCausalLM: {cfg.n_layer} layer(s), hidden size {cfg.n_embd}, {cfg.n_head} "
             f"attention heads ({cfg.n_kv_head} key/value), SwiGLU MLP {cfg.mlp_hidden}, RMSNorm, RoPE "
             f"(theta {cfg.rope_theta:g}), {'tied' if cfg.tie_embeddings else 'untied'} embeddings |",
             f"| parameters | {params:,} |", f"| context | {cfg.block_size} tokens |",
             f"| vocabulary | {vocab} tokens, byte-level BPE"
             + (f"; special tokens {', '.join(SPECIAL_TOKENS)}" if chat else "") + " |", "",
             "## Data lineage", ""]
    licences = []
    for v in versions:
        tags = dict(v.tags or {})
        stages = sorted((k[len("forja.stage."):], x) for k, x in tags.items() if k.startswith("forja.stage."))
        keys = ", ".join(f"{s} `{k}`" for s, k in stages) or "no stage keys recorded"
        links = (("forja.parent", "fine-tuned from"), ("feedback.snapshot", "feedback snapshot"),
                 ("feedback.records", "feedback records"), ("mlflow.run_id", "MLflow run"),
                 ("prefect.flow_run_id", "Prefect flow run"))
        lines.append(f"- {v.name} version {v.version}: {keys}"
                     + "".join(f"; {label} {tags[t]}" for t, label in links if tags.get(t)))
        if tags.get("forja.data.licence"):
            licences.append(f"{v.name} version {v.version}: {tags['forja.data.licence']}")
        crawl = dict(stages).get("crawl")
        manifest = Path(workdir) / "artifacts" / "crawl" / crawl / "manifest.json" if crawl and workdir else None
        if manifest is not None and manifest.is_file():
            note = json.loads(manifest.read_text()).get("config", {}).get("licence") or "none recorded (crawl.licence)"
            licences.append(f"crawl `{crawl}` (the pretraining corpus of {v.name} version {v.version}): {note}")
        elif crawl:
            licences.append(f"crawl `{crawl}` of {v.name} version {v.version}: its stage folder was not found here; "
                            "see the crawl.licence of the config that built it")
    if not versions:
        lines.append("- exported from a model folder, not a registered version: no lineage recorded")
    metrics = {k[len("metric."):]: x for k, x in (dict(first.tags or {}) if first is not None else {}).items()
               if k.startswith("metric.")}
    lines += ["", "## Metrics", ""]
    lines += (["| metric | value |", "|---|---|"] + [f"| {k} | {metrics[k]} |" for k in sorted(metrics)]
              if metrics else ["None recorded on the registered version."])
    lines += ["", "## Licence of the data", ""]
    lines += [f"- {x}" for x in licences] or [
        "Not recorded: check the licences of the sources this model was trained on before you publish it."]
    lines += ["", "The model's weights are derived from that data; publish them only where its licence allows.", "",
              "## Use with transformers", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tok = AutoTokenizer.from_pretrained("PATH")', 'model = AutoModelForCausalLM.from_pretrained("PATH")']
    if chat:
        lines += ['ids = tok.apply_chat_template([{"role": "user", "content": "O que é o Linux?"}],',
                  '                              add_generation_prompt=True, return_tensors="pt", return_dict=False)',
                  "out = model.generate(ids, max_new_tokens=64)",
                  "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "```", "",
                  "The chat template gives the same token ids as forja's own (model/chat.py); text that looks like "
                  "a special token (`<|end|>`) inside a message stays text. The exported tokenizer drops the "
                  "private-use characters U+E000 and U+E001 from any text (the template uses them to keep that "
                  "exact)."]
    else:
        lines += ['ids = tok("O Linux é", return_tensors="pt").input_ids',
                  "print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))", "```", "",
                  "This tokenizer predates forja's chat tokens: the export has no chat template."]
    return "\n".join(lines) + "\n"


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
