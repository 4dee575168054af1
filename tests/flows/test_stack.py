"""The service stack (`make up` / `make down`, flows/stack.py) with real processes on free
loopback ports in temporary work directories, and the compose file checked by docker-compose."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import yaml

from flows import stack as stk
from tests.fixtures.stack import ROOT, Stack, stack_env, stack_workdir

COMPOSE = ROOT / "infra" / "docker" / "compose.yaml"
TARGET_S = float(os.environ.get("FORJA_STACK_TARGET_S", "90"))  # the goal is 60 s; the tests share 2 cores


def api(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip()[:1] in (b"{", b"[") or raw.strip() in (b"true", b"false") else raw.decode()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_under(folder: Path) -> list[int]:
    """Live processes whose command line mentions `folder` (what a stack in it started)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["environ"] or {}).get("FORJA_WORKDIR", "") \
                + (proc.info["environ"] or {}).get("PREFECT_HOME", "")
            if str(folder) in text and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def check_healthy(stack: Stack) -> dict[str, dict]:
    """The API answers, every prefect.yaml deployment is listed, our worker heartbeats, the pool is READY."""
    assert api(f"{stack.prefect_api_url}/health") is True
    assert api(f"{stack.mlflow_uri}/health") == "OK"
    deployments = {d["name"]: d for d in api(f"{stack.prefect_api_url}/deployments/filter", {})}
    assert stk.deployment_names() <= set(deployments)
    assert {d["work_pool_name"] for n, d in deployments.items() if n in stk.deployment_names()} == {stk.POOL}
    workers = api(f"{stack.prefect_api_url}/work_pools/{stk.POOL}/workers/filter", {})
    ours = [w for w in workers if w["name"] == stack.state["worker_name"]]
    assert ours, f"worker {stack.state['worker_name']} not seen by the API: {workers}"
    beat = datetime.fromisoformat(ours[0]["last_heartbeat_time"].replace("Z", "+00:00"))
    assert datetime.now(timezone.utc) - beat < timedelta(seconds=90)
    assert api(f"{stack.prefect_api_url}/work_pools/{stk.POOL}")["status"] == "READY"
    return deployments


def run_probe(stack: Stack, tmp: Path) -> dict:
    """Deploy tests/fixtures/stack.py:stack_probe to the pool and let the worker run it."""
    env = dict(stack.client_env, PWD=str(ROOT))
    prefect = str(Path(sys.executable).parent / "prefect")
    done = subprocess.run([prefect, "--no-prompt", "deploy", "tests/fixtures/stack.py:stack_probe", "-n", "probe",
                           "-p", stk.POOL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp / "probe.json"
    done = subprocess.run([prefect, "deployment", "run", "stack-probe/probe", "--param", f"out={out}", "--watch",
                           "--watch-timeout", "120"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0 and out.exists(), done.stdout + done.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_up_is_healthy_runs_flows_and_down_then_up_keeps_everything(tmp_path):
    workdir = stack_workdir()
    stack = Stack(workdir, stack_env(workdir))
    try:
        t0 = time.monotonic()
        first = stack.up()
        cold = time.monotonic() - t0
        print(f"\ncold make up: {cold:.1f} s")
        assert cold < TARGET_S, first.stdout
        assert f"http://127.0.0.1:{stack.state['prefect_port']}" in first.stdout and stack.mlflow_uri in first.stdout
        check_healthy(stack)

        # the worker runs flows in the repository root with the stack's environment
        t0 = time.monotonic()
        seen = run_probe(stack, tmp_path)
        print(f"probe deployed and run by the worker: {time.monotonic() - t0:.1f} s")
        assert seen["cwd"] == str(ROOT)
        assert seen["FORJA_WORKDIR"] == str(workdir) and seen["MLFLOW_TRACKING_URI"] == stack.mlflow_uri
        assert seen["PREFECT_LOGGING_EXTRA_LOGGERS"] == "forja"
        assert seen["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith(str(workdir))

        # an experiment with proxied artifacts, to be found again after a restart
        exp = api(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/create", {"name": "kept-across-restarts"})
        got = api(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/get?experiment_id={exp['experiment_id']}")
        assert got["experiment"]["artifact_location"].startswith("mlflow-artifacts:")

        deployments = {d["name"]: d["id"] for d in api(f"{stack.prefect_api_url}/deployments/filter", {})}
        assert "probe" in deployments

        # up while up: reported, nothing started twice
        pids = stack.pids()
        again = stack.command("up")
        assert again.returncode == 0 and "already running (healthy)" in again.stdout
        assert stack.pids() == pids

        # down: every recorded process (and its group) is gone, the data is kept
        down = stack.down()
        assert down.returncode == 0, down.stderr
        assert not any(alive(p) for p in pids.values()) and not stack.pids()
        assert not stk.group_members(pids["prefect"]) and not stk.group_members(pids["worker"])
        assert not processes_under(workdir)
        assert (stack.service / "prefect" / "prefect.db").exists() and (stack.service / "mlflow.db").exists()
        assert stack.command("status").returncode == 3

        t0 = time.monotonic()
        stack.up()
        print(f"warm make up: {time.monotonic() - t0:.1f} s")
        again = check_healthy(stack)
        assert {n: d["id"] for n, d in again.items()} == deployments
        found = api(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kept-across-restarts")
        assert found["experiment"]["experiment_id"] == exp["experiment_id"]
    finally:
        stack.down()
        assert not processes_under(workdir)
        shutil.rmtree(workdir.parent, ignore_errors=True)


@pytest.mark.parametrize("variable", ["PREFECT_PORT", "MLFLOW_PORT"])
def test_a_taken_port_is_named_with_its_variable_and_nothing_starts(variable):
    workdir = stack_workdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = Stack(workdir, stack_env(workdir, **{variable: str(port)}))
        result = stack.command("up")
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and f"{variable}=" in result.stderr
    assert not stack.pids() and not processes_under(workdir)
    shutil.rmtree(workdir.parent, ignore_errors=True)


def test_a_missing_binary_names_it_and_its_package(tmp_path):
    workdir = stack_workdir()
    bin_dir = tmp_path / "bin"  # a PATH with prefect but without mlflow
    bin_dir.mkdir()
    (bin_dir / "prefect").symlink_to(Path(sys.executable).parent / "prefect")
    stack = Stack(workdir, stack_env(workdir, PATH=f"{bin_dir}:/usr/bin:/bin"))
    result = stack.command("up")
    assert result.returncode == 2
    assert "`mlflow` was not found on PATH" in result.stderr and "Python package mlflow" in result.stderr
    assert not stack.pids() and not processes_under(workdir)

    empty = tmp_path / "empty"
    empty.mkdir()
    stack = Stack(workdir, stack_env(workdir, DB="postgres", PG_BIN=str(empty)))
    result = stack.command("up")
    assert result.returncode == 2
    assert str(empty / "initdb") in result.stderr and "postgresql-15" in result.stderr and "PG_BIN" in result.stderr
    assert not stack.pids() and not processes_under(workdir)
    shutil.rmtree(workdir.parent, ignore_errors=True)


def test_a_server_not_healthy_in_time_is_named_and_what_started_is_stopped():
    workdir = stack_workdir()
    stack = Stack(workdir, stack_env(workdir, STACK_TIMEOUT="2"))
    result = stack.command("up")
    assert result.returncode == 2
    assert "the Prefect server did not become healthy in 2 s (STACK_TIMEOUT" in result.stderr
    assert str(stack.service / "logs" / "prefect.log") in result.stderr
    assert not stack.pids() and not processes_under(workdir)
    shutil.rmtree(workdir.parent, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/lib/postgresql/15/bin/initdb").exists(), reason="make system-deps installs postgresql")
def test_db_postgres_puts_prefect_and_mlflow_in_a_private_cluster():
    import psycopg2

    workdir = stack_workdir()
    stack = Stack(workdir, stack_env(workdir, DB="postgres", PG_PORT=str(stk.free_port())))
    try:
        stack.up()
        check_healthy(stack)
        api(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/create", {"name": "in-postgres"})
        state = stack.state
        password = (stack.service / "postgres" / "password").read_text().strip()
        url = f"postgresql://{stk.PG_USER}:{password}@127.0.0.1:{state['pg_port']}"
        with psycopg2.connect(f"{url}/prefect") as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM deployment")
            assert stk.deployment_names() <= {r[0] for r in cur.fetchall()}
        with psycopg2.connect(f"{url}/mlflow") as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM experiments")
            assert "in-postgres" in {r[0] for r in cur.fetchall()}
        assert not (stack.service / "mlflow.db").exists() and not (stack.service / "prefect" / "prefect.db").exists()
        assert (stack.service / "postgres" / "data" / "PG_VERSION").exists()
        pids = stack.pids()
        assert set(pids) == {"postgres", "prefect", "mlflow", "worker"}
        stack.down()
        assert not any(alive(p) for p in pids.values()) and not stk.group_members(pids["postgres"])

    finally:
        stack.down()
        assert not processes_under(workdir)
        shutil.rmtree(workdir.parent, ignore_errors=True)


def test_up_again_without_db_comes_back_on_the_postgres_used_before(tmp_path):
    private = {"db": "postgres", "pg_port": 54999, "database_url": None}
    again = stk.Settings.from_env({"FORJA_WORKDIR": str(tmp_path), "DB": ""})
    stk.restore_database(again, private)
    assert (again.db, again.pg_port, again.database_url) == ("postgres", 54999, None)
    remote = {"db": "postgres", "pg_port": None, "database_url": "postgresql://u:p@db.internal:5432/postgres"}
    again = stk.Settings.from_env({"FORJA_WORKDIR": str(tmp_path)})
    stk.restore_database(again, remote)
    assert again.db == "postgres" and again.database_url == remote["database_url"] and again.pg_port is None
    chosen = stk.Settings.from_env({"FORJA_WORKDIR": str(tmp_path), "DB": "sqlite"})  # asked for: honoured
    stk.restore_database(chosen, private)
    assert chosen.db == "sqlite"
    fresh = stk.Settings.from_env({"FORJA_WORKDIR": str(tmp_path), "DB": "postgres", "PG_PORT": "6001"})
    stk.restore_database(fresh, {})
    assert fresh.pg_port == 6001


def test_bad_settings_name_the_variable(tmp_path):
    for env, named in (({"PREFECT_PORT": "42x"}, "PREFECT_PORT='42x'"), ({"DB": "mysql"}, "DB='mysql'"),
                       ({"STACK_TIMEOUT": "soon"}, "STACK_TIMEOUT='soon'")):
        with pytest.raises(stk.StackError, match=named):
            stk.Settings.from_env({"FORJA_WORKDIR": str(tmp_path), **env})


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="make system-deps installs docker-compose")
def test_compose_file_runs_the_stack_commands_with_state_on_volumes():
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                            cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")})
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"postgres", "redis", "prefect-server", "mlflow", "deploy", "worker", "worker-cuda"} <= set(services)
    expected = stk.container_commands()
    for name in ("prefect-server", "mlflow", "worker", "deploy"):
        assert services[name]["command"] == expected[name], name
    mlflow = services["mlflow"]["command"]
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql")
    assert "--serve-artifacts" in mlflow and mlflow[mlflow.index("--artifacts-destination") + 1] == "/data/mlartifacts"
    # every piece of state is on a named volume
    volumes = {name: {v["target"]: v.get("source") for v in svc.get("volumes", []) if v.get("type") == "volume"}
               for name, svc in services.items()}
    assert "/var/lib/postgresql/data" in volumes["postgres"] and "/data" in volumes["redis"]
    assert "/data/mlartifacts" in volumes["mlflow"] and "/data/prefect" in volumes["prefect-server"]
    for worker in ("worker", "worker-cuda", "deploy", "dask-worker"):
        assert "/app/work" in volumes[worker], worker
    # the data stages' units on Dask: workers join the scheduler the flow's runner names
    scheduler, dask_worker = services["dask-scheduler"]["command"], services["dask-worker"]["command"]
    port = scheduler[scheduler.index("--port") + 1]
    assert dask_worker[:3] == ["dask", "worker", f"tcp://dask-scheduler:{port}"]
    assert services["dask-worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert services["worker"]["environment"]["FORJA_RUNNER"] == "local"  # unless FORJA_RUNNER is set
    assert set(config["volumes"]) >= {s for v in volumes.values() for s in v.values()}
    # the worker is the forja image; the GPU variant builds Dockerfile.cuda and reserves GPUs
    assert services["worker"]["build"]["dockerfile"].endswith("Dockerfile") and "forja" in services["worker"]["image"]
    assert services["worker-cuda"]["build"]["dockerfile"].endswith("Dockerfile.cuda")
    assert (ROOT / "infra" / "docker" / "Dockerfile.cuda").exists()
    # healthchecks and start order
    for name in ("postgres", "redis", "prefect-server", "mlflow"):
        assert services[name].get("healthcheck"), name
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["deploy"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    worker_env = services["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")


def test_commands_prints_what_up_runs():
    result = subprocess.run([sys.executable, "-m", "flows.stack", "commands"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PREFECT_PORT="4300", DB="sqlite"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == shlex.join(stk.prefect_server_command("127.0.0.1", 4300))
    assert "--artifacts-destination" in lines[1] and "--serve-artifacts" in lines[1]
    assert shlex.join(stk.deploy_command()) in lines
