"""The MLflow model registry as forja uses it: versions, aliases, the promotion gate.

Every new version gets the alias `candidate`. `champion` moves to a version only when it
beats the current champion on the gate metric of the same suite (same file sha256) by
more than the margin, or when a person promotes it (`forja promote`). Each move of
`champion` records the version it left in the registered model's tag
`forja.previous_champion`, which `forja rollback` moves it back to.

Gate decisions hold a lock, so two registrations at once cannot both read the old
champion and both move the alias: one decides first, the other compares against it.
The lock is a file beside the tracking store (one machine); with a remote tracking
server, run registrations from one place (a Prefect work pool with one slot) instead.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

log = logging.getLogger("forja.registry")

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "forja.previous_champion"


class ModelNotFound(LookupError):
    pass


@contextlib.contextmanager
def registry_lock(workdir: str | Path):
    path = Path(workdir) / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def move_champion(client: mlflow.MlflowClient, name: str, version: str, reason: str) -> str | None:
    """Point champion at version, remembering the version it leaves; returns that one."""
    old = alias_version(client, name, CHAMPION)
    if old is not None and str(old.version) == str(version):
        return str(old.version)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if old is not None:
        client.set_registered_model_tag(name, PREVIOUS, str(old.version))
    client.set_model_version_tag(name, str(version), "forja.promoted_by", reason)
    log.info("%s: champion %s -> %s (%s)", name, old.version if old else None, version, reason)
    return str(old.version) if old else None


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


def load_version(client: mlflow.MlflowClient, version):
    """(model, tokenizer) of a version: downloaded into a temporary folder, sha256-checked,
    loaded into memory; the folder is removed."""
    import tempfile

    from model.generate import load_folder

    with tempfile.TemporaryDirectory() as tmp:
        return load_folder(download(client, version, Path(tmp)))


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


def rollback(client: mlflow.MlflowClient, name: str) -> tuple[str | None, str]:
    previous = client.get_registered_model(name).tags.get(PREVIOUS)
    if not previous:
        raise ModelNotFound(f"{name} has no earlier champion to roll back to")
    return move_champion(client, name, previous, "forja rollback"), previous


def describe(client: mlflow.MlflowClient, name: str) -> list[dict]:
    """The versions of a registered model with their aliases and metric tags."""
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        rows.append({"version": int(v.version),
                     "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
                     **{k[7:]: float(x) for k, x in v.tags.items() if k.startswith("metric.")}})
    return rows

