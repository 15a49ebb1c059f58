"""What every segflow task shares: its results and cache records live in the pipeline's own
object store, I/O gets retries with backoff, and segflow's log lines reach Prefect's logger."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import State, Task, task
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from segflow.errors import ConfigError, DatasetError, InputError
from segflow.storage import StorageOptions, Store, sha256_json

T = TypeVar("T", bound=Task)


# Bad configuration or input fails the same way every time: those errors are not retried.
def worth_retrying(task: Task, task_run: Any, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but segflow's typed config/input errors."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, (ConfigError, InputError, DatasetError, ValidationError))


# Tasks that read and write object storage: 3 more tries, 2 s, 4 s, 8 s apart (+-50% jitter),
# long enough to ride out a storage restart or a short network outage.
IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": worth_retrying,
}
CACHED: dict[str, Any] = {"persist_result": True}


def stage_task(
    name: str, key: Callable[[dict[str, Any]], str], *, io: bool = True, run_name: str | None = None
) -> Callable[[Callable[..., Any]], Task]:
    """A segflow stage as a Prefect task: its result persisted under ``key(parameters)`` (input
    content hashes + stage config + code version, never the run id, so a later run reuses it),
    with :data:`IO_RETRIES` when it reads or writes object storage (``io``)."""
    return task(
        name=name,
        task_run_name=run_name,
        cache_key_fn=lambda _, parameters: key(parameters),
        **CACHED,
        **(IO_RETRIES if io else {}),
    )


_SECRET_KEYS = ("key", "secret", "token")


def result_storage(url: str, storage: StorageOptions) -> LocalFileSystem | RemoteFileSystem:
    """A Prefect filesystem block at ``url``, saved under a name derived from the location
    (Prefect needs result storage saved server-side). Only the endpoint and region are saved:
    credentials stay in the environment of the process that runs the flow."""
    store = Store(url, storage)
    if store.is_local:
        block = LocalFileSystem(basepath=store.path())
    else:
        public = {k: v for k, v in storage.fsspec_kwargs().items() if k not in _SECRET_KEYS}
        block = RemoteFileSystem(basepath=store.uri(), settings=public)
    name = f"segflow-results-{sha256_json([store.uri(), storage.public_dict()])[:16]}"
    block.save(name, overwrite=True)
    return block


def stored_in(url: str, storage: StorageOptions) -> Callable[[T], T]:
    """``stored_in(url, storage)(task)``: the task with its results and cache records under
    ``url``, beside the artifacts, instead of on the machine that happened to run it."""
    block = result_storage(url, storage)
    return lambda t: t.with_options(result_storage=block)


def start_flow(home: str, storage: StorageOptions) -> Callable[[T], T]:
    """What every segflow flow does first: route segflow's logs to the run, and keep its task
    results and cache records in ``<home>/_prefect``, beside the artifacts they describe.
    Returns ``cached``: ``cached(task)`` is the task stored there."""
    route_logs()
    return stored_in(f"{home.rstrip('/')}/_prefect", storage)


class _InRunOnly(logging.Handler):
    """Forwards a record to Prefect's handler only inside a flow or task run. Once routed, the
    ``segflow`` loggers stay routed for the life of the process; outside a run (a CLI command or
    a library call after a flow) Prefect's API handler would only warn that there is no run."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__(inner.level)  # keep the inner handler's level filter
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            self.inner.handle(record)


def route_logs(name: str = "segflow") -> None:
    """Send the ``segflow`` stdlib loggers through Prefect's handlers, as Prefect does for
    ``PREFECT_LOGGING_EXTRA_LOGGERS``, so stage logs show in the run's log view."""
    target = logging.getLogger(name)
    target.setLevel(logging.INFO)
    routed = {h.inner for h in target.handlers if isinstance(h, _InRunOnly)}
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in routed:
            target.addHandler(_InRunOnly(handler))
