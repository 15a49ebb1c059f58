"""``prefect deploy``, with one client call fixed for this repository's pins.

With ``prefect==3.8.8`` and ``fastapi==0.154.0`` (requirements.lock), ``prefect deploy`` registers
the first deployment, then dies: after each deployment it asks the server for the pool's online
workers and sends ``{"offset": null, "limit": null}``, which this FastAPI answers with 422 (an
explicit null is no longer read as "use the default"). This runs the same CLI with that one call
sending the server's defaults instead; every argument goes to ``prefect deploy`` unchanged::

    .venv/bin/python deployments/deploy.py --all --prefect-file deployments/prefect.yaml

Drop it once the pins give a Prefect client that omits the nulls, or a FastAPI that reads them as
defaults again. The same 422 hits other list calls of this client (``prefect deployment ls``);
the worker and ``prefect deployment run`` work.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect.client.orchestration._work_pools.client import WorkPoolAsyncClient, WorkPoolClient
from prefect.settings import PREFECT_API_DEFAULT_LIMIT

_async_read = WorkPoolAsyncClient.read_workers_for_work_pool
_sync_read = WorkPoolClient.read_workers_for_work_pool


def _page(offset: int | None, limit: int | None) -> dict[str, int]:
    return {
        "offset": offset or 0,
        "limit": limit if limit is not None else PREFECT_API_DEFAULT_LIMIT.value(),
    }


async def _read_workers_async(
    self: Any,
    work_pool_name: str,
    worker_filter: Any = None,
    offset: int | None = None,
    limit: int | None = None,
) -> Any:
    return await _async_read(self, work_pool_name, worker_filter, **_page(offset, limit))


def _read_workers_sync(
    self: Any,
    work_pool_name: str,
    worker_filter: Any = None,
    offset: int | None = None,
    limit: int | None = None,
) -> Any:
    return _sync_read(self, work_pool_name, worker_filter, **_page(offset, limit))


def patch_client() -> None:
    WorkPoolAsyncClient.read_workers_for_work_pool = _read_workers_async  # type: ignore[method-assign]
    WorkPoolClient.read_workers_for_work_pool = _read_workers_sync  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    from prefect.cli import app

    patch_client()
    sys.argv = ["prefect", "deploy", *argv]
    return app() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
