"""``serve()``: the HTTP API as a Ray Serve application (FastAPI through Serve's ingress).

Each replica is a Ray actor that loads the ensemble once (``num_gpus=gpus_per_replica``) and
builds its FastAPI app around it (``__serve_build_asgi_app__``: the app is made on the
replica, next to the model it closes over). The driver resolves the version and the choice
first, so a bad ``--version`` fails before Ray starts.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray import serve as ray_serve

from segflow.errors import SegflowError
from segflow.serve.config import ServeConfig
from segflow.serve.service import Resolved, Service, resolve

log = logging.getLogger("segflow.serve")
APP_NAME = "segflow"


@dataclass
class ServeResult:
    url: str
    version: str
    models: str
    replicas: int
    gpus_per_replica: float
    cpus_per_replica: int
    tta: str
    threshold: float
    postprocess: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@ray_serve.deployment(name="segment", max_ongoing_requests=16)
@ray_serve.ingress()
class SegmentDeployment:
    """One replica: the ensemble, loaded once, behind the FastAPI app."""

    def __init__(self, cfg: ServeConfig, resolved: Resolved, cpus: int) -> None:
        import torch

        torch.set_num_threads(max(1, cpus))
        self.service = Service(cfg, resolved)

    def __serve_build_asgi_app__(self):
        from segflow.serve.app import create_app

        return create_app(self.service)


def serve(cfg: ServeConfig) -> ServeResult:
    """Start the server and return once every replica answers; :func:`stop` ends it."""
    from segflow.cluster import connect_ray, gpus_per_task

    t0 = time.perf_counter()
    resolved = resolve(cfg)  # VersionNotFound here, before any process starts
    local = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    if local and not ray.is_initialized():
        _check_port_free(cfg.host, cfg.port)
        _install_proxy_guard(cfg.max_bytes)
    elif not local:
        log.info(
            "on a Ray cluster the upload guard runs in Serve's proxy only if `ray start` had "
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=segflow.serve.proxy.middlewares in its "
            "environment; the replicas refuse oversized and junk uploads either way"
        )
    resources = connect_ray(cfg.ray_address)
    gpus = gpus_per_task(cfg.gpus_per_replica, resources)
    cpus = cfg.cpus_per_replica or max(1, int(resources.get("CPU", 1)) // cfg.replicas)
    _check_resources(cfg.replicas, gpus, cpus, resources, local)
    ray_serve.start(http_options={"host": cfg.host, "port": cfg.port})
    deployment = SegmentDeployment.options(
        num_replicas=cfg.replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}
    )
    try:
        ray_serve.run(deployment.bind(cfg, resolved, cpus), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # Serve reports a replica that failed to start this way
        raise SegflowError(f"the model server did not start: {e}") from None
    url = f"http://{_url_host(cfg.host)}:{cfg.port}"
    log.info(
        "serving model version %s at %s (%d replica(s), %s GPU and %d CPU each)",
        resolved.version.id,
        url,
        cfg.replicas,
        gpus,
        cpus,
    )
    return ServeResult(
        url=url,
        version=resolved.version.id,
        models=cfg.models,
        replicas=cfg.replicas,
        gpus_per_replica=gpus,
        cpus_per_replica=cpus,
        tta=cfg.tta,
        threshold=resolved.threshold,
        postprocess=resolved.postprocess,
        seconds=round(time.perf_counter() - t0, 2),
    )


def stop() -> None:
    """Remove the app; Serve itself stops too when no other application uses it."""
    ray_serve.delete(APP_NAME)
    if not ray_serve.status().applications:
        ray_serve.shutdown()


def serve_forever(cfg: ServeConfig, ready=None) -> None:
    """:func:`serve`, then block until Ctrl-C (or SIGTERM), then :func:`stop`."""
    import signal

    result = serve(cfg)
    if ready is not None:
        ready(result)

    def _interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)  # a container stop is a Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping the model server")
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop()


def _install_proxy_guard(max_bytes: int) -> None:
    """Uploads refused in Serve's proxy (segflow.serve.proxy): the proxy is a process of the
    Ray this process is about to start, and reads its callback from the environment it
    inherits. A callback someone set already is left alone."""
    from segflow.serve.proxy import CALLBACK_ENV, proxy_env

    if os.environ.get(CALLBACK_ENV):
        log.warning("%s is set already: the upload guard is not installed", CALLBACK_ENV)
        return
    os.environ.update(proxy_env(max_bytes))


def _check_resources(
    replicas: int, gpus: float, cpus: int, resources: dict[str, float], local: bool
) -> None:
    """Replicas that cannot be placed wait for resources forever: on this machine that is an
    error; a cluster may still be scaling up, so there it is a warning."""
    short = [
        f"{need:g} {name} ({replicas} replica(s) x {each:g}) but the cluster has {have:g}"
        for name, each in (("GPU", gpus), ("CPU", cpus))
        if (need := replicas * each) > (have := resources.get(name, 0.0))
    ]
    if not short:
        return
    message = "the server needs " + "; ".join(short)
    if local:
        raise SegflowError(f"{message}; lower --replicas or --gpus-per-replica")
    log.warning("%s; replicas wait until the cluster has room", message)


def _check_port_free(host: str, port: int) -> None:
    """Serve's proxy retries a port in use forever, so a local start checks it first (a
    remote cluster's ports are not visible from here)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise SegflowError(
                f"cannot listen on {host}:{port} ({e.strerror}); stop what uses the port or "
                "pick another --port"
            ) from None


def _url_host(host: str) -> str:
    """A host to put in the printed URL: a wildcard bind is reached through loopback."""
    if host in ("0.0.0.0", "", "::"):  # noqa: S104  (compared, not bound)
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
