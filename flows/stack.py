"""forja as a service on this machine: a Prefect server, an MLflow tracking server, the
`forja-process` work pool with a worker, and every deployment of `prefect.yaml` applied.

    python -m flows.stack up        # (make up) start what is not running, wait until healthy
    python -m flows.stack down      # (make down) stop exactly what `up` started; data is kept
    python -m flows.stack status    # what runs, and whether it answers
    python -m flows.stack commands  # the commands it runs (infra/docker/compose.yaml runs the same)

Everything lives under `<workdir>/service/`: Prefect's home and SQLite database, MLflow's
database and proxied artifact store, an optional private PostgreSQL cluster, logs and pid
files. Settings come from the environment (the Makefile passes its variables through):
FORJA_WORKDIR, PREFECT_PORT, MLFLOW_PORT, DB (sqlite|postgres), PG_PORT, PG_BIN,
DATABASE_URL (an existing PostgreSQL server) and STACK_TIMEOUT (seconds to become healthy).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


ROOT = Path(__file__).resolve().parents[1]
POOL = "forja-process"
PG_USER = "forja"
DATABASES = ("prefect", "mlflow")
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# Which package provides each binary, for the message when one is missing.
PROVIDERS = {"prefect": "the Python package prefect (make install)", "mlflow": "the Python package mlflow (make install)",
             "initdb": "the Debian package postgresql-15 (make system-deps)",
             "postgres": "the Debian package postgresql-15 (make system-deps)",
             "runuser": "the Debian package util-linux"}


class StackError(RuntimeError):
    """A problem the person running the stack can fix; its message says how."""


# The commands, in one place: `up` runs them here and infra/docker/compose.yaml runs the same.
def prefect_server_command(host: str, port: int) -> list[str]:
    """The Prefect API, UI and background services (scheduler, late runs, triggers...)."""
    return ["prefect", "server", "start", "--host", host, "--port", str(port)]


def mlflow_server_command(backend: str, artifacts: str, host: str, port: int, allowed_hosts: str | None = None) -> list[str]:
    """MLflow tracking and registry, serving artifacts itself so clients get `mlflow-artifacts:` URIs."""
    cmd = ["mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
           "--serve-artifacts", "--workers", "1", "--host", host, "--port", str(port)]
    return cmd + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])


def pool_create_command() -> list[str]:
    return ["prefect", "work-pool", "create", POOL, "--type", "process"]


def deploy_command() -> list[str]:
    return ["prefect", "--no-prompt", "deploy", "--all"]


def worker_command(name: str | None = None) -> list[str]:
    return ["prefect", "worker", "start", "--pool", POOL, "--type", "process"] + (["--name", name] if name else [])


@dataclass
class Settings:
    """Where the stack lives and which ports and database it uses."""

    workdir: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    db: str = "sqlite"
    pg_port: int | None = None
    pg_bin: Path = Path("/usr/lib/postgresql/15/bin")
    database_url: str | None = None
    timeout: float = 120.0
    env: dict = field(default_factory=lambda: dict(os.environ))

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)

        def port(var: str, default: int | None) -> int | None:
            raw = env.get(var) or None
            if raw is None:
                return default
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StackError(f"{var}={raw!r} is not a port number (1-65535)")
            return int(raw)

        db = (env.get("DB") or "sqlite").lower()
        if env.get("DATABASE_URL"):
            db = "postgres"
        if db not in ("sqlite", "postgres"):
            raise StackError(f"DB={db!r}: choose DB=sqlite (the default) or DB=postgres")
        try:
            timeout = float(env.get("STACK_TIMEOUT") or 120)
        except ValueError:
            raise StackError(f"STACK_TIMEOUT={env['STACK_TIMEOUT']!r} is not a number of seconds") from None
        return cls(workdir=Path(env.get("FORJA_WORKDIR") or "work").resolve(), prefect_port=port("PREFECT_PORT", 4200),
                   mlflow_port=port("MLFLOW_PORT", 5000), db=db, pg_port=port("PG_PORT", None),
                   pg_bin=Path(env.get("PG_BIN") or "/usr/lib/postgresql/15/bin"),
                   database_url=env.get("DATABASE_URL") or None, timeout=timeout, env=env)

    @property
    def service(self) -> Path:
        return self.workdir / "service"

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"


def which(name: str, settings: Settings) -> str:
    """The binary `name` on the caller's PATH, or a StackError naming the package that provides it."""
    found = shutil.which(name, path=settings.env.get("PATH", os.defpath))
    if not found:
        raise StackError(f"`{name}` was not found on PATH: it is provided by {PROVIDERS[name]}")
    return found


def child_env(settings: Settings, **extra: str) -> dict:
    """The environment of everything the stack starts: telemetry off, Prefect's home in the service folder."""
    env = {k: v for k, v in settings.env.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_"))}
    env.update(TELEMETRY_OFF, PREFECT_HOME=str(settings.service / "prefect"), **extra)
    return env


def client_env(settings: Settings) -> dict:
    """What `prefect deploy` and the worker (and so every flow run) see."""
    return child_env(
        settings, PREFECT_API_URL=settings.prefect_api_url, MLFLOW_TRACKING_URI=settings.mlflow_uri,
        FORJA_WORKDIR=str(settings.workdir), PREFECT_LOGGING_EXTRA_LOGGERS="forja",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(settings.workdir / "prefect" / "results"),
        TORCH_EXTENSIONS_DIR=settings.env.get("TORCH_EXTENSIONS_DIR") or str(ROOT / ".cache" / "torch_extensions"),
        PWD=str(ROOT))  # prefect.yaml's pull step records {{ $PWD }}: flows run in the repository root


# --- HTTP checks -------------------------------------------------------------------------------
def http_json(url: str, body: dict | None = None, timeout: float = 2.0):
    """GET (or POST `body`) and decode JSON; None when the server does not answer (yet)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        return {"_status": err.code}
    except (OSError, urllib.error.URLError):
        return None
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return raw.decode(errors="replace")


def deployment_names() -> set[str]:
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text()) or {}
    return {d["name"] for d in spec.get("deployments") or []}


def health(settings: Settings, worker_name: str | None) -> dict[str, bool]:
    """Which parts answer: Prefect's API, MLflow, the worker's heartbeat, the deployments."""
    api = settings.prefect_api_url
    result = {"prefect": http_json(f"{api}/health") is True, "mlflow": http_json(f"{settings.mlflow_uri}/health") == "OK"}
    workers = http_json(f"{api}/work_pools/{POOL}/workers/filter", {}) if result["prefect"] else None
    result["worker"] = isinstance(workers, list) and any(
        w.get("name") == worker_name and w.get("last_heartbeat_time") for w in workers)
    deps = http_json(f"{api}/deployments/filter", {}) if result["prefect"] else None
    result["deployments"] = isinstance(deps, list) and deployment_names() <= {d.get("name") for d in deps}
    return result


# --- PostgreSQL ---------------------------------------------------------------------------------
def _as_postgres(settings: Settings, cmd: list[str]) -> list[str]:
    """Run as the `postgres` user when we are root (initdb and postgres refuse root)."""
    return [which("runuser", settings), "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_binary(settings: Settings, name: str) -> str:
    path = settings.pg_bin / name
    if not os.access(path, os.X_OK):
        raise StackError(f"{path} not found: DB=postgres needs PostgreSQL's server binaries, provided by "
                         f"{PROVIDERS[name]}; or set PG_BIN to the folder holding initdb and postgres")
    return str(path)


def pg_password(settings: Settings) -> str:
    path = settings.service / "postgres" / "password"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
    return path.read_text().strip()


def pg_init(settings: Settings) -> None:
    """Create the private cluster once (user `forja`, password auth on 127.0.0.1 only)."""
    data = settings.service / "postgres" / "data"
    if (data / "PG_VERSION").exists():
        return
    initdb = _pg_binary(settings, "initdb")
    data.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / "pwfile"
    pwfile.write_text(pg_password(settings) + "\n")
    if os.geteuid() == 0:
        import pwd

        try:
            uid = pwd.getpwnam("postgres").pw_uid
        except KeyError:
            raise StackError("DB=postgres as root needs the `postgres` user (created by the Debian package "
                             "postgresql-15: make system-deps)") from None
        os.chown(data, uid, -1)
        os.chown(pwfile, uid, -1)
        data.chmod(0o700)
        probe = subprocess.run(_as_postgres(settings, ["test", "-w", str(data)]), capture_output=True)
        if probe.returncode != 0:
            pwfile.unlink()
            raise StackError(f"the postgres user cannot reach {data}: a folder above it is closed to other "
                             f"users; choose a WORKDIR whose parent folders others may traverse (chmod o+x)")
    run = subprocess.run(_as_postgres(settings, [initdb, "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile),
                                                 "-A", "scram-sha-256", "-E", "UTF8", "--no-locale"]),
                         capture_output=True, text=True)
    pwfile.unlink()
    if run.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise StackError(f"initdb failed for {data}:\n{(run.stdout + run.stderr)[-2000:]}")


def pg_command(settings: Settings) -> list[str]:
    data = settings.service / "postgres" / "data"
    return _as_postgres(settings, [_pg_binary(settings, "postgres"), "-D", str(data), "-p", str(settings.pg_port),
                                   "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="])


def server_url(settings: Settings) -> str:
    """postgresql://user:password@host:port of the server the stack uses (private or DATABASE_URL)."""
    if settings.database_url:
        parts = urlsplit(settings.database_url)
        return urlunsplit(("postgresql", parts.netloc, "", "", ""))
    return f"postgresql://{PG_USER}:{pg_password(settings)}@127.0.0.1:{settings.pg_port}"


def pg_create_databases(settings: Settings, deadline: float, names: tuple[str, ...] = DATABASES) -> None:
    """Wait for the server, then create the databases `names` (the stack's: `prefect` and `mlflow`) when missing."""
    import psycopg2

    maintenance = urlsplit(settings.database_url).path.lstrip("/") if settings.database_url else "postgres"
    last = None
    while time.monotonic() < deadline:
        try:
            conn = psycopg2.connect(f"{server_url(settings)}/{maintenance or 'postgres'}", connect_timeout=2)
            break
        except psycopg2.OperationalError as err:
            last = err
            time.sleep(0.2)
    else:
        raise StackError(f"PostgreSQL at {urlsplit(server_url(settings)).hostname}:{urlsplit(server_url(settings)).port} "
                         f"did not accept connections in {settings.timeout:.0f} s (STACK_TIMEOUT): {last}")
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def backends(settings: Settings) -> tuple[str, str]:
    """(Prefect's database URL or '' for its SQLite default, MLflow's backend store URI)."""
    if settings.db == "postgres":
        url = server_url(settings)
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3: name the driver installed (psycopg2-binary)
        return (url.replace("postgresql://", "postgresql+asyncpg://", 1) + "/prefect",
                url.replace("postgresql://", "postgresql+psycopg2://", 1) + "/mlflow")
    return "", f"sqlite:///{settings.service / 'mlflow.db'}"



# --- processes: started in their own session, recorded in <service>/run/<name>.pid -------------
STOP_SIGNALS = {"postgres": "SIGINT"}  # PostgreSQL's fast shutdown; SIGTERM would wait for clients
ORDER = ("postgres", "prefect", "mlflow", "worker")  # started in this order, stopped in reverse
LABELS = {"postgres": "PostgreSQL", "prefect": "the Prefect server", "mlflow": "the MLflow server",
          "worker": "the Prefect worker", "deploy": "prefect deploy --all", "pool": "prefect work-pool create"}


def log_path(settings: Settings, name: str) -> Path:
    return settings.service / "logs" / f"{name}.log"


def log_tail(settings: Settings, name: str, lines: int = 25) -> str:
    try:
        text = log_path(settings, name).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def spawn(settings: Settings, name: str, cmd: list[str], env: dict, record: bool = True) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group), output appended to its log."""
    import psutil
    import shlex

    log = log_path(settings, name)
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)
    if record:
        rec = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
               "signal": STOP_SIGNALS.get(name, "SIGTERM"), "command": cmd}
        pid_file = settings.service / "run" / f"{name}.pid"
        pid_file.write_text(json.dumps(rec))
    return proc


def read_record(settings: Settings, name: str) -> dict | None:
    try:
        return json.loads((settings.service / "run" / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None


def _same_process(rec: dict):
    """The psutil.Process of the record if it is still that process (not a reused pid), else None."""
    import psutil

    try:
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["create_time"]) > 1 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child (tests call up/down in-process): don't leave a zombie
    except ChildProcessError:
        pass


def stop(settings: Settings, name: str, grace: float = 20.0) -> None:
    """Stop the process group recorded for `name`: its signal, a grace period, then SIGKILL."""
    import signal

    import psutil

    rec = read_record(settings, name)
    if rec is None:
        return
    pgid = rec["pid"]
    try:
        reused = psutil.pid_exists(pgid) and _same_process(rec) is None and pgid in group_members(pgid)
    except psutil.Error:
        reused = False
    if not reused:  # a pid now held by another program is left alone
        for sig, wait in ((getattr(signal, rec["signal"]), grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while time.monotonic() < end:
                _reap(pgid)
                if not group_members(pgid):
                    break
                time.sleep(0.1)
            if not group_members(pgid):
                break
        _reap(pgid)
    (settings.service / "run" / f"{name}.pid").unlink(missing_ok=True)


def expected(settings: Settings) -> list[str]:
    private_pg = settings.db == "postgres" and not settings.database_url
    return [n for n in ORDER if n != "postgres" or private_pg]


# --- state: the settings of the running stack, so status/down/up-again use the same ones -------
def state_path(settings: Settings) -> Path:
    return settings.service / "stack.json"


def read_state(settings: Settings) -> dict:
    try:
        return json.loads(state_path(settings).read_text())
    except (OSError, ValueError):
        return {}


def write_state(settings: Settings, **extra) -> None:
    state = {"prefect_port": settings.prefect_port, "mlflow_port": settings.mlflow_port, "db": settings.db,
             "pg_port": settings.pg_port, "database_url": settings.database_url, **extra}
    path = state_path(settings)
    path.write_text(json.dumps(state, indent=2))
    path.chmod(0o600)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def note(t0: float, what: str) -> None:
    print(f"[{time.monotonic() - t0:5.1f} s] {what}", flush=True)


class PoolTemplate:
    """The process worker's default job template, computed in a thread while the servers boot
    (the same template `prefect work-pool create --type process` sends)."""

    def __init__(self) -> None:
        import threading

        self.value: dict | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._compute, daemon=True)
        self._thread.start()

    def _compute(self) -> None:
        try:
            from prefect.workers.process import ProcessWorker

            self.value = ProcessWorker.get_default_base_job_template()
        except BaseException as err:  # reported by join()
            self.error = err

    def join(self) -> dict:
        self._thread.join()
        if self.value is None:
            raise StackError(f"could not load Prefect's process worker to create the work pool: {self.error}")
        return self.value


def ensure_pool(settings: Settings, template: PoolTemplate) -> None:
    """Create the process work pool when missing (an existing one, maybe edited in the UI, is kept)."""
    api = settings.prefect_api_url
    if http_json(f"{api}/work_pools/{POOL}") != {"_status": 404}:
        return
    made = http_json(f"{api}/work_pools/", {"name": POOL, "type": "process",
                                            "base_job_template": template.join()}, timeout=30)
    if not isinstance(made, dict) or made.get("_status") not in (None, 409):
        raise StackError(f"creating the work pool {POOL} at {api} failed: {made}")


def wait_until(settings: Settings, label: str, log: str, check, deadline: float, watch: dict,
               goal: str = "become healthy") -> None:
    """Poll `check()` until true; a watched process that exits, or the deadline, is a StackError."""
    while True:
        if check():
            return
        for name, proc in watch.items():
            code = proc.poll()
            if code is not None:
                raise StackError(f"{LABELS[name]} exited with code {code}; the end of "
                                 f"{log_path(settings, name)}:\n{log_tail(settings, name)}")
        if time.monotonic() > deadline:
            raise StackError(f"{label} did not {goal} in {settings.timeout:.0f} s (STACK_TIMEOUT to wait "
                             f"longer); the end of {log_path(settings, log)}:\n{log_tail(settings, log)}")
        time.sleep(0.25)


# --- the commands --------------------------------------------------------------------------------
def _adopt_state(settings: Settings, state: dict) -> None:
    """A running stack keeps the ports and database it was started with."""
    settings.prefect_port, settings.mlflow_port = state["prefect_port"], state["mlflow_port"]
    settings.db, settings.pg_port, settings.database_url = state["db"], state.get("pg_port"), state.get("database_url")


def restore_database(settings: Settings, state: dict) -> None:
    """`make up` again without DB or DATABASE_URL comes back on the PostgreSQL used last time (the
    private cluster on its port, or the server it was given): otherwise its data would seem lost."""
    if state.get("db") == "postgres" and not settings.env.get("DB") and not settings.database_url:
        settings.db, settings.database_url = "postgres", state.get("database_url")
    if settings.db == "postgres" and not settings.database_url and settings.pg_port is None:
        settings.pg_port = state.get("pg_port") or free_port()


def addresses(settings: Settings) -> str:
    return (f"Prefect UI  http://127.0.0.1:{settings.prefect_port}   (PREFECT_API_URL={settings.prefect_api_url})\n"
            f"MLflow UI   {settings.mlflow_uri}   (MLFLOW_TRACKING_URI={settings.mlflow_uri})\n"
            f"data and logs under {settings.service}; stop with `make down` "
            f"(python -m flows.stack down), the data is kept")


def up(settings: Settings) -> None:
    """Start the stack (or find it running) and return once every part is healthy."""
    t0 = time.monotonic()
    for sub in ("run", "logs", "prefect", "mlartifacts"):
        (settings.service / sub).mkdir(parents=True, exist_ok=True)
    state = read_state(settings)
    running = [n for n in ORDER if (rec := read_record(settings, n)) and _same_process(rec)]
    if running:
        _adopt_state(settings, state)
        missing = [n for n in expected(settings) if n not in running]
        if not missing:
            ok = health(settings, state.get("worker_name"))
            if all(ok.values()):
                print(f"forja stack already running (healthy) in {settings.service}\n{addresses(settings)}")
                return
            raise StackError("the forja stack is running but not healthy ("
                             + ", ".join(k for k, v in ok.items() if not v)
                             + f" not answering); logs in {settings.service / 'logs'}; `make down` then `make up`")
        print(f"restarting a partly running stack ({', '.join(missing)} not running)")
        for name in reversed(running):
            stop(settings, name)
    restore_database(settings, state)

    prefect, mlflow = which("prefect", settings), which("mlflow", settings)
    if settings.db == "postgres" and not settings.database_url:
        _pg_binary(settings, "initdb"), _pg_binary(settings, "postgres")
    ports = [(settings.prefect_port, "PREFECT_PORT", "the Prefect server"),
             (settings.mlflow_port, "MLFLOW_PORT", "the MLflow server")]
    if "postgres" in expected(settings):
        ports.append((settings.pg_port, "PG_PORT", "PostgreSQL"))
    for port, var, what in ports:
        if not port_free(port):
            raise StackError(f"port {port} on 127.0.0.1 (for {what}) is already in use: stop what holds it, "
                             f"or choose another port with {var}=... (e.g. make up {var}={free_port()})")
    if len({p for p, _, _ in ports}) < len(ports):
        raise StackError("PREFECT_PORT, MLFLOW_PORT and PG_PORT must be three different ports")

    started: list[str] = []
    transient: list[subprocess.Popen] = []  # one-shot commands, not recorded: killed if `up` fails
    template = PoolTemplate()  # imports Prefect's process worker while the servers boot
    try:
        deadline = time.monotonic() + settings.timeout
        watch: dict[str, subprocess.Popen] = {}
        if "postgres" in expected(settings):
            pg_init(settings)
            watch["postgres"] = (spawn(settings, "postgres", pg_command(settings), child_env(settings)))
            started.append("postgres")
        if settings.db == "postgres":
            pg_create_databases(settings, deadline)
        prefect_db, mlflow_db = backends(settings)
        server_env = child_env(settings, PREFECT_SERVER_API_HOST="127.0.0.1",
                               PREFECT_SERVER_API_PORT=str(settings.prefect_port))
        if prefect_db:
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db
        watch["prefect"] = spawn(settings, "prefect", [prefect, *prefect_server_command(
            "127.0.0.1", settings.prefect_port)[1:]], server_env)
        started.append("prefect")
        watch["mlflow"] = spawn(settings, "mlflow", [mlflow, *mlflow_server_command(
            mlflow_db, str(settings.service / "mlartifacts"), "127.0.0.1", settings.mlflow_port)[1:]],
            child_env(settings))
        started.append("mlflow")
        api = settings.prefect_api_url
        note(t0, "servers started")
        wait_until(settings, "the Prefect server", "prefect", lambda: http_json(f"{api}/health") is True,
                   deadline, watch)
        note(t0, "Prefect API healthy")
        env = client_env(settings)
        worker_name = f"forja-{socket.gethostname()}-{secrets.token_hex(3)}"
        template.join()
        ensure_pool(settings, template)
        note(t0, f"work pool {POOL} ready")
        watch["worker"] = spawn(settings, "worker", [prefect, *worker_command(worker_name)[1:]], env)
        started.append("worker")
        deploy = spawn(settings, "deploy", [prefect, *deploy_command()[1:]], env, record=False)
        transient.append(deploy)
        wait_until(settings, "`prefect deploy --all`", "deploy", lambda: deploy.poll() is not None, deadline, watch,
                   goal="finish")
        note(t0, "deployments applied")
        if deploy.returncode != 0:
            raise StackError(f"`prefect --no-prompt deploy --all` failed (exit {deploy.returncode}); the end of "
                             f"{log_path(settings, 'deploy')}:\n{log_tail(settings, 'deploy', 40)}")
        wait_until(settings, "the MLflow server", "mlflow",
                   lambda: http_json(f"{settings.mlflow_uri}/health") == "OK", deadline, watch)
        note(t0, "MLflow healthy")
        wait_until(settings, "the Prefect worker", "worker", lambda: health(settings, worker_name)["worker"],
                   deadline, watch)
        note(t0, "worker polling")
        wait_until(settings, "the deployments", "deploy", lambda: health(settings, worker_name)["deployments"],
                   deadline, watch)
        write_state(settings, worker_name=worker_name)
    except BaseException:
        import signal

        for proc in transient:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for name in reversed(started):
            stop(settings, name, grace=10.0)
        if started:
            print(f"stopped what this command had started ({', '.join(started)})", file=sys.stderr)
        raise
    print(f"forja stack up and healthy in {time.monotonic() - t0:.1f} s ({settings.db})\n{addresses(settings)}")


def down(settings: Settings) -> None:
    """Stop every process `up` recorded, worker first; the data stays."""
    names = [n for n in ORDER if read_record(settings, n)]
    for name in reversed(names):
        stop(settings, name)
    print(f"forja stack stopped ({', '.join(names) or 'nothing was running'}); data kept in {settings.service}")


def status(settings: Settings) -> int:
    """Print what runs and what answers; 0 when healthy, 3 when nothing runs, 1 otherwise."""
    state = read_state(settings)
    running = {n: bool((rec := read_record(settings, n)) and _same_process(rec)) for n in ORDER}
    if not any(running.values()):
        print(f"forja stack not running ({settings.service})")
        return 3
    _adopt_state(settings, state)
    ok = health(settings, state.get("worker_name"))
    for name in expected(settings):
        print(f"{name:10} {'running' if running[name] else 'STOPPED'}")
    for part, good in ok.items():
        print(f"{part:10} {'healthy' if good else 'NOT ANSWERING'}")
    print(addresses(settings))
    return 0 if all(ok.values()) and all(running[n] for n in expected(settings)) else 1


def container_commands() -> dict[str, list[str]]:
    """The same commands as infra/docker/compose.yaml runs them (service names as hosts)."""
    return {"prefect-server": prefect_server_command("0.0.0.0", 4200),
            "mlflow": mlflow_server_command("postgresql+psycopg2://forja:forja@postgres:5432/mlflow", "/data/mlartifacts",
                                            "0.0.0.0", 5000, allowed_hosts="mlflow:5000,localhost:5000,127.0.0.1:5000"),
            "worker": worker_command(),
            "deploy": ["sh", "-c", f"prefect work-pool inspect {POOL} >/dev/null 2>&1 || "
                       f"{' '.join(pool_create_command())} && exec {' '.join(deploy_command())}"]}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="python -m flows.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "commands"])
    parser.add_argument("--workdir", help="the work directory (default: FORJA_WORKDIR, else ./work)")
    args = parser.parse_args(argv)
    try:
        env = dict(os.environ, **({"FORJA_WORKDIR": args.workdir} if args.workdir else {}))
        settings = Settings.from_env(env)
        if args.command == "up":
            up(settings)
        elif args.command == "down":
            down(settings)
        elif args.command == "status":
            return status(settings)
        else:
            prefect_db, mlflow_db = backends(settings) if settings.db == "sqlite" else ("<postgres>", "<postgres>")
            print(shlex.join(prefect_server_command("127.0.0.1", settings.prefect_port)))
            print(shlex.join(mlflow_server_command(mlflow_db, str(settings.service / "mlartifacts"), "127.0.0.1",
                                                   settings.mlflow_port)))
            for cmd in (pool_create_command(), worker_command(), deploy_command()):
                print(shlex.join(cmd))
    except StackError as err:
        print(f"forja stack: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forja stack: interrupted; what this command started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
