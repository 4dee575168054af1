"""Evaluation suites: the formats and their scoring."""
