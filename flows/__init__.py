"""Prefect flows: wiring only; every step is a task in ``tasks/``."""

import os

# Without PREFECT_API_URL a flow starts Prefect's temporary server on SQLite, whose telemetry
# heartbeat writes to the database at startup, races the run's own writes and logs
# "sqlite3.OperationalError: database is locked" tracebacks on healthy runs. Off unless set.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
