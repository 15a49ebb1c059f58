"""Prefect flows: wiring only; every step is a task in ``tasks/``."""
