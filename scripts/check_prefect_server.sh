#!/usr/bin/env bash
# Prove that the pinned Prefect really serves its API (Prefect 3.8 with a too-new FastAPI dies
# at import with "Body() got an unexpected keyword argument 'min_items'").
set -euo pipefail
BIN="${BIN:-.venv/bin}"
PORT="${PREFECT_CHECK_PORT:-4297}"
HOME_DIR="$(mktemp -d)"
LOG="$HOME_DIR/server.log"
export PREFECT_HOME="$HOME_DIR" PREFECT_SERVER_ANALYTICS_ENABLED=false
"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$HOME_DIR"' EXIT
for _ in $(seq 1 90); do
  if curl -sf "http://127.0.0.1:$PORT/api/health" >/dev/null 2>&1; then
    echo "prefect server: healthy on 127.0.0.1:$PORT ($("$BIN/prefect" version 2>/dev/null | awk '/^Version/{print $2}'))"
    exit 0
  fi
  if ! kill -0 $PID 2>/dev/null; then break; fi
  sleep 1
done
echo "prefect server failed to start; its log:" >&2
tail -40 "$LOG" >&2
exit 1
