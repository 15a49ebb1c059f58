"""infra/: docker-compose, the Dockerfile and the Kubernetes manifests agree with each other and
with the code. Docker cannot run here, so these parse the files and check what can be checked
statically: services, stages, images, the environment contract, ports, the bucket, secrets."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests import repo_files as rf

REQUIRED_SERVICES = {
    "postgres",
    "prefect-server",
    "prefect-worker",
    "minio",
    "mc",
    "ray-head",
    "ray-gpu-worker",
}
CHECKSUM_VARS = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
RAY_CLIENT_DEFAULT_PORT = 10001  # `ray start --ray-client-server-port` default
THIS = Path(__file__).resolve()


def services() -> dict[str, dict[str, Any]]:
    return rf.compose()["services"]


def env(service: str) -> dict[str, str]:
    e = services()[service].get("environment") or {}
    if isinstance(e, list):  # the KEY=VALUE list form
        e = dict(item.partition("=")[::2] for item in e)
    return {k: str(v) for k, v in e.items()}


def command(service: str) -> str:
    c = services()[service].get("command", "")
    return " ".join(c) if isinstance(c, list) else c


def built_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if "build" in s}


def built_images() -> dict[str, str]:
    """``{image: Dockerfile target}`` of every image docker compose builds."""
    return {s["image"]: s["build"]["target"] for s in built_services().values()}


def host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port


# -- every file parses -------------------------------------------------------------------------
@pytest.mark.parametrize("path", rf.yaml_files(), ids=lambda p: str(p.relative_to(rf.ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = rf.load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_the_yaml_files_include_compose_k8s_and_prefect() -> None:
    names = {p.relative_to(rf.ROOT).as_posix() for p in rf.yaml_files()}
    assert {"infra/docker-compose.yml", "deployments/prefect.yaml"} <= names
    assert {"infra/k8s/raycluster.yaml", "infra/k8s/prefect-worker.yaml"} <= names
    assert "infra/compose.yaml" not in names, "the old compose file is replaced"


def test_nothing_refers_to_the_old_compose_file() -> None:
    skip_dirs = {".git", ".venv", "demo-out", "__pycache__", ".ruff_cache", ".pytest_cache"}
    offenders = []
    for folder, dirs, files in os.walk(rf.ROOT):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        for f in files:
            p = Path(folder, f)
            if p.suffix not in (".md", ".yaml", ".yml", ".py", ".sh", ".toml", "") or p == THIS:
                continue
            if re.search(r"(?<![-\w])compose\.yaml", p.read_text(errors="ignore")):
                offenders.append(p.relative_to(rf.ROOT).as_posix())
    assert offenders == [], f"still naming the old infra/compose.yaml: {offenders}"


# -- compose: services, images and Dockerfile targets -----------------------------------------
def test_compose_has_the_cluster_services() -> None:
    missing = REQUIRED_SERVICES - set(services())
    assert not missing, f"docker-compose.yml lacks {sorted(missing)}"


def test_every_build_target_is_a_dockerfile_stage() -> None:
    stages = rf.dockerfile_stages()
    assert built_services(), "no service is built from infra/Dockerfile"
    for name, svc in built_services().items():
        build = svc["build"]
        context = (rf.COMPOSE.parent / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == rf.DOCKERFILE.resolve(), name
        assert (context / "requirements.lock").is_file(), f"{name}: context lacks the lock"
        assert build["target"] in stages, (
            f"{name}: target {build['target']!r} is not a `FROM ... AS <stage>` of "
            f"infra/Dockerfile (stages: {sorted(stages)})"
        )


def test_built_images_are_consistent() -> None:
    by_image: dict[str, set[tuple[str, str, str]]] = {}
    for name, svc in built_services().items():
        assert svc.get("image"), f"{name} is built but names no image tag"
        b = svc["build"]
        by_image.setdefault(svc["image"], set()).add((b["context"], b["dockerfile"], b["target"]))
    for image, builds in by_image.items():
        assert len(builds) == 1, f"image {image} is built in {len(builds)} different ways"
    targets = [next(iter(b))[2] for b in by_image.values()]
    assert len(targets) == len(set(targets)), "two image names for one Dockerfile target"
    # a service that only names a segflow image must use one that compose builds
    for name, svc in services().items():
        image = svc.get("image", "")
        if "build" not in svc and image.split(":")[0].startswith("segflow"):
            assert image in by_image, f"{name} uses {image}, which nothing builds"


def test_the_gpu_and_ray_services_run_segflow_images() -> None:
    images = built_images()
    for name in ("prefect-worker", "ray-head", "ray-gpu-worker"):
        assert services()[name].get("image") in images, f"{name} must run a built image"
    # the GPU worker and the head are one Ray cluster: same code, same Ray
    head, gpu = (built_services()[n]["build"]["target"] for n in ("ray-head", "ray-gpu-worker"))
    assert gpu == head or rf.dockerfile_stages()[gpu] == head, "gpu stage must build on the head's"


# -- compose: the environment contract ---------------------------------------------------------
def test_worker_env_names_are_read_by_the_code_or_its_libraries() -> None:
    unknown = [n for n in env("prefect-worker") if not rf.known_env_name(n)]
    assert unknown == [], (
        f"prefect-worker sets {unknown}, which neither src/segflow, boto, Prefect nor "
        "prefect.yaml reads"
    )


def test_every_segflow_service_sets_only_known_names() -> None:
    for name in built_services():
        unknown = [n for n in env(name) if not rf.known_env_name(n)]
        assert unknown == [], f"{name} sets unknown variables {unknown}"


def test_worker_sets_everything_the_code_reads() -> None:
    # the variables src/segflow reads, those prefect.yaml's pull step needs, and the API URL
    wanted = set(rf.code_env_names()) | set(rf.prefect_yaml_env_names()) | {"PREFECT_API_URL"}
    assert {"RAY_ADDRESS", "SEGFLOW_HOME", *CHECKSUM_VARS} <= wanted  # the scan found them
    missing = wanted - set(env("prefect-worker"))
    assert not missing, f"prefect-worker does not set {sorted(missing)}"


def test_worker_reaches_the_prefect_server() -> None:
    host, port = host_port(env("prefect-worker")["PREFECT_API_URL"])
    assert host == "prefect-server"
    assert urlsplit(env("prefect-worker")["PREFECT_API_URL"]).path == "/api"
    assert str(port) == rf.parse_flags(command("prefect-server"))["port"]
    assert services()["prefect-worker"]["depends_on"]["prefect-server"] == {
        "condition": "service_healthy"
    }


def test_worker_home_is_where_the_image_puts_the_code() -> None:
    image_env = rf.dockerfile_env(built_services()["prefect-worker"]["build"]["target"])
    assert env("prefect-worker")["SEGFLOW_HOME"] == image_env["SEGFLOW_HOME"]
    runtime = rf.dockerfile_stage_text("runtime")
    assert re.search(rf"^WORKDIR\s+{re.escape(image_env['SEGFLOW_HOME'])}\s*$", runtime, re.M)


def test_prefect_server_uses_postgres() -> None:
    url = env("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert rf.is_prefect_setting("PREFECT_API_DATABASE_CONNECTION_URL")
    assert url.startswith("postgresql+asyncpg://"), url
    assert rf.lock_pins().get("asyncpg"), "the image needs asyncpg for that URL"
    host, port = host_port(re.sub(r"\$\{[^}]*\}", "password", url))
    assert (host, port) == ("postgres", 5432)
    pg = env("postgres")
    assert url.rsplit("/", 1)[1] == pg["POSTGRES_DB"]
    assert url.split("://", 1)[1].split(":", 1)[0] == pg["POSTGRES_USER"]
    assert services()["prefect-server"]["depends_on"]["postgres"] == {
        "condition": "service_healthy"
    }
    assert "healthcheck" in services()["prefect-server"]


def test_services_talking_to_minio_skip_the_new_boto_checksums() -> None:
    talking = [n for n in services() if "AWS_ENDPOINT_URL" in env(n)]
    assert {"prefect-worker", "ray-head", "ray-gpu-worker"} <= set(talking)
    for name in talking:
        for var in CHECKSUM_VARS:
            assert env(name).get(var) == "when_required", f"{name}: {var} must be when_required"
    assert set(CHECKSUM_VARS) <= rf.code_env_names(), "segflow.storage no longer defaults them"


def test_the_s3_endpoint_is_the_minio_service() -> None:
    # `minio server` listens on --address (default :9000) inside the compose network
    api_port = int(rf.parse_flags(command("minio")).get("address", ":9000").rsplit(":", 1)[1])
    for name in services():
        if "AWS_ENDPOINT_URL" in env(name):
            host, port = host_port(env(name)["AWS_ENDPOINT_URL"])
            assert (host, port) == ("minio", api_port), f"{name}: {host}:{port}"
            assert "minio" in _depends_closure(name), f"{name} starts before MinIO"


def test_no_secret_value_is_written_into_compose() -> None:
    for name in services():
        for var, value in env(name).items():
            if rf.SECRETISH.search(var):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", value), (
                    f"{name}: {var} must come from infra/.env (${{...}}), not a literal"
                )


def test_env_example_lists_every_variable_compose_interpolates() -> None:
    text = rf.COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = (rf.INFRA / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    assert used <= listed, f"infra/.env.example lacks {sorted(used - listed)}"
    assert "infra/.env" in (rf.ROOT / ".gitignore").read_text().split()


# -- compose: bucket, Ray and Dask addresses ---------------------------------------------------
def mc_bucket() -> str:
    (bucket,) = re.findall(r"\bmc\s+mb\s+(?:--\S+\s+)*[\w.-]+/([a-z0-9.-]+)", command("mc"))
    return bucket


def test_mc_creates_the_bucket_the_urls_use() -> None:
    bucket = mc_bucket()
    cluster = [
        d for d in rf.prefect_yaml()["deployments"] if d["work_pool"]["name"] == worker_pool()
    ]
    assert cluster, "prefect.yaml has no deployment for the compose worker's pool"
    used = rf.s3_buckets([d.get("parameters") for d in cluster]) | rf.s3_buckets(rf.compose())
    assert used == {bucket}, f"mc creates {bucket!r}, the URLs use {sorted(used)}"
    for name in ("prefect-worker", "ray-head", "dask-worker"):
        if name in services():
            assert services()[name]["depends_on"]["mc"] == {
                "condition": "service_completed_successfully"
            }


def worker_pool() -> str:
    return rf.parse_flags(command("prefect-worker"))["pool"]


def test_ray_address_is_the_heads_client_port() -> None:
    address = env("prefect-worker")["RAY_ADDRESS"]
    assert address.startswith("ray://"), "a remote cluster is reached through Ray client"
    host, port = host_port(address)
    head = rf.parse_flags(command("ray-head"))
    assert "head" in head
    assert host == "ray-head"
    assert port == int(head.get("ray-client-server-port", RAY_CLIENT_DEFAULT_PORT))
    assert "RAY_ADDRESS" in rf.code_env_names(), "segflow.cluster no longer reads RAY_ADDRESS"


def test_gpu_worker_joins_the_head_and_reserves_its_gpu() -> None:
    flags = rf.parse_flags(command("ray-gpu-worker"))
    head = rf.parse_flags(command("ray-head"))
    assert flags["address"] == f"ray-head:{head['port']}"
    (device,) = services()["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert int(flags["num-gpus"]) == int(device["count"]) >= 1
    assert head.get("num-gpus") == "0", "the head takes no GPU work"
    assert services()["ray-gpu-worker"]["depends_on"]["ray-head"] == {
        "condition": "service_healthy"
    }


def test_dask_address_is_the_scheduler() -> None:
    if "DASK_SCHEDULER_ADDRESS" not in env("prefect-worker"):
        pytest.skip("no Dask cluster in compose")
    host, port = host_port(env("prefect-worker")["DASK_SCHEDULER_ADDRESS"])
    assert host == "dask-scheduler"
    assert port == int(rf.parse_flags(command("dask-scheduler")).get("port", 8786))


def test_depends_on_waits_for_health_where_it_says_so() -> None:
    for name, svc in services().items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: use depends_on conditions"
        for dep, cond in deps.items():
            assert dep in services(), f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services()[dep], f"{dep} has no healthcheck"
    assert services()["mc"].get("restart", "no") == "no", "mc is one-shot"


def _depends_closure(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for dep in services()[todo.pop()].get("depends_on", {}):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


# -- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_is_a_cuda_runtime_image_matching_the_lock() -> None:
    args = rf.dockerfile_args()
    stages = rf.dockerfile_stages()
    base = stages["base"].replace("${CUDA_IMAGE}", args.get("CUDA_IMAGE", ""))
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", base)
    assert m, f"base stage must be a CUDA runtime image, got {base!r}"
    cuda = rf.lock_pins()["nvidia-cuda-runtime"].split(".")[:2]
    assert list(m.groups()) == cuda, f"CUDA {m.groups()} vs the lock's torch CUDA {cuda}"
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{''.join(cuda)}")
    assert args["PYTHON_VERSION"] == rf.python_minor()


def test_dockerfile_installs_the_lock_and_the_package() -> None:
    deps = rf.dockerfile_stage_text("deps")
    assert re.search(r"pip install[^\n]*--extra-index-url \"?\$\{TORCH_INDEX_URL\}", deps)
    assert re.search(r"pip install[^\n]*-r \S*requirements\.lock", deps)
    runtime = rf.dockerfile_stage_text("runtime")
    # a regular install (as from the wheel), after flows/ and tasks/ are there to be packaged
    (install,) = re.finditer(r"pip install[^\n]*--no-deps[^\n]* (-e )?\.\s", runtime)
    assert not install.group(1), "the image installs the package, not an editable checkout"
    for rel in ("src", "flows", "tasks", "deployments", "pyproject.toml"):
        copy = re.search(rf"^COPY\s+{re.escape(rel)}\s", runtime, re.M)
        assert copy, f"runtime lacks {rel}"
        if rel != "deployments":
            assert copy.start() < install.start(), f"{rel} is copied after the install"
    assert "PYTHONPATH" not in rf.dockerfile_env("runtime"), "the package needs no PYTHONPATH"
    assert rf.dockerfile_env("gpu")["SEGFLOW_HOME"] == rf.dockerfile_env("runtime")["SEGFLOW_HOME"]


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (rf.ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".venv" in patterns and ".git" in patterns
    copied = re.findall(r"^COPY\s+(?!--from)(\S+)\s", rf.dockerfile_text(), re.M)
    copied += ["requirements.lock", "README.md"]
    for rel in copied:
        hit = [p for p in patterns if fnmatch.fnmatch(rel, p) or rel.startswith(p + "/")]
        assert not hit, f".dockerignore drops {rel} ({hit}), which the Dockerfile copies"
        assert (rf.ROOT / rel).exists(), f"the Dockerfile copies {rel}, which does not exist"


# -- Kubernetes --------------------------------------------------------------------------------
def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in rf.k8s_docs() if d.get("kind") == kind]


def raycluster() -> dict[str, Any]:
    (rc,) = k8s_kind("RayCluster")
    return rc


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("containers", []) + pod_spec.get("initContainers", [])


def all_containers() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path, doc in rf.k8s_docs():
        for node in rf.walk(doc):
            if isinstance(node, dict) and isinstance(node.get("containers"), list):
                found += [(f"{path.name}:{c['name']}", c) for c in containers(node)]
    manifest = rf.base_job_template()["job_configuration"]["job_manifest"]
    found += [
        (f"base-job-template:{c['name']}", c)
        for c in containers(manifest["spec"]["template"]["spec"])
    ]
    return found


def env_list(container: dict[str, Any]) -> list[dict[str, Any]]:
    """A container's ``env`` entries (the job template's is a Prefect placeholder string)."""
    e = container.get("env", [])
    return e if isinstance(e, list) else []


def test_every_k8s_document_is_a_kubernetes_object() -> None:
    for path, doc in rf.k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), path
    kinds = {d["kind"] for _, d in rf.k8s_docs()}
    assert {"RayCluster", "ConfigMap", "Deployment", "Service"} <= kinds


def test_raycluster_has_gpu_workers_and_the_locked_ray() -> None:
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == rf.lock_pins()["ray"]
    groups = rc["spec"]["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        for c in g["template"]["spec"]["containers"]
        if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    for spec in [head, *groups]:
        bad = {k: v for k, v in spec["rayStartParams"].items() if not isinstance(v, str)}
        assert not bad, f"rayStartParams values must be strings (KubeRay CRD): {bad}"


def test_k8s_images_are_the_dockerfile_images() -> None:
    built = built_images()
    rc = raycluster()
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert built.get(head) == "runtime", f"head image {head} is not the runtime target"
    for g in rc["spec"]["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            assert built.get(c["image"]) == "gpu", f"worker image {c['image']} is not gpu"
    default = rf.base_job_template()["variables"]["properties"]["image"]["default"]
    assert built.get(default) == "runtime", f"flow-run pods run {default}, not the runtime image"


def test_k8s_prefect_worker_is_the_locked_prefect_on_the_cluster_pool() -> None:
    (worker,) = [d for d in k8s_kind("Deployment") if d["metadata"]["name"] == "prefect-worker"]
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    repo, _, tag = c["image"].partition(":")
    assert repo == "prefecthq/prefect" and tag.endswith("-kubernetes")
    assert tag.split("-")[0] == rf.lock_pins()["prefect"]
    assert tag.split("-")[1] == f"python{rf.python_minor()}"
    flags = rf.parse_flags(c["args"])
    assert flags["type"] == "kubernetes"
    assert flags["pool"] == worker_pool(), "k8s and compose workers serve the same pool name"
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] in {
        d["metadata"]["name"] for d in k8s_kind("ServiceAccount")
    }
    rules = k8s_kind("Role")[0]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules)


def test_ray_address_reaches_the_head_services_client_port() -> None:
    (cm,) = [d for d in k8s_kind("ConfigMap") if "RAY_ADDRESS" in d.get("data", {})]
    host, port = host_port(cm["data"]["RAY_ADDRESS"])
    (svc,) = [d for d in k8s_kind("Service") if d["metadata"]["name"] == host]
    rc = raycluster()
    assert svc["spec"]["selector"] == {
        "ray.io/cluster": rc["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    head = rc["spec"]["headGroupSpec"]
    (head_c,) = head["template"]["spec"]["containers"]
    (cport,) = [p for p in head_c["ports"] if p["name"] == svc_port["targetPort"]]
    client_port = int(head["rayStartParams"].get("ray-client-server-port", RAY_CLIENT_DEFAULT_PORT))
    assert cport["containerPort"] == client_port
    assert port == env_port(env("prefect-worker")["RAY_ADDRESS"]), "compose and k8s agree"


def env_port(url: str) -> int | None:
    return host_port(url)[1]


def test_k8s_configmaps_hold_known_non_secret_names() -> None:
    for cm in k8s_kind("ConfigMap"):
        for name in cm.get("data", {}):
            assert rf.known_env_name(name), f"{cm['metadata']['name']}: unknown {name}"
            assert not rf.SECRETISH.search(name), f"secret {name} in a ConfigMap"


def test_no_secret_values_inline_in_k8s_manifests() -> None:
    for path, doc in rf.k8s_docs():
        if doc.get("kind") == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{path}: Secret values"
    for where, c in all_containers():
        for e in env_list(c):
            if rf.SECRETISH.search(e["name"]):
                assert "value" not in e, f"{where}: {e['name']} inline"
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']}"


def test_pods_touching_storage_get_endpoint_checksums_and_credentials() -> None:
    storage_cms = {
        d["metadata"]["name"]: d["data"]
        for d in k8s_kind("ConfigMap")
        if "AWS_ENDPOINT_URL" in d.get("data", {})
    }
    assert storage_cms
    for data in storage_cms.values():
        for var in CHECKSUM_VARS:
            assert data.get(var) == "when_required"
    secrets_needed = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for where, c in all_containers():
        if where.startswith("prefect-worker.yaml"):
            continue  # the worker only talks to the Prefect API
        refs = c.get("envFrom", [])
        cms = {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}
        assert cms & set(storage_cms), f"{where} lacks the storage ConfigMap"
        from_secret = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
        keys = {e["name"] for e in env_list(c) if "secretKeyRef" in e.get("valueFrom", {})}
        assert from_secret or secrets_needed <= keys, f"{where} gets no credentials"


def test_referenced_configmaps_exist_and_the_namespace_matches() -> None:
    defined = {d["metadata"]["name"] for d in k8s_kind("ConfigMap")}
    for where, c in all_containers():
        for r in c.get("envFrom", []):
            if "configMapRef" in r:
                assert r["configMapRef"]["name"] in defined, f"{where}: {r}"
    (ns,) = k8s_kind("Namespace")
    for path, doc in rf.k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns["metadata"]["name"], path
    default_ns = rf.base_job_template()["variables"]["properties"]["namespace"]["default"]
    assert default_ns == ns["metadata"]["name"]


def test_base_job_template_is_a_kubernetes_job_template() -> None:
    t = rf.base_job_template()
    manifest = t["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", str(t["job_configuration"])))
    assert used <= set(t["variables"]["properties"]), "template uses undeclared variables"
    yaml.safe_dump(t)  # plain data, no objects


# -- the cluster on one machine (make cluster-demo) --------------------------------------------
def test_ci_runs_the_cluster_demo_after_the_tests() -> None:
    ci = [
        line.strip()
        for line in (rf.ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci.index("make cluster-demo") > ci.index("make test")
    makefile = (rf.ROOT / "Makefile").read_text()
    assert re.search(r"^cluster-demo: env\n\tbash scripts/cluster_demo\.sh$", makefile, re.M)
    assert "scripts/cluster_demo.py" in (rf.ROOT / "scripts" / "cluster_demo.sh").read_text()


def test_cluster_demo_runs_the_production_deployments() -> None:
    """The demo triggers the cluster deployments themselves, on the pool they name."""
    text = (rf.ROOT / "scripts" / "cluster_demo.py").read_text()
    by_name = {d["name"]: d for d in rf.prefect_yaml()["deployments"]}
    for name, flow in (("retrain", "train"), ("bulk-segment", "segment")):
        assert f'"{flow}/{name}"' in text, f"the demo does not run {flow}/{name}"
        assert f'"-n", "{name}"' in text, f"the demo does not deploy {name}"
        assert by_name[name]["work_pool"]["name"] == worker_pool() == "cluster"
    assert '"--pool", "cluster"' in text
    assert "make cluster-demo" in (rf.ROOT / "README.md").read_text()
    assert "make cluster-demo" in (rf.ROOT / "docs" / "cluster.md").read_text()
