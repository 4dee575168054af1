"""The MLflow model registry as forja uses it: versions, aliases, the promotion gate.

Every new version gets the alias `candidate`. `champion` moves to a version only when it
beats the current champion on the gate metric of the same suite (same file sha256) by
more than the margin, or when a person promotes it (`forja promote`, or the MLflow UI).

Every move of `champion` is kept in the registered model's tag `forja.champion_history`
(a JSON list of {version, by, at}), whoever made it (a move forja began and a crash cut short
is marked pending until the next operation settles it): each forja registry operation first
reconciles, recording a champion moved in the MLflow UI (or API) as moved by hand, so the
gate compares against the champion a person picked and `forja rollback` walks back through
the versions that really were champion. `forja.previous_champion` still names the version
the last move left, for tools that read it.

Writes to a registered model hold its registry lock (tasks/models/registry_lock.py: a Prefect
global concurrency limit shared by every machine, or a file lock on one machine), so two
registrations at once cannot both read the old champion and both move the alias, nor
register the same weights twice.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from model.faults import fault_point
from tasks.models.registry_lock import RegistryLockError, RegistryLockTimeout, registry_lock  # noqa: F401

log = logging.getLogger("forja.registry")

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "forja.previous_champion"
HISTORY = "forja.champion_history"
BY_HAND = "hand (MLflow UI or API)"
HISTORY_MAX_CHARS = 4800  # a registered model tag holds 5000 characters on PostgreSQL


class ModelNotFound(LookupError):
    pass


def beats(new: float, old: float | None, direction: str, margin: float = 0.0) -> bool:
    if old is None:
        return True
    return new < old - margin if direction == "lower" else new > old + margin


def suite_of(metric: str) -> str | None:
    """The suite a metric comes from ("faq_qa.chrf" -> "faq_qa"); None for held-out metrics."""
    return metric.rpartition(".")[0] or None


def version_metric(version, metric: str) -> tuple[float | None, str | None]:
    """A version's recorded value of metric and the sha256 of the suite it was measured on."""
    value = version.tags.get(f"metric.{metric}")
    suite = suite_of(metric)
    return (float(value) if value is not None else None), (version.tags.get(f"suite.{suite}.sha256") if suite else None)


def alias_version(client: mlflow.MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _champion(client: mlflow.MlflowClient, name: str) -> str | None:
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    return str(version) if version is not None else None


def _parse_history(tags: dict) -> list[dict]:
    if HISTORY in tags:
        return json.loads(tags[HISTORY])
    if tags.get(PREVIOUS):  # a model from before the history existed
        return [{"version": tags[PREVIOUS], "by": f"forja (from the {PREVIOUS} tag)", "at": None}]
    return []


def champion_history(client: mlflow.MlflowClient, name: str) -> list[dict]:
    """The recorded moves of champion, oldest first, as stored (see reconcile)."""
    return _parse_history(client.get_registered_model(name).tags)


def _write_history(client: mlflow.MlflowClient, name: str, history: list[dict]) -> None:
    """Store the history, dropping its oldest entries when it outgrows one tag (rollback
    positions shift with them)."""
    while len(history) > 1 and len(json.dumps(history)) > HISTORY_MAX_CHARS:
        history.pop(0)
        for entry in history:
            if "back_to" in entry:
                entry["back_to"] -= 1
    client.set_registered_model_tag(name, HISTORY, json.dumps(history))


def reconcile(client: mlflow.MlflowClient, name: str, write: bool = True) -> list[dict]:
    """The champion history with the current champion as its last entry: a champion moved
    outside forja (the MLflow UI, the API) is appended as moved by hand, `at` the time forja
    noticed (MLflow keeps no time for an alias); stored when write (under the registry lock)."""
    model = client.get_registered_model(name)
    history = _parse_history(model.tags)
    current = model.aliases.get(CHAMPION)
    current = str(current) if current is not None else None
    if history and history[-1].get("pending"):  # a move that a crash interrupted: finish or forget it
        history = settle(client, name, history, current, write)
    if current == (history[-1]["version"] if history else None):
        return history
    by = BY_HAND
    if HISTORY not in model.tags and current is not None:  # forja before the history may have moved it
        earlier = client.get_model_version(name, current).tags.get("forja.promoted_by")
        by = f"{earlier} (before forja kept a champion history)" if earlier else by
    history.append({"version": current, "by": by, "at": _now()})
    log.info("%s: champion is %s, moved by %s since forja last recorded it", name, current, by)
    if write:
        _write_history(client, name, history)
    return history


def move_champion(client: mlflow.MlflowClient, name: str, version: str, reason: str,
                  back_to: int | None = None) -> str | None:
    """Point champion at version and record the move (after recording any hand move before
    it); returns the version it left."""
    history = reconcile(client, name)
    old = _champion(client, name)
    if old == str(version):
        return old
    entry = {"version": str(version), "by": reason, "at": _now(), "pending": True, "from": old}
    if back_to is not None:
        entry["back_to"] = back_to
    # The intent is written before the alias moves, so a crash between the two is settled by the
    # next reconcile (finished if the alias moved, forgotten if not) instead of being taken for a
    # move by hand and losing the rollback target.
    _write_history(client, name, history + [entry])
    fault_point("registry:history-pending")
    client.set_registered_model_alias(name, CHAMPION, str(version))
    fault_point("registry:champion-moved")
    settle(client, name, history + [entry], str(version))
    log.info("%s: champion %s -> %s (%s)", name, old, version, reason)
    return old


def settle(client: mlflow.MlflowClient, name: str, history: list[dict], current: str | None,
           write: bool = True) -> list[dict]:
    """Finish the pending last move of history if champion is on its version (the alias moved),
    drop it otherwise; stored when write. Idempotent, so a crash inside it is settled again."""
    entry = dict(history[-1])
    if current != entry["version"]:
        history = history[:-1]
        if write:
            _write_history(client, name, history)
        return history
    entry.pop("pending", None)
    old = entry.pop("from", None)
    history = history[:-1] + [entry]
    if write:
        _write_history(client, name, history)
        if old is not None:
            client.set_registered_model_tag(name, PREVIOUS, old)
        client.set_model_version_tag(name, entry["version"], "forja.promoted_by", entry["by"])
    return history


def resolve(client: mlflow.MlflowClient, uri: str):
    """The model version behind models:/NAME@ALIAS or models:/NAME/VERSION, or an error
    naming the registered models that do exist."""
    if not uri.startswith("models:/"):
        raise ModelNotFound(f"{uri!r} is not a model URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri[len("models:/"):]
    name, alias = rest.split("@", 1) if "@" in rest else (rest.rsplit("/", 1) + [None])[:2]
    try:
        if "@" in rest:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, alias)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        detail = ""
        if name in known:
            versions = client.search_model_versions(f"name='{name}'")
            aliases = sorted(client.get_registered_model(name).aliases)
            detail = (f" {name} has versions {sorted(int(v.version) for v in versions)} and aliases {aliases}.")
        raise ModelNotFound(f"no model version at {uri}.{detail} Registered models: {known or 'none'}") from None


def download(client: mlflow.MlflowClient, version, dst: Path) -> Path:
    """The version's model folder (weights, config, tokenizer), downloaded and sha256-checked."""
    from model.serving import check_weights

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                     dst_path=str(dst)))
    weights = next(local.rglob("model.safetensors"))
    check_weights(str(weights), version.tags.get("weights_sha256"))
    return weights.parent


def load_version(client: mlflow.MlflowClient, version, placement=None):
    """(model, tokenizer) of a version: downloaded into a temporary folder, sha256-checked,
    loaded into memory (on a model.device.Placement's device and dtype when given, else the CPU
    as saved); the folder is removed."""
    import tempfile

    from model.generate import load_folder

    where = (placement.device, placement.torch_dtype) if placement is not None else ()
    with tempfile.TemporaryDirectory() as tmp:
        return load_folder(download(client, version, Path(tmp)), *where)


def record_metrics(client: mlflow.MlflowClient, version, metrics: dict, suites_sha256: dict[str, str]) -> None:
    """Metrics as tags on the version (shown side by side in the MLflow UI's version list)
    and linked to its logged model."""
    for k, v in metrics.items():
        client.set_model_version_tag(version.name, version.version, f"metric.{k}", f"{v:.6g}")
    for suite, digest in suites_sha256.items():
        client.set_model_version_tag(version.name, version.version, f"suite.{suite}.sha256", digest)
    model_id = getattr(version, "model_id", None)
    if model_id:
        try:
            mlflow.log_metrics(metrics, model_id=model_id, run_id=version.run_id)
        except MlflowException as e:  # an older server without logged models
            log.warning("could not link metrics to logged model %s: %s", model_id, e)


def gate(client: mlflow.MlflowClient, name: str, version: str, metric: str, direction: str, margin: float,
         rescore=None) -> dict:
    """Move champion to version if it beats the champion on metric (same suite) by > margin.

    rescore(champion_version) -> value is called when the champion's value was measured on
    another suite file (or not at all); the result is recorded on the champion.
    """
    reconcile(client, name)  # a champion picked by hand is the one to beat, and is recorded
    cand = client.get_model_version(name, version)
    value, digest = version_metric(cand, metric)
    if value is None:
        raise ValueError(f"version {version} of {name} has no recorded {metric!r}; gate on a metric its "
                         f"evaluation produced: {sorted(k[7:] for k in cand.tags if k.startswith('metric.'))}")
    champ = alias_version(client, name, CHAMPION)
    champ_value = None
    same = champ is not None and str(champ.version) == str(cand.version)
    if champ is not None and not same:
        champ_value, champ_digest = version_metric(champ, metric)
        if (champ_value is None or champ_digest != digest) and rescore is not None:
            champ_value = float(rescore(champ))
            client.set_model_version_tag(name, champ.version, f"metric.{metric}", f"{champ_value:.6g}")
            if digest:
                client.set_model_version_tag(name, champ.version, f"suite.{suite_of(metric)}.sha256", digest)
        elif champ_digest != digest:
            log.warning("champion %s measured %s on another suite file; comparing anyway", champ.version, metric)
    promoted = champ is None or same or beats(value, champ_value, direction, margin)
    if promoted:
        move_champion(client, name, version, f"gate: {metric} {value:.6g} vs {champ_value} ({direction}, margin {margin})")
    return {"promoted": promoted, "previous_champion": str(champ.version) if champ else None,
            "champion_value": champ_value, metric: value}


def promote(client: mlflow.MlflowClient, name: str, version: str) -> str | None:
    client.get_model_version(name, version)  # exists, or MlflowException
    return move_champion(client, name, version, "forja promote")


def _exists(client: mlflow.MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
        return True
    except MlflowException:
        return False


def rollback(client: mlflow.MlflowClient, name: str) -> tuple[str | None, str]:
    """Move champion to the version that was champion before the current one, whoever moved
    it there; a second rollback walks back one more. Returns (left, now champion)."""
    history = reconcile(client, name)
    current = _champion(client, name)
    position = len(history) - 1
    if history and "back_to" in history[-1]:  # the current champion came from a rollback
        position = history[-1]["back_to"]
    for i in range(min(position, len(history)) - 1, -1, -1):
        target = history[i]["version"]
        if target is not None and target != current and _exists(client, name, target):
            return move_champion(client, name, target, "forja rollback", back_to=i), target
    raise ModelNotFound(f"{name} has no earlier champion to roll back to (champion history: "
                        f"{[e['version'] for e in history] or 'empty'}); move it with forja promote {name} VERSION")


def find_by_weights(client: mlflow.MlflowClient, name: str, weights_sha256: str):
    """The oldest version of name registered with these weights (tag weights_sha256), or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.weights_sha256 = '{weights_sha256}'")
    except MlflowException:  # the registered model does not exist yet
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def version_cost(tags: dict[str, str]) -> dict:
    """What a version cost (its forja.cost.* tags, tasks.cost): totals and training's throughput as
    numbers, each stage as its line of words."""
    out: dict = {}
    for k, v in tags.items():
        if k.startswith("forja.cost.stage."):
            out.setdefault("stages", {})[k[len("forja.cost.stage."):]] = v
        elif k.startswith("forja.cost."):
            try:
                out[k[len("forja.cost."):]] = float(v)
            except ValueError:
                out[k[len("forja.cost."):]] = v
    return out


def describe(client: mlflow.MlflowClient, name: str, write: bool = True) -> list[dict]:
    """The versions of a registered model with their aliases, metric tags and cost (the champion
    history reconciled first, stored when write)."""
    reconcile(client, name, write)
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        rows.append({"version": int(v.version),
                     "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
                     **{k[7:]: float(x) for k, x in v.tags.items() if k.startswith("metric.")},
                     **({"cost": cost} if (cost := version_cost(v.tags)) else {})})
    return rows

