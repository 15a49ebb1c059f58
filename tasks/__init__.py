"""Thin Prefect tasks over the ``segflow`` API functions (the CLI calls the same functions)."""
