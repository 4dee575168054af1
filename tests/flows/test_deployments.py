"""prefect.yaml's deployments run by a real worker of a real stack (`make up`): the weekly refresh
really refreshes, its completion triggers the fine-tune, forja's logs reach the run, a busy work
directory makes a run wait, a bad config fails before any stage, a down tracking server makes
register retry and then fail naming it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.flows.test_pipeline import finetune_config, task_states, write_config
from tests.fixtures.site import make_site

pytestmark = pytest.mark.slow
STAGES = ["crawl", "dedupe", "normalize", "tokenize", "pretrain", "evaluate", "register"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def api(stack):
    """This process's Prefect and MLflow clients pointed at the stack."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    mlflow.set_tracking_uri(stack.mlflow_uri)
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        yield stack


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def deployment_id(name: str):
    with client() as c:
        return c.read_deployment_by_name(name).id


def wait_run(flow_run_id, timeout: float = 900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with client() as c:
            fr = c.read_flow_run(flow_run_id)
        if fr.state.type.value in TERMINAL:
            return fr
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout} s (state {fr.state.name})")


def runs_of(deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with client() as c:
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id(deployment)])))
    return sorted(runs, key=lambda r: r.created)


def wait_triggered(deployment: str, after: int, timeout: float = 600):
    """The run a trigger created once `after` runs of the deployment existed, finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = runs_of(deployment)
        if len(runs) > after:
            return wait_run(runs[after].id, max(1, deadline - time.time()))
        time.sleep(2)
    raise TimeoutError(f"no run of {deployment} was triggered in {timeout} s")


def logs(flow_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client() as c:
        return c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def start(name: str, parameters: dict):
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters, timeout=0)


@pytest.fixture(scope="module")
def weekly(api, tmp_path_factory):
    """demo-weekly run by the worker three times on a served site: fresh; unchanged (while a
    process holds the work directory, so it waits first); after one page changed. Each
    completion triggers demo-finetune."""
    from flows.runtime import workdir_lock

    tmp = tmp_path_factory.mktemp("deployments")
    site = make_site(tmp / "site")
    config = write_config(tmp, site)
    finetune_config(SimpleNamespace(config=config), tmp)  # adds the finetune section to a copy ...
    config.write_text((tmp / "finetune.yaml").read_text())  # ... which becomes the config itself
    workdir = tmp / "work"
    params = {"config_path": str(config), "workdir": str(workdir)}

    first = wait_run(start("forja-pipeline/demo-weekly", params).id)
    finetuned = [wait_triggered("forja-finetune/demo-finetune", 0)]

    with workdir_lock(workdir):  # a run that finds the work directory busy waits for it
        second = start("forja-pipeline/demo-weekly", params)
        deadline = time.time() + 180
        while not any("waiting for the work directory" in log.message for log in logs(second.id)):
            assert time.time() < deadline, "the second run never said it was waiting"
            time.sleep(2)
        with client() as c:
            waiting_state = c.read_flow_run(second.id).state.name
    second = wait_run(second.id)
    finetuned.append(wait_triggered("forja-finetune/demo-finetune", 1))

    page = site / "docs" / "p2.html"
    page.write_bytes(page.read_bytes().replace(b"</body>", b"<p>Uma frase nova sobre o comando rsync, que "
                                               b"sincroniza pastas entre computadores.</p></body>"))
    third = wait_run(start("forja-pipeline/demo-weekly", params).id)
    finetuned.append(wait_triggered("forja-finetune/demo-finetune", 2))
    return SimpleNamespace(runs=[first, second, third], finetuned=finetuned, waiting_state=waiting_state,
                           workdir=workdir, config=config)


def test_the_weekly_deployment_refreshes_then_is_all_cache_hits_then_reruns_a_changed_page(weekly, api):
    import mlflow

    first, second, third = weekly.runs
    assert [r.state.name for r in weekly.runs] == ["Completed"] * 3, [r.state.message for r in weekly.runs]
    assert set(task_states(first.id).values()) == {"Completed"}
    # Unchanged sources: every stage is a cache hit, and the run says so.
    assert task_states(second.id) == {s: "Cached" for s in STAGES}
    assert any("all 7 stages were cache hits" in log.message for log in logs(second.id))
    # One changed page: crawl and everything after it rerun; a new version is registered and gated.
    states = task_states(third.id)
    assert all(states[s] == "Completed" for s in STAGES), states
    client = mlflow.MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions("name='forja-test'"))
    assert versions == [1, 2]
    v2 = client.get_model_version("forja-test", "2")
    assert v2.tags["prefect.flow_run_id"] == str(third.id)
    assert any("register:" in log.message and "champion" in log.message for log in logs(third.id))
    # The registered weights live behind the tracking server, not in the worker's work directory.
    location = client.get_logged_model(v2.model_id).artifact_location if v2.model_id else v2.source
    assert location.startswith("mlflow-artifacts:"), location
    assert not (weekly.workdir / "mlartifacts").exists()


def test_a_worker_run_carries_forjas_logs_and_links_its_mlflow_run(weekly, api):
    first = weekly.runs[0]
    records = logs(first.id)
    by_logger = {log.name for log in records}
    assert {"forja.crawl", "forja.pretrain", "forja.register"} <= by_logger, by_logger
    assert any(log.message.startswith("pretrain: step") for log in records)
    with client() as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first.id])))
    link = next(a for a in artifacts if a.key == "mlflow-run")
    assert link.data.startswith("[") and api.mlflow_uri in link.data and "/runs/" in link.data
    assert {"crawl-counts", "pipeline-stages"} <= {a.key for a in artifacts}


def test_a_run_fired_while_the_work_directory_is_held_waits(weekly):
    assert weekly.waiting_state == "Running"  # it had started, and was waiting, not failed
    assert weekly.runs[1].state.name == "Completed"


def test_each_retrain_triggers_the_finetune_with_its_config(weekly, api):
    import mlflow

    assert [r.state.name for r in weekly.finetuned] == ["Completed"] * 3, [r.state.message for r in weekly.finetuned]
    assert all(r.parameters["config_path"] == str(weekly.config) for r in weekly.finetuned)
    ft = mlflow.MlflowClient().search_model_versions("name='forja-test-ft'")
    assert ft and all(v.tags["forja.parent"].startswith("forja-test/") for v in ft)


def test_a_deployment_run_with_a_bad_config_fails_before_any_stage_as_the_cli_says(weekly, api):
    from tests.flows.test_cli_and_deployment import forja

    bad = ["dedupe.treshold=0.9"]
    run = wait_run(start("forja-pipeline/demo-weekly", {"config_path": str(weekly.config), "overrides": bad,
                                                        "workdir": str(weekly.workdir)}).id, 300)
    assert run.state.name == "Failed"
    assert task_states(run.id) == {}  # not one stage ran
    cli = forja("run", str(weekly.config), "--set", bad[0], "--workdir", str(weekly.workdir))
    message = cli.stderr.strip().removeprefix("forja: ")
    assert cli.returncode == 2 and message and message in run.state.message


def test_register_retries_while_the_tracking_server_is_down_then_fails_naming_it(weekly, api, monkeypatch):
    from prefect import flow
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.runtime import with_policy
    from tasks.config import load_config
    from tasks.register import register
    from tasks.stage import Manifest
    from tests.fixtures.stack import free_port

    def manifest(stage: str) -> Manifest:
        (folder,) = sorted((weekly.workdir / "artifacts" / stage).iterdir(), key=lambda p: p.stat().st_mtime)[-1:]
        return Manifest.model_validate_json((folder / "manifest.json").read_text())

    trained, evaluated = manifest("pretrain"), manifest("evaluate")
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("FORJA_RETRY_DELAY_SCALE", "0.01")
    cfg = load_config(weekly.config, ["register.model_name=forja-down"]).register

    @flow
    def register_only():
        return with_policy(register)(cfg, trained, evaluated, {}, str(weekly.workdir / "other"))

    state = register_only(return_state=True)
    assert state.is_failed()
    with client() as c:
        (task_run,) = c.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert task_run.run_count == 4  # three retries
    assert down in str(state.message) or down in str(task_run.state.message)
    assert Path(trained.folder, "model.safetensors").is_file()  # the trained model is still there
