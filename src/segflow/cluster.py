"""Connecting to Ray and Dask: the local machine by default, or a cluster address.

Unset, Ray is a private local instance of this process (never a `ray start` cluster that happens
to run on the machine) and Dask is the threaded scheduler.

A cluster is named by the config (``ray_address``, ``dask_address``) or, when the config leaves
it unset, by the standard variables ``RAY_ADDRESS`` and ``DASK_SCHEDULER_ADDRESS`` (how a
Prefect worker in docker-compose or Kubernetes points every stage at the cluster).
"""

from __future__ import annotations

import os
import threading

_RAY_LOCK = threading.Lock()  # concurrent Prefect tasks must not race to start Ray twice


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def connect_ray(address: str | None) -> dict[str, float]:
    """Start or join Ray once per process; returns the cluster's resources (CPU, GPU...)."""
    import ray

    # Nothing configured means a private local Ray, started by and for this process: "local",
    # not None, because ray.init(address=None) joins the last `ray start` cluster on the
    # machine (whoever started it), and "auto" / "ray://host:10001" must be asked for.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    with _RAY_LOCK:
        if not ray.is_initialized():
            _init_from_lasting_thread(
                address=address,
                num_cpus=cpu_count() if address == "local" else None,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )
    return ray.cluster_resources()


def _init_from_lasting_thread(**kwargs) -> None:
    """``ray.init`` from a thread that lives as long as the process. A local Ray's processes
    are tied to the *thread* that started them (Linux parent-death signal), so starting Ray
    from a Prefect task's worker thread would kill it when the task runner's threads end."""
    import ray

    if threading.current_thread() is threading.main_thread():
        ray.init(**kwargs)
        return
    started, failed = threading.Event(), []

    def keeper() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as e:  # handed to the caller below
            failed.append(e)
        started.set()
        threading.Event().wait()  # never returns: this thread must outlive Ray

    threading.Thread(target=keeper, name="ray-keeper", daemon=True).start()
    started.wait()
    if failed:
        raise failed[0]


def gpus_per_task(requested: float | None, resources: dict[str, float]) -> float:
    """The GPUs a task asks for: as requested, else one where the cluster has GPUs, else 0."""
    if requested is not None:
        return requested
    return 1.0 if resources.get("GPU", 0) > 0 else 0.0


def dask_address(configured: str | None) -> str | None:
    """The Dask scheduler to use: the config's, else ``DASK_SCHEDULER_ADDRESS``, else None
    (the local threaded scheduler)."""
    return configured or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
