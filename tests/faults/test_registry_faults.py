"""kill -9 inside a champion move (forja promote, the gate, rollback): whatever instant the process
dies, the next registry operation sees one consistent story: the alias, the champion history (no
move taken for a move by hand, none recorded that did not happen) and the rollback target."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tasks.models import registry

pytestmark = pytest.mark.fault
ROOT = Path(__file__).resolve().parents[2]
NAME = "forja-fault"


@pytest.fixture
def models(tmp_path):
    """A SQLite registry with versions 1 and 2 of NAME, 1 the champion (moved by forja)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("fault", artifact_location=(tmp_path / "mlruns").as_uri())
    client.create_registered_model(NAME)
    for _ in range(2):
        run = client.create_run(exp)
        client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run.info.run_id)
    registry.promote(client, NAME, "1")
    return uri, client


def promote_in_child(uri: str, version: str, fault: str) -> int:
    """`registry.promote` in another process that FORJA_FAULT kills at `fault`; its exit code."""
    code = f"import mlflow; from tasks.models import registry; registry.promote(mlflow.MlflowClient({uri!r}), {NAME!r}, {version!r})"
    env = dict(os.environ, FORJA_FAULT=fault)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120).returncode


def test_killed_after_the_intent_before_the_alias_the_move_never_happened(models):
    uri, client = models
    assert promote_in_child(uri, "2", "registry:history-pending") == -signal.SIGKILL
    history = registry.reconcile(client, NAME)
    assert str(registry.alias_version(client, NAME, registry.CHAMPION).version) == "1"
    assert [e["version"] for e in history] == ["1"], "a move that never happened stays out of the history"
    assert not any(e.get("pending") for e in registry.champion_history(client, NAME))
    # and the next real move works and is recorded once
    registry.promote(client, NAME, "2")
    assert [e["version"] for e in registry.champion_history(client, NAME)] == ["1", "2"]


def test_killed_after_the_alias_the_move_is_finished_as_forjas_and_rollback_finds_the_previous(models):
    uri, client = models
    assert promote_in_child(uri, "2", "registry:champion-moved") == -signal.SIGKILL
    history = registry.reconcile(client, NAME)
    assert [(e["version"], e["by"]) for e in history] == [("1", "forja promote"), ("2", "forja promote")], \
        "the interrupted move must not be taken for a move by hand"
    model = client.get_registered_model(NAME)
    assert model.tags[registry.PREVIOUS] == "1"
    assert client.get_model_version(NAME, "2").tags["forja.promoted_by"] == "forja promote"
    left, now = registry.rollback(client, NAME)
    assert (left, now) == ("2", "1")
    assert str(registry.alias_version(client, NAME, registry.CHAMPION).version) == "1"
