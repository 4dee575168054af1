"""A pickle planted in a checkpoint is never executed: the resume reads DeepSpeed's files with
weights_only=True, refuses the planted one, names it, and falls back to the checkpoint before it."""
import builtins
import json

import pytest
import torch

from tests.model.test_resume import losses, make_spec, reference_run, run

pytestmark = [pytest.mark.fault, pytest.mark.slow]


class Planted:
    """Unpickling this opens (creates) the marker file: what an attacker's payload would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_a_pickle_planted_in_a_checkpoint_is_never_executed(tmp_path_factory):
    tmp, expected = reference_run(tmp_path_factory)
    first = run(make_spec(tmp, "planted"), fault="step:8")  # complete checkpoints at 3 and 6
    assert first.returncode == -9, first.stdout[-2000:]
    marker = tmp / "planted" / "executed"
    victim = max((tmp / "planted" / "ckpt" / "step-6").rglob("*.pt"), key=lambda p: p.stat().st_size)
    torch.save({"module": Planted(marker)}, victim)
    commit = victim.parents[0] / "COMMIT.json"  # the attacker can write the folder: make the sizes agree
    while not commit.exists():
        commit = commit.parents[1] / "COMMIT.json"
    info = json.loads(commit.read_text())
    info["files"][str(victim.relative_to(commit.parent))] = victim.stat().st_size
    commit.write_text(json.dumps(info))
    again = run(make_spec(tmp, "planted"))
    assert not marker.exists(), "the planted pickle ran"
    assert again.returncode == 0, again.stdout[-3000:]
    assert "step-6 skipped" in again.stdout and "Weights only load failed" in again.stdout, again.stdout[-3000:]
    assert "at step 3" in again.stdout
    assert losses(tmp / "planted") == expected
