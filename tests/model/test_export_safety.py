"""`forja export` never deletes a folder it did not make, and replaces its own exports atomically."""
import hashlib
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from model.config import ModelConfig
from model.generate import EOT, save_folder
from model.gpt import GPT
from model.hf import export

pytestmark = pytest.mark.fault


def forja_folder(path: Path, seed: int) -> Path:
    """A tiny forja model folder (weights, config, tokenizer); seed changes the weights."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, EOT: 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True)
    tok.save(str(path / "tok.json"))
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=4, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    save_folder(GPT(cfg), path / "tok.json", path / "model")
    return path / "model"


def snapshot(folder: Path) -> dict:
    """Every path under folder with its content's sha256 (folders: None)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_export_refuses_a_folder_holding_the_users_files_and_touches_nothing(tmp_path):
    src = forja_folder(tmp_path / "a", seed=0)
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "thesis.tex").write_text("anos de trabalho")
    (out / "notes" / "n.txt").write_text("nota")
    before = snapshot(out)
    with pytest.raises(ValueError) as e:
        export(src, out)
    assert str(out) in str(e.value) and "--out" in str(e.value)
    assert snapshot(out) == before
    with pytest.raises(ValueError):  # not even an explicit --force deletes what forja did not write
        export(src, out, replace=True)
    assert snapshot(out) == before
    # a folder that looks like an export but holds one file more is not ours either
    exported = export(src, tmp_path / "hf")
    (exported / "my-notes.txt").write_text("minhas notas")
    with pytest.raises(ValueError, match="my-notes.txt"):
        export(src, exported, replace=True)
    assert (exported / "my-notes.txt").read_text() == "minhas notas"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "hf", "mine"]  # no temp folder left


def test_reexport_replaces_a_previous_export_completely_and_leaves_no_temp(tmp_path):
    first, second = forja_folder(tmp_path / "a", seed=0), forja_folder(tmp_path / "b", seed=1)
    out = export(first, tmp_path / "hf")
    old = snapshot(out)
    with pytest.raises(ValueError, match="--force"):  # a previous export is replaced only when asked
        export(second, out)
    assert snapshot(out) == old
    export(second, out, replace=True)
    new = snapshot(out)
    assert new.keys() == old.keys() and new["model.safetensors"] != old["model.safetensors"]
    assert new == snapshot(export(second, tmp_path / "fresh"))  # the same as an export into a new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "fresh", "hf"]


def test_a_failed_export_leaves_the_previous_export_and_no_temp(tmp_path):
    src = forja_folder(tmp_path / "a", seed=0)
    out = export(src, tmp_path / "hf")
    old = snapshot(out)
    (src / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception):
        export(src, out, replace=True)
    assert snapshot(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "hf"]


def test_an_empty_folder_is_used_and_the_cli_has_a_force_flag(tmp_path):
    from flows.cli import parser

    src = forja_folder(tmp_path / "a", seed=0)
    (tmp_path / "hf").mkdir()  # `mkdir hf && forja export ... hf`: nothing in it to lose
    assert len(snapshot(export(src, tmp_path / "hf"))) == 7  # six files and the marker
    args = parser().parse_args(["export", "models:/m@champion", "hf", "--force"])
    assert args.force and args.out == "hf"
