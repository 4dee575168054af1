import json

import pytest

from tasks import stage
from tasks.config import DedupeConfig


def build_ok(out, key):
    (out / "data.txt").write_text("hello")
    return {"rows": 1}


def test_manifest_lists_files_with_checksums_and_is_reused(tmp_path):
    m = stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, build_ok, [stage])
    folder = tmp_path / "artifacts" / "dedupe" / m.key
    assert json.loads((folder / "manifest.json").read_text())["key"] == m.key
    (entry,) = m.files
    assert entry.path == "data.txt" and entry.bytes == 5 and entry.sha256 == stage.sha256_file(folder / "data.txt")

    def must_not_run(out, key):
        raise AssertionError("a finished stage folder was rebuilt")

    again = stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, must_not_run, [stage])
    assert again == m


def test_key_follows_config_and_inputs(tmp_path):
    a = stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, build_ok, [stage])
    b = stage.run_stage("dedupe", DedupeConfig(threshold=0.9), [], tmp_path, build_ok, [stage])
    c = stage.run_stage("normalize", {}, [a], tmp_path, build_ok, [stage])
    d = stage.run_stage("normalize", {}, [b], tmp_path, build_ok, [stage])
    assert a.key != b.key and c.key != d.key
    assert c.inputs == {"dedupe": a.key}


def test_failed_build_leaves_nothing_a_rerun_would_trust(tmp_path):
    def crash(out, key):
        (out / "half.parquet").write_text("partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, crash, [stage])
    assert list((tmp_path / "artifacts" / "dedupe").iterdir()) == []
    m = stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, build_ok, [stage])
    assert (tmp_path / "artifacts" / "dedupe" / m.key / "manifest.json").exists()


def test_folder_without_manifest_is_rebuilt(tmp_path):
    m = stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, build_ok, [stage])
    folder = tmp_path / "artifacts" / "dedupe" / m.key
    (folder / "manifest.json").unlink()
    calls = []
    stage.run_stage("dedupe", DedupeConfig(), [], tmp_path, lambda o, k: calls.append(k) or build_ok(o, k), [stage])
    assert calls == [m.key] and (folder / "manifest.json").exists()


def test_code_version_follows_the_source_of_every_named_module(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "helper_mod.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import helper_mod

    before = stage.code_version(["tasks.stage", "helper_mod"])
    (tmp_path / "helper_mod.py").write_text("def f():\n    return 2\n")
    importlib.reload(helper_mod)
    assert stage.code_version(["tasks.stage", "helper_mod"]) != before
    sys.modules.pop("helper_mod")


def test_code_version_follows_source_files_and_training_counts_its_cpp_kernels(tmp_path):
    from model import kernels
    from tasks import finetune, pretrain

    cpp = tmp_path / "k.cpp"
    cpp.write_text("int f() { return 1; }")
    before = stage.code_version(["tasks.stage", cpp])
    cpp.write_text("int f() { return 2; }")
    assert stage.code_version(["tasks.stage", cpp]) != before
    for code in (pretrain.CODE, finetune.TRAIN_CODE):  # a change to the kernels retrains
        assert "model.kernels" in code and kernels.SOURCE in code
