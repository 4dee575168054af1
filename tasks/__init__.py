"""One Prefect task per pipeline stage, each a thin wrapper over plain functions."""
