"""Shared fixtures. Environment is settled before Prefect or MLflow are imported."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="forja-tests-"))
for k, v in {
    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PREFECT_HOME": str(_TMP / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_TMP / "prefect-results"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PREFECT_LOGGING_EXTRA_LOGGERS": "forja",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # MFU against a fixed per-rank peak (about this machine's 2-thread fp32 matmul), not one measured
    # by every training process at start; the measured path has its own test (tests/model/test_train.py)
    "FORJA_PEAK_FLOPS": "2e11",
}.items():
    os.environ.setdefault(k, v)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests pick their own temp SQLite file
# Compiled DeepSpeed ops are reused across runs (make sets this; keep a default for bare pytest).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "forja" / "torch_extensions"))

from tests.fixtures.site import make_site  # noqa: E402


def pytest_collection_modifyitems(items):
    """Tests on the service stack (a real Prefect server in other processes) run last: Prefect's
    client keeps process-wide state (its event loop thread, the events worker) bound to the API
    it first used, which must be the in-process test harness for the flow tests."""
    service = [item for item in items if "stack" in getattr(item, "fixturenames", ())]
    items[:] = [item for item in items if item not in service] + service


@pytest.fixture
def site(tmp_path) -> Path:
    """The tiny fixture site's root folder (not yet served)."""
    return make_site(tmp_path / "site")


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary API and database for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on 127.0.0.1 at a free port, for the session (make test installs it)."""
    import shutil
    import socket
    import subprocess
    import time

    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed: run `make test` (it installs the Debian package redis-server)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def stack():
    """A real service stack for the session (`make up` in a temp work dir on free ports): yields an
    object with prefect_api_url, mlflow_uri, workdir (and client_env for subprocesses); torn down after."""
    from tests.fixtures.stack import running_stack

    with running_stack() as running:
        yield running


@pytest.fixture(scope="session")
def service_runs(stack, tmp_path_factory):
    """prefect.yaml's demo-weekly run three times by the stack's worker (fresh, unchanged while the
    work directory is held, one page changed), each completion triggering demo-finetune: see
    tests/fixtures/service.py. Leaves two versions of forja-test and their training runs in the
    stack's MLflow."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.fixtures.service import run_weekly

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
        return run_weekly(tmp_path_factory.mktemp("service"))


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uri_stays_in_its_module():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which forja reads as the user's
    choice: a module that points MLflow at a server must not send the next module's runs there."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
