"""What the UI tests ask of the stack outside the browser: the registry's champion (MLflow
client), `forja models` / `forja rollback` as a person runs them, and Prefect's REST API."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from tests.fixtures.stack import ROOT

MODEL = "forja-test"


def mlflow_client(stack):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)


def champion(stack, name: str = MODEL) -> str | None:
    return mlflow_client(stack).get_registered_model(name).aliases.get("champion")


def challenger(stack, name: str = MODEL) -> str:
    """The newest version that is not the champion: the one a person would try to promote."""
    current = champion(stack, name)
    versions = sorted((int(v.version) for v in mlflow_client(stack).search_model_versions(f"name='{name}'")), reverse=True)
    others = [v for v in versions if str(v) != current]
    if not others:
        raise ValueError(f"{name} has no version besides the champion {current}: the service_runs fixture registers two")
    return str(others[0])


def forja(stack, *args: str, timeout: float = 120) -> str:
    """`forja ARGS` (python -m flows.cli) against the stack; its stdout, or an error with its stderr."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=stack.client_env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"forja {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def models(stack, name: str = MODEL) -> list[dict]:
    """`forja models NAME`: one JSON object a version."""
    return [json.loads(line) for line in forja(stack, "models", name).splitlines() if line.startswith("{")]


def prefect_api(stack, path: str, body: dict | None = None):
    """GET (or POST `body` to) the stack's Prefect REST API and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{stack.prefect_api_url}/{path.lstrip('/')}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())
