"""Readers for the deployment and infrastructure files (``deployments/``, ``infra/``), shared by
tests/test_infra.py and tests/test_deployments.py.

Everything an assertion compares against is read from the repository (requirements.lock,
pyproject.toml, the code's environment reads, the Dockerfile's stages), never copied here.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
BASE_JOB_TEMPLATE = K8S / "base-job-template.json"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"

#: environment names whose value must never be written into a file
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL")

#: files whose module docstrings state which environment variables the code relies on
ENV_CONTRACT_MODULES = ("src/segflow/storage.py", "src/segflow/cluster.py")


# -- YAML / JSON -------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    found = [
        p
        for d in (INFRA, ROOT / "deployments")
        for p in d.rglob("*")
        if p.suffix in (".yaml", ".yml") and p.is_file()
    ]
    return sorted(found)


def load_docs(path: Path) -> list[Any]:
    """Every document of a (multi-document) YAML file, empty ones dropped."""
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@cache
def compose() -> dict[str, Any]:
    (doc,) = load_docs(COMPOSE)
    return doc


@cache
def prefect_yaml() -> dict[str, Any]:
    (doc,) = load_docs(PREFECT_YAML)
    return doc


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.y*ml")) for d in load_docs(p)]


def base_job_template() -> dict[str, Any]:
    return json.loads(BASE_JOB_TEMPLATE.read_text())


def walk(obj: Any) -> Iterator[Any]:
    """Every value in a nested dict/list structure, containers included."""
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


def s3_buckets(obj: Any) -> set[str]:
    return {urlsplit(v).netloc for v in walk(obj) if isinstance(v, str) and v.startswith("s3://")}


# -- pins --------------------------------------------------------------------------------------
@cache
def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def python_minor() -> str:
    """The one Python minor pyproject.toml allows (``>=3.11,<3.12`` -> ``3.11``)."""
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    (minor,) = re.findall(r">=\s*(\d+\.\d+)", spec)
    return minor


# -- Dockerfile --------------------------------------------------------------------------------
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def dockerfile_args() -> dict[str, str]:
    """``ARG NAME=default`` lines (the global and the per-stage ones)."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", dockerfile_text(), re.M))


def dockerfile_stages() -> dict[str, str]:
    """``{stage: base}`` for every ``FROM <base> AS <stage>``."""
    found = re.findall(
        r"^FROM\s+(?:--\S+\s+)*(\S+)\s+AS\s+(\S+)\s*$", dockerfile_text(), re.M | re.I
    )
    return {stage: base for base, stage in found}


def dockerfile_stage_text(stage: str) -> str:
    """The instructions of one stage (up to the next FROM)."""
    parts = re.split(r"^FROM\s+", dockerfile_text(), flags=re.M | re.I)
    for part in parts[1:]:
        head = part.splitlines()[0].split()
        if len(head) >= 3 and head[-2].upper() == "AS" and head[-1] == stage:
            return part
    raise KeyError(stage)


def dockerfile_env(stage: str) -> dict[str, str]:
    """``ENV`` values set in ``stage`` or the stages it is built on."""
    stages = dockerfile_stages()
    chain = [stage]
    while stages.get(chain[-1]) in stages:
        chain.append(stages[chain[-1]])
    env: dict[str, str] = {}
    for s in reversed(chain):
        text = dockerfile_stage_text(s).replace("\\\n", " ")
        for line in re.findall(r"^ENV\s+(.*)$", text, re.M):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


# -- environment variables ---------------------------------------------------------------------
_ENV_READ = re.compile(
    r"""os\.(?:environ\.get|getenv|environ\.setdefault)\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|os\.environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\](?!\s*=[^=])"""
)


@cache
def code_env_names() -> frozenset[str]:
    """Names src/segflow reads from (or defaults into) the environment, found in the source."""
    names = set()
    for py in (ROOT / "src" / "segflow").rglob("*.py"):
        for a, b in _ENV_READ.findall(py.read_text()):
            names.add(a or b)
    return frozenset(names)


@cache
def documented_env_names() -> frozenset[str]:
    """``NAME`` variables named in the docstrings of the modules that define the env contract."""
    names = set()
    for rel in ENV_CONTRACT_MODULES:
        tree = ast.parse((ROOT / rel).read_text())
        docs = [ast.get_docstring(tree) or ""]
        docs += [
            ast.get_docstring(n) or ""
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        ]
        for doc in docs:
            names.update(re.findall(r"``([A-Z][A-Z0-9]*_[A-Z0-9_]+)``", doc))
    return frozenset(names)


@cache
def boto_env_names() -> frozenset[str]:
    """What botocore (under s3fs) reads: its session variables and the credential names."""
    from botocore import configprovider, credentials

    names = {credentials.EnvProvider.ACCESS_KEY, credentials.EnvProvider.SECRET_KEY}
    names.update(credentials.EnvProvider.TOKENS)
    for spec in configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        env = spec[1]
        names.update([env] if isinstance(env, str) else env or [])
    return frozenset(names)


def is_prefect_setting(name: str) -> bool:
    import prefect.settings

    try:
        getattr(prefect.settings, name)
    except AttributeError:
        return False
    return True


@cache
def prefect_yaml_env_names() -> frozenset[str]:
    """``{{ $NAME }}`` placeholders of prefect.yaml (read where a flow run starts)."""
    return frozenset(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", PREFECT_YAML.read_text()))


def known_env_name(name: str) -> bool:
    """A variable something in the stack reads: the code, boto, Prefect or prefect.yaml."""
    return (
        name in code_env_names()
        or name in documented_env_names()
        or name in boto_env_names()
        or name in prefect_yaml_env_names()
        or (name.startswith("PREFECT_") and is_prefect_setting(name))
    )


def parse_flags(command: str | list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` flags of a command line (bare flags -> "")."""
    words = command.split() if isinstance(command, str) else list(command)
    flags: dict[str, str] = {}
    for i, w in enumerate(words):
        if not w.startswith("--"):
            continue
        name, eq, value = w[2:].partition("=")
        if not eq:
            nxt = words[i + 1] if i + 1 < len(words) else ""
            value = "" if nxt.startswith("--") else nxt
        flags[name] = value
    return flags
