"""``segflow serve``: the fold ensemble behind an HTTP endpoint on Ray Serve.

Import ``segflow.serve.deployment`` for :func:`serve` (it imports Ray Serve); the config and
the FastAPI app need neither Ray nor a model.
"""

from segflow.serve.config import ServeConfig

__all__ = ["ServeConfig"]
