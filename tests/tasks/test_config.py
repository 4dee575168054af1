from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.crawl.seeds


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_misspelt_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "crawl:\n  seeds: [http://example.org/]\ndedupe:\n  treshold: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "dedupe.treshold" in str(e.value) and str(p) in str(e.value)
    assert "threshold" in str(e.value)  # tells what the valid keys are


def test_unknown_section_is_rejected(tmp_path):
    p = write(tmp_path, "crawl:\n  seeds: [http://example.org/]\npretrian: {}\n")
    with pytest.raises(ConfigError, match="pretrian"):
        load_config(p)


def test_set_overrides_value_and_rejects_unknown_key(tmp_path):
    p = write(tmp_path, "crawl:\n  seeds: [http://example.org/]\n")
    assert load_config(p, ["dedupe.threshold=0.9"]).dedupe.threshold == 0.9
    with pytest.raises(ConfigError, match="dedupe.thresh"):
        load_config(p, ["dedupe.thresh=0.9"])


def test_cross_field_check_says_what_to_change(tmp_path):
    p = write(tmp_path, "crawl:\n  seeds: [http://example.org/]\npretrain:\n  max_steps: 10\n  warmup_steps: 10\n")
    with pytest.raises(ConfigError, match=r"warmup_steps \(10\) must be < max_steps \(10\)"):
        load_config(p)


def test_pretrain_bad_inputs_name_what_to_change(tmp_path):
    from types import SimpleNamespace

    from tasks import pretrain
    from tasks.config import PretrainConfig

    tokens = SimpleNamespace(folder=tmp_path / "tokenize-abc", stats={"rows": {"train": 3, "val": 1}, "seq_len": 256})
    with pytest.raises(ValueError, match=r"tokenize stage \(.*tokenize-abc\) produced 3 training"):
        pretrain.check_tokens(PretrainConfig(micro_batch_size=8), tokens)
    empty = SimpleNamespace(folder=tmp_path / "t", stats={"rows": {"train": 0, "val": 0}, "seq_len": 256})
    with pytest.raises(ValueError, match="produced 0 training and 0 validation"):
        pretrain.check_tokens(PretrainConfig(), empty)
    pretrain.check_tokens(PretrainConfig(micro_batch_size=2), tokens)  # enough: no error

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nworker-7.invalid slots=8\n")
    with pytest.raises(ConnectionError, match=r"host 'worker-7.invalid' is unreachable"):
        pretrain.launch_command(PretrainConfig(hostfile=str(hostfile)), tmp_path / "spec.json")
    cmd = pretrain.launch_command(PretrainConfig(num_gpus=4), tmp_path / "spec.json")
    assert cmd[cmd.index("--num_gpus") + 1] == "4" and cmd[-3:] == ["--module", "model.train", str(tmp_path / "spec.json")]


def test_muon_with_zero_and_a_clip_is_refused_at_load_naming_what_to_change():
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"optimizer muon with pretrain.zero_stage 1 .* pretrain.grad_clip: 0"):
        load_config("configs/demo.yaml", ["pretrain.optimizer=muon", "pretrain.zero_stage=1"])
    cfg = load_config("configs/demo.yaml", ["pretrain.optimizer=muon", "pretrain.zero_stage=1", "pretrain.grad_clip=0"])
    assert cfg.pretrain.grad_clip == 0 and cfg.pretrain.optimizer == "muon"


def test_a_global_batch_decides_accumulation_and_a_bad_one_says_what_to_change(tmp_path):
    """pretrain.global_batch_size = micro_batch_size x grad_accum_steps x ranks: set, it derives the
    accumulation (what training and the checkpoint fingerprint then use); one that is not a whole
    number of micro-batches, or that disagrees with an explicit grad_accum_steps, is refused at load."""
    base = "crawl:\n  seeds: [http://example.org/]\npretrain:\n  micro_batch_size: 4\n  num_gpus: 2\n"
    cfg = load_config(write(tmp_path, base + "  global_batch_size: 32\n"))
    assert cfg.pretrain.grad_accum_steps == 4
    assert cfg.pretrain.model_dump()["grad_accum_steps"] == 4  # what the training spec is made from
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base + "  global_batch_size: 30\n"))
    assert "global_batch_size 30" in str(e.value) and "multiple of 8" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base + "  global_batch_size: 32\n  grad_accum_steps: 2\n"))
    assert "grad_accum_steps 2" in str(e.value) and "set it to 4" in str(e.value)
    # Without a global batch, grad_accum_steps is what it says; with a hostfile the launch decides.
    assert load_config(write(tmp_path, base + "  grad_accum_steps: 3\n")).pretrain.grad_accum_steps == 3
