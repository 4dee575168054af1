"""pretrain.precision: bf16 training (DeepSpeed's bf16 mode) on this CPU, its checkpoints, and the
refusals before training: bf16 on a device without it, a checkpoint resumed in another dtype."""
import json

import pytest
import torch

from model import checkpoint
from model import precision
from tests.model.test_resume import losses, make_spec, reference_run, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def test_bf16_where_the_device_lacks_it_is_refused_with_what_to_change():
    no_gpu_bf16 = (False, "Tesla V100 has no bf16 support")
    with pytest.raises(ValueError, match="pretrain.precision is bf16 but Tesla V100 has no bf16 support: set "
                                         "pretrain.precision to fp32"):
        precision.resolve_dtype("bf16", "cuda", no_gpu_bf16)
    with pytest.raises(ValueError, match="torch cannot multiply bf16 matrices"):
        precision.resolve_dtype("bf16", "cpu", (False, "torch cannot multiply bf16 matrices on this CPU (x)"))
    assert precision.resolve_dtype("auto", "cuda", no_gpu_bf16) == torch.float32  # auto falls back, as before
    assert precision.resolve_dtype("auto", "cuda", (True, "")) == torch.bfloat16
    assert precision.resolve_dtype("auto", "cpu", (True, "")) == torch.float32  # a CPU trains in fp32 unless asked
    assert precision.resolve_dtype("bf16", "cpu", (True, "")) == torch.bfloat16
    with pytest.raises(ValueError, match="pretrain.precision is 'fp16': use one of auto, fp32, bf16"):
        precision.resolve_dtype("fp16", "cpu", (True, ""))
    assert precision.bf16_support("cpu") == (True, "")  # this CPU (avx512_bf16): the probe passes


def test_bf16_tracks_fp32_records_its_dtype_and_refuses_an_fp32_resume(reference, tmp_path):
    """12 steps in bf16 follow the fp32 reference's losses within 0.05 nats (bf16 keeps 8 bits of
    mantissa; the optimizer's fp32 master weights stop the error from piling up), on the plain
    model code (the fused CPU kernels are fp32 only). The checkpoint says bf16, and resuming it in
    fp32, or an fp32 run's in bf16, is refused before training, naming pretrain.precision."""
    ref_dir, expected = reference
    done = run(make_spec(tmp_path, "bf16", precision="bf16"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "device cpu (torch.bfloat16)," in done.stdout and "fused CPU kernels" not in done.stdout
    got = losses(tmp_path / "bf16")
    assert list(got) == list(expected)
    assert max(abs(got[k] - expected[k]) for k in got) < 0.05, (got, expected)
    assert got != expected  # it did train in another dtype
    summary = json.loads((tmp_path / "bf16" / "out" / "train_summary.json").read_text())
    assert summary["precision"] == "bf16"
    assert checkpoint.fingerprint_of(tmp_path / "bf16" / "ckpt" / "step-9")["precision"] == "bf16"
    assert "precision" not in checkpoint.fingerprint_of(ref_dir / "ref" / "ckpt" / "step-9")  # fp32: as before

    again = run(make_spec(tmp_path, "bf16", precision="fp32", max_steps=15))
    out = again.stdout + again.stderr
    assert again.returncode != 0 and "CheckpointMismatch" in out, out[-3000:]
    assert "step-9 was trained in bf16 and this run would train in fp32: set pretrain.precision to bf16" in out
    assert "step     10" not in again.stdout
    with pytest.raises(checkpoint.CheckpointMismatch, match="trained in fp32 and this run would train in bf16: "
                                                            "set pretrain.precision to fp32"):
        precision.check_precision(ref_dir / "ref" / "ckpt", torch.bfloat16)
    precision.check_precision(ref_dir / "ref" / "ckpt", torch.float32)  # the same dtype: no error
