"""What stages show in the Prefect UI: a table of counts per stage run."""
from __future__ import annotations

import logging

from tasks.stage import Manifest

log = logging.getLogger("forja.reports")


def flat_counts(stats: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a stats dict, dotted: {"counts": {"fetched": 3}} -> {"counts.fetched": 3}."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out |= flat_counts(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def publish_counts(stage: str, manifest: Manifest) -> None:
    """A Prefect table artifact of the stage's counts, keyed by stage so the UI keeps history."""
    from prefect.artifacts import create_table_artifact

    rows = [{"metric": k, "value": v} for k, v in flat_counts(manifest.stats).items()]
    try:
        create_table_artifact(
            key=f"{stage}-counts", table=rows,
            description=f"{stage} {manifest.key}: counts from {manifest.folder}",
        )
    except Exception as e:  # an artifact is a view; never fail a stage over it
        log.warning("could not publish the %s artifact: %s", stage, e)
