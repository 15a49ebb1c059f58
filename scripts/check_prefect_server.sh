#!/usr/bin/env bash
# Prove that the pinned Prefect really serves its API (Prefect 3.8 with FastAPI 0.155+ dies at
# import with "Body() got an unexpected keyword argument 'min_items'"), and that the server takes
# the explicit nulls its client sends (FastAPI 0.151+ answers `"sort": null` etc. with a 422,
# which breaks `prefect deploy` and `prefect deployment ls`).
set -euo pipefail
BIN="${BIN:-.venv/bin}"
PORT="${PREFECT_CHECK_PORT:-4297}"
HOME_DIR="$(mktemp -d)"
LOG="$HOME_DIR/server.log"
export PREFECT_HOME="$HOME_DIR" PREFECT_SERVER_ANALYTICS_ENABLED=false
"$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$HOME_DIR"' EXIT
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 90); do
  if curl -sf "$URL/api/health" >/dev/null 2>&1; then
    echo "prefect server: healthy on 127.0.0.1:$PORT ($("$BIN/prefect" version 2>/dev/null | awk '/^Version/{print $2}'))"
    # The body the Prefect client sends for a list call with no sort/limit/offset given.
    CODE="$(curl -s -o "$HOME_DIR/nulls.json" -w '%{http_code}' -X POST \
      -H 'Content-Type: application/json' -d '{"sort": null, "limit": null, "offset": null}' \
      "$URL/api/task_runs/filter" || true)"
    if [ "$CODE" != "200" ]; then
      echo "prefect server: POST /api/task_runs/filter with explicit nulls: HTTP $CODE, not 200;" >&2
      echo "the client's list calls (prefect deploy, prefect deployment ls) fail the same way." >&2
      echo "FastAPI 0.151+ rejects these nulls: keep fastapi==0.150.0 in requirements.lock." >&2
      head -c 2000 "$HOME_DIR/nulls.json" >&2 || true
      echo >&2
      exit 1
    fi
    echo "prefect server: accepts the client's explicit nulls (sort/limit/offset)"
    exit 0
  fi
  if ! kill -0 $PID 2>/dev/null; then break; fi
  sleep 1
done
echo "prefect server failed to start; its log:" >&2
tail -40 "$LOG" >&2
exit 1
