"""What every segflow task shares: its results and cache records live in the pipeline's own
object store as JSON manifests, I/O gets retries with backoff, its cache key is computed from
its own typed parameters, and segflow's log lines reach Prefect's logger."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Flow, State, Task, task
from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from segflow.errors import ConfigError, DatasetError, InputError
from segflow.pipeline.results import ManifestSerializer, result_storage
from segflow.storage import StorageOptions, redact

T = TypeVar("T", bound=Task)


class SegflowFlow(Flow):
    """A Prefect flow whose parameters are stored with every credential hidden. Flows refuse
    credentials in their config, but Prefect records the parameters of a run before the flow's
    code can look at them."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return redact(super().serialize_parameters(parameters))

    def with_options(self, **options: Any) -> SegflowFlow:
        copy = super().with_options(**options)  # Prefect builds a plain Flow
        copy.__class__ = SegflowFlow
        return copy


def segflow_flow(**options: Any) -> Callable[[Callable[..., Any]], SegflowFlow]:
    """``@flow(...)`` for segflow's flows: the same options, the parameters redacted."""
    return lambda fn: SegflowFlow(fn, **options)


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
# Results are JSON manifests, never pickles (see segflow.pipeline.results).
CACHED: dict[str, Any] = {"persist_result": True, "result_serializer": ManifestSerializer()}


def stage_task(
    name: str, key: Callable[..., str], *, pure: bool = False, run_name: str | None = None
) -> Callable[[Callable[..., Any]], Task]:
    """A segflow stage as a Prefect task: its result persisted under ``key(...)`` (input content
    hashes + stage config + code version, never the run id, so a later run reuses it). ``key``
    takes some of the task's parameters, by the same names and types; that is checked here,
    when the task is defined, so a rename fails on import, not in a run. Every task gets
    :data:`IO_RETRIES` unless it is marked ``pure`` (computes only, touches no storage)."""

    def wrap(fn: Callable[..., Any]) -> Task:
        wanted = _key_parameters(name, fn, key)

        def cache_key(_: Any, parameters: dict[str, Any]) -> str:
            return key(**{p: parameters[p] for p in wanted})

        return task(
            name=name,
            task_run_name=run_name,
            cache_key_fn=cache_key,
            **CACHED,
            **({} if pure else IO_RETRIES),
        )(fn)

    return wrap


def _key_parameters(name: str, fn: Callable[..., Any], key: Callable[..., str]) -> list[str]:
    """The names ``key`` takes, after checking each is a parameter of ``fn`` of the same type."""
    params = inspect.signature(fn, eval_str=True).parameters
    wanted = list(inspect.signature(key, eval_str=True).parameters.values())
    for p in wanted:
        if p.name not in params:
            raise TypeError(f"cache key of task {name!r} takes {p.name!r}, not a task parameter")
        if p.annotation != params[p.name].annotation:
            raise TypeError(
                f"cache key of task {name!r}: {p.name!r} is {p.annotation} there but "
                f"{params[p.name].annotation} in the task"
            )
    return [p.name for p in wanted]


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
