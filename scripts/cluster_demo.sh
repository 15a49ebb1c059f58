#!/usr/bin/env bash
# `make cluster-demo`: runs scripts/cluster_demo.py with the project's environment, outside the
# checkout's folder (the flows must come from the installed package, not from the working
# directory). The Python script starts every service itself and stops each by its PID on
# success, failure or signal (a try/finally plus SIGTERM/SIGHUP handlers); this wrapper's trap
# forwards a Ctrl-C or SIGTERM to it so that clean-up always runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
cd "${TMPDIR:-/tmp}"
"$PY" "$ROOT/scripts/cluster_demo.py" "$@" &
PID=$!
trap 'kill -TERM "$PID" 2>/dev/null || true; wait "$PID"' INT TERM HUP
wait "$PID"
