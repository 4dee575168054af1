"""The registry across processes and people: one version per weights, a registry lock that holds
across work directories (a real Prefect server), a champion moved by hand in MLflow, and a
tracking server that is down. Models are tiny folders saved directly; nothing is trained."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TEXT = "O Linux é um sistema operacional livre. O comando cp copia arquivos e o ping testa a rede. " * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(**extra) -> dict:
    """This process's environment with telemetry off, no inherited Prefect API, and extra."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


# ---- tiny models and the manifests register.build takes --------------------------------------

def tiny_model_folder(folder: Path, seed: int) -> Path:
    """A micro model folder (weights, config, tokenizer) that serves, in milliseconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model.config import ModelConfig
    from model.generate import save_folder
    from model.gpt import GPT

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>"]))
    tok.save(str(folder / "tok.json"))
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    save_folder(model, folder / "tok.json", folder)
    return folder


def manifests(folder: Path, run_id: str, score: float):
    from tasks.stage import Manifest

    common = dict(key="k", inputs={}, code_version="test", created_at=0.0, files=[])
    trained = Manifest(stage="pretrain", folder=str(folder), config={}, stats={"mlflow_run_id": run_id}, **common)
    evaluated = Manifest(stage="evaluate", folder=str(folder), config={},
                         stats={"t.score": score, "suite_sha256": {"t": "suite-file"}}, **common)
    return trained, evaluated


def register_cfg(name: str):
    from tasks.config import RegisterConfig

    return RegisterConfig(model_name=name, experiment="reg-test", gate_metric="t.score", gate_direction="lower")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store for this module (each test uses its own model names), made the
    default (as MLFLOW_TRACKING_URI): creating its tables costs seconds, so it is made once."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield mlflow.MlflowClient()


def training_run(workdir: Path) -> str:
    import mlflow

    from tasks.models import tracking

    experiment = tracking.setup(workdir, "reg-test")
    return mlflow.MlflowClient().create_run(experiment).info.run_id


def versions(client, name: str, scores: list[float]) -> None:
    """Registered versions 1..n of name with a recorded t.score each (no artifacts needed)."""
    client.create_registered_model(name)
    for score in scores:
        v = client.create_model_version(name, source="file:///nowhere", tags={"metric.t.score": str(score),
                                                                             "suite.t.sha256": "suite-file"})
        assert v.version


def champion(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def cli(*argv) -> tuple[int, str, str]:
    import io

    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ---- one version per weights -----------------------------------------------------------------

def test_the_same_weights_registered_again_reuse_their_version_even_after_a_crash(tmp_path, store):
    import mlflow

    from tasks import register

    folder = tiny_model_folder(tmp_path / "trained", seed=0)
    run_id = training_run(tmp_path / "work")
    trained, evaluated = manifests(folder, run_id, 2.0)
    cfg = register_cfg("same-weights")
    (tmp_path / "out").mkdir()

    # A first attempt that died after logging the model, before registering it.
    uri = register.log_model(trained, run_id, register.file_sha256(trained.path("model.safetensors")))
    first = register.build(cfg, trained, evaluated, {"tokenize": "tok-key"}, str(tmp_path / "work"), tmp_path / "out")
    assert first["version"] == 1 and not first["reused_version"] and first["promoted"]
    logged = mlflow.search_logged_models(experiment_ids=[mlflow.get_run(run_id).info.experiment_id], output_format="list")
    assert [m.model_uri for m in logged] == [uri]  # the retry registered the model it had logged

    # A retry after a crash past registration (or a second run with the same weights): one version.
    trained2, evaluated2 = manifests(folder, run_id, 1.5)
    again = register.build(cfg, trained2, evaluated2, {"tokenize": "other"}, str(tmp_path / "work"), tmp_path / "out")
    assert again["version"] == 1 and again["reused_version"]
    assert [str(v.version) for v in store.search_model_versions("name = 'same-weights'")] == ["1"]
    v1 = store.get_model_version("same-weights", "1")
    assert v1.tags["forja.stage.tokenize"] == "tok-key"  # the first registration's lineage stays
    assert v1.tags["metric.t.score"] == "1.5"  # the new evaluation is recorded
    assert str(store.get_model_version_by_alias("same-weights", "candidate").version) == "1"


def test_a_tracking_server_that_is_down_fails_naming_it_and_the_stage_folder(tmp_path, monkeypatch):
    import mlflow

    from tasks import register

    folder = tiny_model_folder(tmp_path / "trained", seed=0)
    trained, evaluated = manifests(folder, "no-run", 1.0)
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", address)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    t0, before = time.time(), mlflow.get_tracking_uri()
    try:
        with pytest.raises(register.TrackingUnavailable) as e:
            register.build(register_cfg("down"), trained, evaluated, {}, str(tmp_path / "work"), tmp_path)
    finally:
        mlflow.set_tracking_uri(before)
    assert address in str(e.value) and str(folder) in str(e.value)
    assert isinstance(e.value, ConnectionError) and time.time() - t0 < 30
    assert (folder / "model.safetensors").is_file()


# ---- a champion moved by hand ----------------------------------------------------------------

def test_a_champion_moved_by_hand_is_shown_gated_against_and_rolled_back_from(tmp_path, store):
    from tasks.models import registry

    work = str(tmp_path / "work")
    versions(store, "hand", [3.0, 2.0, 1.0, 2.5])  # lower is better: 3 is the best
    assert cli("promote", "hand", "1", "--workdir", work)[0] == 0
    assert cli("promote", "hand", "2", "--workdir", work)[0] == 0
    store.set_registered_model_alias("hand", "champion", "3")  # what the MLflow UI does

    code, out, _ = cli("models", "hand", "--workdir", work)
    rows = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [r["version"] for r in rows if "champion" in r["aliases"]] == [3]
    code, out, _ = cli("history", "hand", "--workdir", work)
    history = [json.loads(x) for x in out.splitlines()]
    assert [h["version"] for h in history] == ["1", "2", "3"] and history[-1]["by"] == registry.BY_HAND

    # The gate compares a candidate against the champion a person picked: 4 (2.5) loses to 3 (1.0).
    decision = registry.gate(store, "hand", "4", "t.score", "lower", 0.0)
    assert not decision["promoted"] and decision["previous_champion"] == "3" and decision["champion_value"] == 1.0
    assert champion(store, "hand") == "3"

    # rollback goes to the version before the hand move, then one further, then says there is none.
    code, out, _ = cli("rollback", "hand", "--workdir", work)
    assert code == 0 and champion(store, "hand") == "2" and out.strip() == "hand: champion 3 -> 2"
    assert cli("rollback", "hand", "--workdir", work)[0] == 0 and champion(store, "hand") == "1"
    code, _, err = cli("rollback", "hand", "--workdir", work)
    assert code == 2 and "no earlier champion" in err and champion(store, "hand") == "1"
    assert store.get_registered_model("hand").tags[registry.PREVIOUS] == "2"  # still the version last left

    # A hand move after a rollback: rollback returns to where the rollback had put it.
    store.set_registered_model_alias("hand", "champion", "4")
    assert cli("rollback", "hand", "--workdir", work)[0] == 0 and champion(store, "hand") == "1"


def test_rollback_without_history_is_a_clear_error_and_old_models_keep_their_previous_champion(tmp_path, store):
    from tasks.models import registry

    work = str(tmp_path / "work")
    versions(store, "fresh", [1.0])
    code, _, err = cli("rollback", "fresh", "--workdir", work)
    assert code == 2 and "fresh has no earlier champion" in err and "forja promote fresh VERSION" in err

    # A model whose champion forja moved before the history existed: the old tag is the way back.
    versions(store, "old", [1.0, 2.0])
    store.set_registered_model_alias("old", "champion", "2")
    store.set_registered_model_tag("old", registry.PREVIOUS, "1")
    store.set_model_version_tag("old", "2", "forja.promoted_by", "forja promote")
    assert registry.rollback(store, "old") == ("2", "1")
    assert [h["version"] for h in registry.champion_history(store, "old")] == ["1", "2", "1"]


def test_the_history_stays_within_one_tag_and_rollback_still_walks_it(store):
    from tasks.models import registry

    versions(store, "long", [1.0, 2.0])
    long = [{"version": str(1 + i % 2), "by": "forja promote", "at": "2030-01-01T00:00:00Z"} for i in range(99)]
    store.set_registered_model_alias("long", "champion", "1")
    store.set_registered_model_tag("long", registry.HISTORY, json.dumps(long))  # 99 moves, over one tag's room
    registry.promote(store, "long", "2")
    stored = store.get_registered_model("long").tags[registry.HISTORY]
    assert len(stored) <= registry.HISTORY_MAX_CHARS and json.loads(stored)[-1]["version"] == "2"
    assert registry.rollback(store, "long") == ("2", "1") and registry.rollback(store, "long") == ("1", "2")


# ---- the registry lock ------------------------------------------------------------------------

def test_a_file_lock_that_stays_busy_times_out_naming_its_holder(tmp_path):
    from tasks.models.registry_lock import RegistryLockTimeout, _file_lock

    with _file_lock(tmp_path, "m", 5):
        with pytest.raises(RegistryLockTimeout) as e:
            with _file_lock(tmp_path, "m", 0.3):
                pass
    assert str(tmp_path / "registry.lock") in str(e.value) and f"pid {os.getpid()}" in str(e.value)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port with its own home; its API URL."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui"], env=quiet_env(PREFECT_HOME=str(home)),
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (home / "server.log").read_text()
        time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"prefect server did not answer in 120 s: {(home / 'server.log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.mark.slow  # a real Prefect server starts (about 30 s on 2 cores)
def test_a_prefect_lock_that_stays_busy_times_out_naming_the_limit_and_holder(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.models.registry_lock import RegistryLockTimeout, lock_name, registry_lock

    held, done = threading.Event(), threading.Event()

    def hold():
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            with registry_lock(tmp_path / "a", "Busy Model"):
                held.set()
                done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            with pytest.raises(RegistryLockTimeout) as e:
                with registry_lock(tmp_path / "b", "Busy Model", timeout_s=1):
                    pass
    finally:
        done.set()
        holder.join(60)
    name = lock_name("Busy Model")
    assert name.startswith("forja-registry-busy-model-") and name != lock_name("busy-model")
    assert repr(name) in str(e.value) and prefect_server in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    with temporary_settings({PREFECT_API_URL: prefect_server}):  # released: free again at once
        with registry_lock(tmp_path / "b", "Busy Model", timeout_s=10):
            pass


def _child(spec_path: str) -> None:
    """One registration in its own process (see the test below): waits for the go signal, then
    register.build with the critical section's enter and exit times recorded."""
    spec = json.loads(Path(spec_path).read_text())
    from tasks import register
    from tasks.models import registry
    from tasks.config import RegisterConfig
    from tasks.stage import Manifest

    real = registry.registry_lock
    times = {}

    @contextlib.contextmanager
    def timed(*args, **kwargs):
        with real(*args, **kwargs):
            times["enter"] = time.time()
            time.sleep(1.0)  # widen the section: overlapping sections would show
            yield
            times["exit"] = time.time()

    registry.registry_lock = timed
    trained, evaluated = (Manifest.model_validate(spec[k]) for k in ("trained", "evaluated"))
    Path(spec["ready"]).touch()
    while not Path(spec["go"]).exists():
        time.sleep(0.02)
    out = Path(spec["workdir"]) / "out"
    out.mkdir(parents=True)
    stats = register.build(RegisterConfig(**spec["cfg"]), trained, evaluated, {}, spec["workdir"], out)
    Path(spec["result"]).write_text(json.dumps({**times, **stats}))


@pytest.mark.slow  # three processes register real (tiny) models at once
def test_registrations_from_three_work_directories_are_serialised_by_the_prefect_lock(prefect_server, tmp_path,
                                                                                     store):
    """Three processes, each with its own work directory (its own file lock), one tracking store
    and one Prefect API: two register the same weights, one other weights, all at once."""
    import mlflow

    weights = {"a": tiny_model_folder(tmp_path / "a", seed=1), "b": tiny_model_folder(tmp_path / "b", seed=2)}
    plan = [("a", 2.0), ("a", 2.0), ("b", 1.0)]  # b is better (lower)
    run_ids = {k: training_run(tmp_path / "setup") for k in weights}  # store and experiment made before the race
    go = tmp_path / "go"
    procs, specs = [], []
    t0 = time.time()
    for i, (which, score) in enumerate(plan):
        trained, evaluated = manifests(weights[which], run_ids[which], score)
        spec = {"trained": trained.model_dump(), "evaluated": evaluated.model_dump(),
                "cfg": register_cfg("shared").model_dump(), "workdir": str(tmp_path / f"work{i}"),
                "ready": str(tmp_path / f"ready{i}"), "go": str(go), "result": str(tmp_path / f"result{i}.json")}
        path = tmp_path / f"spec{i}.json"
        path.write_text(json.dumps(spec))
        specs.append(spec)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", f"from tests.tasks.models.test_registry import _child; _child({str(path)!r})"], cwd=ROOT,
            env=quiet_env(PREFECT_API_URL=prefect_server, MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"],
                          OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 180
    while not all(Path(s["ready"]).exists() for s in specs):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        time.sleep(0.1)
    go.touch()
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
    results = sorted((json.loads(Path(s["result"]).read_text()) for s in specs), key=lambda r: r["enter"])
    print(f"three registrations in {time.time() - t0:.1f} s")

    for earlier, later in zip(results, results[1:]):  # critical sections one after another
        assert earlier["exit"] <= later["enter"], results
    # the same weights: one version, reused by the second process
    client = mlflow.MlflowClient()
    all_versions = client.search_model_versions("name = 'shared'")
    assert len(all_versions) == 2, [(v.version, v.tags.get("weights_sha256")) for v in all_versions]
    assert sorted(r["reused_version"] for r in results) == [False, False, True]
    # the champion ends on the better weights; each later gate compared against the champion before it
    best = next(r for r in results if r["t.score"] == 1.0)
    assert champion(client, "shared") == str(best["version"])
    champ = None
    for r in results:
        assert r["previous_champion"] == champ
        champ = str(r["version"]) if r["promoted"] else champ
    history = json.loads(client.get_registered_model("shared").tags["forja.champion_history"])
    assert history[-1]["version"] == str(best["version"])
