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


def markdown_report(stage: str, manifest: Manifest) -> str:
    """Counts as a table, then a few examples of each drop reason (when the stage kept any)."""
    lines = [f"# {stage} `{manifest.key}`", "", f"Folder: `{manifest.folder}`", "", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v:.4g} |"
              for k, v in flat_counts(manifest.stats).items()]
    for reason, examples in (manifest.stats.get("examples") or {}).items():
        lines += ["", f"## dropped: {reason}", ""]
        for ex in examples:
            snippet = " ".join(ex["text"].split())[:240].replace("|", "\\|")
            lines.append(f"- <{ex['url']}> — {snippet}")
    return "\n".join(lines) + "\n"


def publish_counts(stage: str, manifest: Manifest) -> None:
    """Prefect artifacts for a stage: a table of its counts and a markdown report with
    examples of dropped documents, keyed by stage so the UI keeps their history."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"metric": k, "value": v} for k, v in flat_counts(manifest.stats).items()]
    try:
        create_table_artifact(
            key=f"{stage}-counts", table=rows,
            description=f"{stage} {manifest.key}: counts from {manifest.folder}",
        )
        create_markdown_artifact(key=f"{stage}-report", markdown=markdown_report(stage, manifest),
                                 description=f"{stage} {manifest.key}")
    except Exception as e:  # an artifact is a view; never fail a stage over it
        log.warning("could not publish the %s artifacts: %s", stage, e)
