"""Reading what Prefect recorded (task runs, artifacts), and a TCP proxy that can go down."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey


def task_runs() -> dict[str, Any]:
    """Every task run the API knows, by id."""
    out: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        offset = 0
        while batch := client.read_task_runs(limit=200, offset=offset):
            out.update({str(r.id): r for r in batch})
            offset += len(batch)
    return out


SUBFLOW = re.compile(r"^(train|segment)-\d+$")  # the task run Prefect makes for a subflow


def new_states(before: dict[str, Any]) -> dict[str, str]:
    """``task run name -> state name`` of the task runs created since ``before`` (not
    counting the stand-ins of subflow runs)."""
    runs = [r for i, r in task_runs().items() if i not in before and not SUBFLOW.match(r.name)]
    # Prefect suffixes unnamed task runs with 3 random hex digits: "plan-shards-3bc"
    return {re.sub(r"-[0-9a-f]{3}$", "", r.name): r.state.name for r in runs}


def kinds(states: dict[str, str], prefix: str) -> dict[str, str]:
    return {n: s for n, s in states.items() if n.startswith(prefix)}


def run_logs() -> list[Any]:
    """Every log line the API holds."""
    out: list[Any] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(limit=200, offset=len(out)):
            out.extend(batch)
    return out


def latest_artifact(key: str) -> Any:
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact with key {key!r}"
    return found[0]


class FlakyProxy:
    """A TCP proxy to ``target`` on 127.0.0.1:``port`` that can refuse connections for a while
    (its listening socket closed, open connections cut), like a storage outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.outages = 0
        self._up()

    def _up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _down(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()

    def outage(self, seconds: float) -> None:
        self._down()
        self.outages += 1
        time.sleep(seconds)
        self._up()

    def close(self) -> None:
        self._down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
