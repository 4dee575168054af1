"""Prefect flows and the `forja` command line: compose tasks, own no stage logic."""
