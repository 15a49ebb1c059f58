"""The distribution: flows/ and tasks/ ship inside the package as ``segflow.flows`` and
``segflow.tasks``, so an installed wheel runs ``segflow run`` and the deployments' entrypoints from
any folder, without a checkout on ``sys.path``. The slow test builds the wheel, installs it into
a fresh virtual environment and runs both from outside the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests import repo_files as rf

PYPROJECT = tomllib.loads((rf.ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
#: edits of the import path; library code imports through the installed package instead
SYS_PATH_EDIT = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*[+]?=|addsitedir\(")


def code_folders() -> set[str]:
    """``segflow.<sub>`` for every folder of src/segflow that holds Python files."""
    src = rf.ROOT / "src"
    return {
        ".".join(p.parent.relative_to(src).parts)
        for p in (src / "segflow").rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_flows_and_tasks_ship_inside_the_package() -> None:
    dirs = SETUPTOOLS["package-dir"]
    assert dirs == {"": "src", "segflow.flows": "flows", "segflow.tasks": "tasks"}
    packages = set(SETUPTOOLS["packages"])
    missing = code_folders() - packages
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"
    assert {"segflow.flows", "segflow.tasks"} <= packages
    for pkg in packages - {"segflow.flows", "segflow.tasks"}:
        assert (rf.ROOT / "src" / pkg.replace(".", "/")).is_dir(), f"{pkg}: no such folder"


def test_code_imports_flows_and_tasks_through_the_package() -> None:
    old = re.compile(r"^\s*(from|import)\s+(flows|tasks)\b", re.M)
    offenders = []
    for folder in ("src", "flows", "tasks", "tests", "benchmarks", "scripts"):
        for path in (rf.ROOT / folder).rglob("*.py"):
            if old.search(path.read_text()):
                offenders.append(str(path.relative_to(rf.ROOT)))
    assert not offenders, f"import segflow.flows / segflow.tasks instead: {offenders}"


def test_library_code_never_edits_sys_path() -> None:
    offenders = [
        f"{path.relative_to(rf.ROOT)}: {m.group(0)}"
        for folder in ("src", "flows", "tasks")
        for path in (rf.ROOT / folder).rglob("*.py")
        for m in SYS_PATH_EDIT.finditer(path.read_text())
    ]
    assert not offenders, offenders


# -- for real: the wheel, in a fresh environment, outside the checkout ---------------------------
def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would import the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PREFECT_"))}
    env.pop("RAY_ADDRESS", None)
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def build_wheel(dest: Path) -> Path:
    """``pip wheel`` on a copy of the distribution's sources (no build files in the checkout)."""
    src = dest / "sdist"
    for rel in ("pyproject.toml", "README.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rf.ROOT / rel, src / rel)
    for rel in ("src", "flows", "tasks"):
        shutil.copytree(rf.ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run([*cmd, "-w", str(dest / "dist"), str(src)], dest, _clean_env())
    (wheel,) = (dest / "dist").glob("segflow-*.whl")
    return wheel


def fresh_venv(where: Path) -> Path:
    """A new virtual environment whose only package is what gets installed into it. Its
    dependencies (torch, Ray, Prefect: gigabytes) come from this test's environment through a
    .pth line, which Python appends *after* the new env's own site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    (site,) = where.glob("lib/python3.*/site-packages")
    import prefect

    deps = Path(prefect.__file__).resolve().parents[1]
    (site / "_deps.pth").write_text(f"{deps}\n")
    return where / "bin" / "python"


@pytest.mark.slow
def test_wheel_runs_flows_and_resolves_deployments_outside_the_checkout(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    wheel = build_wheel(tmp_path / "build")
    names = {n.split("/")[1] for n in _wheel_names(wheel) if n.startswith("segflow/")}
    assert {"flows", "tasks", "cli.py"} <= names
    python = fresh_venv(tmp_path / "venv")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = _clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        outside,
        env,
    )
    where = _run(
        [str(python), "-c", "import segflow.flows.train as m; print(m.__file__)"], outside, env
    )
    assert Path(where.strip()).is_relative_to(tmp_path / "venv"), where
    segflow = str(python.parent / "segflow")

    # `segflow run` on a tiny pipeline, from a folder that is not the checkout
    _run([segflow, "demo-data", "--out", "raw", "--n", "6", "--size", "32", "32"], outside, env)
    _run(
        [segflow, "demo-data", "--out", "new", "--n", "2", "--size", "32", "32", "--seed", "1"],
        outside,
        env,
    )
    (outside / "run.yaml").write_text(
        "flow: pipeline\ndataset_source: raw\nlayout: isic\nmodels_url: models\n"
        "source: new\nout_url: out\nconfig:\n"
        "  ingest: {size: [32, 32]}\n"
        "  train: {folds: 2, epochs: 1, batch_size: 4, encoder: resnet18, encoder_depth: 3,\n"
        "          decoder_channels: [32, 16, 8], early_stopping: null}\n"
        "  predict: {layout: isic, tta: none, executor: inline}\n"
        "  crops: {mode: masked}\n"
    )
    out = _run([segflow, "run", "--config", "run.yaml", "--json"], outside, env, timeout=900)
    result = json.loads(out[out.index("{") :])
    assert result["train"]["version"] and result["segment"]["predictions"]
    assert len(list((outside / "out" / "masks").glob("*.png"))) == 2

    # `prefect deploy` on deployments/prefect.yaml, entrypoints imported from the wheel
    (outside / "deployments").mkdir()
    shutil.copy(rf.PREFECT_YAML, outside / "deployments" / "prefect.yaml")
    entrypoints = {d["entrypoint"] for d in rf.prefect_yaml()["deployments"]}
    load = (
        "import sys\nfrom prefect.flows import load_flow_from_entrypoint as load\n"
        "for e in sys.argv[1:]:\n"
        "    f = load(e, use_placeholder_flow=False)\n"
        "    print(e, f.name, sys.modules[f.fn.__module__].__file__)\n"
    )
    loaded = _run([str(python), "-c", load, *sorted(entrypoints)], outside, env).splitlines()
    assert len(loaded) == len(entrypoints)
    for line in loaded:
        assert Path(line.split()[-1]).is_relative_to(tmp_path / "venv"), line
    with prefect_test_harness(server_startup_timeout=180):
        with get_client(sync_client=True) as client:
            for pool, kind in re.findall(
                r"prefect work-pool create (\S+) --type (\S+)", rf.PREFECT_YAML.read_text()
            ):
                template = rf.base_job_template() if kind == "kubernetes" else {}
                client.create_work_pool(
                    WorkPoolCreate(name=pool, type=kind, base_job_template=template)
                )
        api = {"PREFECT_API_URL": PREFECT_API_URL.value()}
        deploy = [str(python), "-m", "prefect", "--no-prompt", "deploy", "--all"]
        _run([*deploy, "--prefect-file", "deployments/prefect.yaml"], outside, {**env, **api})
        with get_client(sync_client=True) as client:
            got = {d.name: d.entrypoint for d in client.read_deployments()}
    want = {d["name"]: d["entrypoint"] for d in rf.prefect_yaml()["deployments"]}
    assert got == want


def _wheel_names(wheel: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        return z.namelist()
