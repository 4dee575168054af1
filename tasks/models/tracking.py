"""MLflow wiring: where runs go, the experiment and where its artifacts live, and how a run
names itself and links back to the Prefect flow run that made it.

With the embedded default (a SQLite file in the work directory) artifacts go to
<workdir>/mlartifacts. With a tracking server (MLFLOW_TRACKING_URI=http(s)://...) the
server picks the artifact location (`mlflow-artifacts:` proxied through it, or its own
store), so a registered model can be loaded by anyone who reaches the server, not only
on the machine that trained it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import mlflow
import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.schema import TensorDatasetSchema
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.types.schema import Schema, TensorSpec

from tasks.stage import Manifest

log = logging.getLogger("forja.tracking")

REMOTE_SCHEMES = ("http://", "https://")


def tracking_uri(workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file in the work directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def use(uri: str) -> None:
    """Make uri MLflow's default in this process, without writing MLFLOW_TRACKING_URI into the
    environment (mlflow.set_tracking_uri does): forja reads that variable as the user's choice,
    so one work directory's store must not leak into the next call for another. Child processes
    are given the URI explicitly (tasks.pretrain.child_env)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def is_remote(uri: str) -> bool:
    """A tracking server (as opposed to a database or folder this process writes itself)."""
    return uri.lower().startswith(REMOTE_SCHEMES)


def setup(workdir: str | Path, experiment: str) -> str:
    """Point MLflow at the workdir's store (or the tracking server) and return the experiment id,
    created if new: with the local artifact folder for a local store, with the server's own
    artifact location for a tracking server."""
    uri = tracking_uri(workdir)
    use(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if is_remote(uri) and exp.artifact_location.startswith("file:"):
            log.warning(
                "MLflow experiment %r on the tracking server %s keeps its artifacts at %s, a folder on one "
                "machine: models registered in it can only be loaded there. Use a new experiment name "
                "(register.experiment) so that the server stores the artifacts (mlflow-artifacts:)",
                experiment, uri, exp.artifact_location)
        return exp.experiment_id
    if is_remote(uri):
        return client.create_experiment(experiment)
    artifacts = (Path(workdir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(experiment, artifact_location=artifacts)


def client(workdir: str | Path) -> mlflow.MlflowClient:
    """An MLflow client on the workdir's store (MLFLOW_TRACKING_URI if set), also made the default."""
    use(tracking_uri(workdir))
    return mlflow.MlflowClient()


def download_base(base: dict, workdir: str | Path, dst: Path) -> Path:
    """The model folder of a base version (base: tasks.pretrain.base_version's NAME/VERSION and
    weights sha256) downloaded into dst and sha256-checked; an error if the version now holds
    other weights than when the flow resolved it."""
    from tasks.models import registry

    c = client(workdir)
    version = registry.resolve(c, f"models:/{base['version']}")
    if version.tags.get("weights_sha256") != base["weights_sha256"]:
        raise ValueError(f"{base['version']} now has weights {version.tags.get('weights_sha256')}, not "
                         f"{base['weights_sha256']} as when this flow run resolved {base['uri']}; run the flow again")
    return registry.download(c, version, dst)


def prefect_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def prefect_flow_run_url() -> str | None:
    """The flow run's page in the Prefect UI, when there is a flow run and a UI address
    (PREFECT_UI_URL, derived by Prefect from PREFECT_API_URL)."""
    from prefect.utilities.urls import url_for

    run_id = prefect_flow_run_id()
    return url_for("flow-run", obj_id=run_id) if run_id else None


def run_name(fallback: str, model: str | None = None) -> str:
    """`<flow run name> · <model>` in a Prefect flow run (e.g. `sassy-otter · forja-demo`),
    `<fallback> · <model>` outside one: what the MLflow UI lists runs by."""
    from prefect.runtime import flow_run

    first = (flow_run.name if flow_run.id else None) or fallback
    return f"{first} · {model}" if model else first


def prefect_tags() -> dict[str, str]:
    """Tags linking an MLflow run to its Prefect flow run: its id, and its UI page when known
    (also in the run's description, where the MLflow UI renders it as a link)."""
    tags = {"prefect.flow_run_id": prefect_flow_run_id()}
    url = prefect_flow_run_url()
    if url:
        from prefect.runtime import flow_run

        tags["prefect.flow_run_url"] = url
        tags["mlflow.note.content"] = f"Prefect flow run [{flow_run.name}]({url})"
    return tags


class TokenRows(MetaDataset):
    """Token rows in a stage folder, described (name, digest, source, schema, profile), not loaded."""

    def __init__(self, source, name: str, digest: str, schema: TensorDatasetSchema, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**Dataset.to_dict(self), "schema": json.dumps(self.schema.to_dict()), "profile": json.dumps(self.profile)}


def data_files(m: Manifest, split: str) -> list:
    """The files that hold a split's rows: the memory-mapped .npy copies the loader reads (one per
    shard, or one <split>.npy), else the Parquet shards."""
    npy = [f for f in m.files if f.path == f"{split}.npy"
           or (f.path.startswith(f"{split}-") and f.path.endswith(".npy") and not f.path.endswith(".mask.npy"))]
    return npy or [f for f in m.files if f.path.startswith(f"{split}-")]


def token_dataset(m: Manifest, split: str) -> TokenRows:
    """A stage's token rows of one split (train, val) as an MLflow dataset: named after the stage
    and its key, its digest the split's data file's sha256, its source the stage folder, its
    profile the split's counts (rows, tokens, documents ...) and its schema the rows' shape."""
    data = data_files(m, split)
    if not data:
        raise ValueError(f"the {m.stage} stage ({m.folder}) has no {split} split")
    digest = data[0].sha256 if len(data) == 1 else hashlib.sha256("".join(f.sha256 for f in data).encode()).hexdigest()
    profile = {k: v[split] for k, v in m.stats.items() if isinstance(v, dict) and split in v}
    profile |= {k: m.stats[k] for k in ("seq_len", "vocab_size") if k in m.stats}
    rows = np.load(m.path(data[0].path), mmap_mode="r") if data[0].path.endswith(".npy") else None  # header only
    spec = (TensorSpec(rows.dtype, (-1, rows.shape[1]), "tokens") if rows is not None
            else TensorSpec(np.dtype(np.uint32), (-1, (m.stats.get("seq_len") or 0) + 1), "tokens"))
    schema = TensorDatasetSchema(Schema([spec]))
    return TokenRows(LocalArtifactDatasetSource(Path(m.folder).as_uri()), f"{m.stage}-{m.key}-{split}",
                     digest[:12], schema, profile)


CONTEXTS = {"train": "training", "val": "validation"}


def log_token_inputs(m: Manifest) -> None:
    """The stage's train and validation rows as the active run's dataset inputs."""
    mlflow.log_inputs([token_dataset(m, s) for s in CONTEXTS], list(CONTEXTS.values()),
                      [{"forja.stage": m.stage, "forja.stage_key": m.key} for _ in CONTEXTS])
