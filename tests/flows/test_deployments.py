"""prefect.yaml's deployments run by a real worker of a real stack (`make up`): the weekly refresh
really refreshes, its completion triggers the fine-tune, forja's logs reach the run, a busy work
directory makes a run wait, a bad config fails before any stage."""
from __future__ import annotations


import pytest

from tests.fixtures.service import client, logs, start, wait_run
from tests.flows.test_pipeline import task_states

pytestmark = pytest.mark.slow
STAGES = ["crawl", "dedupe", "normalize", "tokenize", "pretrain", "evaluate", "register"]


@pytest.fixture(scope="module")
def api(stack):
    """This process's Prefect and MLflow clients pointed at the stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.models import tracking

    tracking.use(stack.mlflow_uri)  # this process's MLflow client, without exporting it to the environment
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        yield stack


@pytest.fixture(scope="module")
def weekly(api, service_runs):
    return service_runs


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
    assert client.get_model_version_download_uri("forja-test", "2").startswith("mlflow-artifacts:")
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
