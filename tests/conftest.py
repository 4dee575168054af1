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
}.items():
    os.environ.setdefault(k, v)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests pick their own temp SQLite file
# Compiled DeepSpeed ops are reused across runs (make sets this; keep a default for bare pytest).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "forja" / "torch_extensions"))

from tests.fixtures.site import make_site  # noqa: E402


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
