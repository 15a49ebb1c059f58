"""deployments/prefect.yaml: every deployment points at a real flow with parameters it accepts,
the schedules and pools are what the docs say, and each ``config`` uses only the flow
contract's keys with real stage-config fields. The slow test registers them on a real server."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prefect import Flow

from tests import repo_files as rf

#: the keys of a flow's ``config`` (the fixed contract of train_flow / segment_flow / pipeline)
CONFIG_KEYS = {
    "dataset",
    "storage",
    "ingest",
    "train",
    "predict",
    "truth",
    "evaluate",
    "crops",
    "version",
}
#: stage-config fields a config section may not set: the flow's parameters decide them
DECIDED_BY_PARAMETERS = {
    "ingest": {"layout", "source", "dataset"},
    "train": {"dataset", "models"},
    "predict": {"models", "out", "source"},
    "crops": {"predictions", "source", "out"},
}
DOCS_WITH_COMMANDS = (
    "deployments/prefect.yaml",
    "README.md",
    "docs/cluster.md",
    "infra/docker-compose.yml",
    "infra/k8s/README.md",
)


def deployments() -> list[dict[str, Any]]:
    return rf.prefect_yaml()["deployments"]


def deployment(name: str) -> dict[str, Any]:
    (d,) = [d for d in deployments() if d["name"] == name]
    return d


def load_flow(entrypoint: str) -> Flow:
    """A module-path entrypoint (``segflow.flows.x.fn``, no file path: a flow run imports it
    from the installed package, so it works from a wheel without a checkout)."""
    assert ":" not in entrypoint and not entrypoint.endswith(".py"), f"{entrypoint}: a file path"
    module_name, _, func = entrypoint.rpartition(".")
    assert module_name.startswith("segflow.flows."), f"{entrypoint} is outside segflow.flows"
    obj = getattr(importlib.import_module(module_name), func)
    assert isinstance(obj, Flow), f"{entrypoint} is not a Prefect flow"
    return obj


@pytest.fixture(scope="module")
def flows() -> dict[str, Flow]:
    """Each deployment's flow, imported once (this import is most of this module's time)."""
    return {d["name"]: load_flow(d["entrypoint"]) for d in deployments()}


def pools_created_in_header() -> dict[str, str]:
    """``{pool: type}`` from the ``prefect work-pool create`` commands atop prefect.yaml."""
    return dict(
        re.findall(r"prefect work-pool create (\S+) --type (\S+)", rf.PREFECT_YAML.read_text())
    )


# -- the file ----------------------------------------------------------------------------------
def test_prefect_yaml_is_valid_for_prefect() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(rf.prefect_yaml())
    assert len(model.deployments) == len(deployments())
    assert rf.prefect_yaml()["prefect-version"] == rf.lock_pins()["prefect"]
    names = [d["name"] for d in deployments()]
    assert len(names) == len(set(names)), "deployment names must be unique"
    assert {"ingest", "retrain", "bulk-segment"} <= set(names)


def test_pull_step_runs_flows_from_segflow_home() -> None:
    (step,) = rf.prefect_yaml()["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ $SEGFLOW_HOME }}"
    assert "SEGFLOW_HOME" in rf.prefect_yaml_env_names()


# -- entrypoints and parameters ----------------------------------------------------------------
def test_every_entrypoint_is_a_prefect_flow(flows: dict[str, Flow]) -> None:
    assert set(flows) == {d["name"] for d in deployments()}
    assert flows["retrain"].name == "train"
    assert flows["bulk-segment"].name == "segment"


def test_parameters_fit_the_flow_signature(flows: dict[str, Flow]) -> None:
    for d in deployments():
        sig = inspect.signature(flows[d["name"]].fn).parameters
        given = set(d.get("parameters") or {})
        assert given <= set(sig), f"{d['name']}: {sorted(given - set(sig))} not in the signature"
        required = {n for n, p in sig.items() if p.default is inspect.Parameter.empty}
        # a scheduled or parameter-less run must be able to start
        assert required <= given, f"{d['name']} lacks required parameters {required - given}"


def test_config_keys_are_the_flow_contract() -> None:
    for d in deployments():
        config = (d.get("parameters") or {}).get("config")
        if d["entrypoint"].startswith("segflow.flows.ingest."):
            continue  # ingest_flow's config is an IngestConfig, not the flow contract
        assert config, f"{d['name']} has no config"
        unknown = set(config) - CONFIG_KEYS
        assert not unknown, f"{d['name']}: config keys {sorted(unknown)} are not in the contract"


def test_config_sections_are_valid_stage_configs() -> None:
    from segflow.crops import CropsConfig
    from segflow.ingest.config import IngestConfig
    from segflow.predict.config import PredictConfig
    from segflow.storage import StorageOptions
    from segflow.train.config import TrainConfig

    checked = set()
    for d in deployments():
        if d["entrypoint"].startswith("segflow.flows.ingest."):
            IngestConfig.model_validate(d["parameters"]["config"])
            continue
        params = d["parameters"]
        config = params["config"]
        for section, fixed in DECIDED_BY_PARAMETERS.items():
            clash = set(config.get(section, {})) & fixed
            assert not clash, f"{d['name']}: config.{section} sets {clash}"
        if "ingest" in config:
            IngestConfig.model_validate(
                {**config["ingest"], "layout": params["layout"], "source": "s", "dataset": "d"}
            )
        if "train" in config:
            TrainConfig.model_validate({**config["train"], "dataset": "d", "models": "m"})
        if "predict" in config:
            PredictConfig.model_validate(
                {**config["predict"], "models": "m", "out": "o", "source": "s"}
            )
        if "crops" in config:
            CropsConfig.model_validate(
                {**config["crops"], "predictions": "p", "source": "s", "out": "o"}
            )
        if "evaluate" in config:
            assert set(config["evaluate"]) <= {"layout"}
        if "storage" in config:
            assert set(config["storage"]) <= {"endpoint_url", "region"}, "secrets come from env"
            StorageOptions.model_validate(config["storage"])
        for key in ("dataset", "truth", "version"):
            assert isinstance(config.get(key, ""), str), f"{d['name']}: config.{key}"
        checked |= set(config)
    assert {"train", "predict", "crops"} <= checked


def test_parameters_hold_no_secrets() -> None:
    for d in deployments():
        for node in rf.walk(d.get("parameters")):
            if isinstance(node, dict):
                bad = [k for k in node if re.search(r"key|secret|token|password", k, re.I)]
                assert not bad, f"{d['name']}: {bad} in parameters; credentials come from env"


def test_cluster_and_local_twins_differ_only_in_place() -> None:
    for name in ("retrain", "bulk-segment"):
        cluster, local = deployment(name), deployment(f"{name}-local")
        assert cluster["entrypoint"] == local["entrypoint"]
        assert set(cluster["parameters"]) == set(local["parameters"])
        assert rf.s3_buckets(cluster["parameters"]), f"{name} should use the object store"
        assert not rf.s3_buckets(local["parameters"]), f"{name}-local uses local folders"


# -- schedules and pools -----------------------------------------------------------------------
def test_retrain_runs_weekly_with_a_timezone() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    (schedule,) = deployment("retrain")["schedules"]
    assert schedule.get("active", True) is True
    assert schedule.get("timezone"), "a cron without a timezone runs in UTC"
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    _minute, _hour, dom, month, dow = cron.cron.split()
    assert (dom, month) == ("*", "*") and dow.isdigit(), f"not weekly: {cron.cron}"


def test_bulk_segment_runs_on_demand_only() -> None:
    for name in ("bulk-segment", "bulk-segment-local"):
        assert not deployment(name).get("schedules"), f"{name} must have no schedule"
        assert not deployment(name).get("schedule")


def test_both_pool_types_are_created_and_used() -> None:
    created = pools_created_in_header()
    assert set(created.values()) >= {"process", "kubernetes"}
    for d in deployments():
        assert d["work_pool"]["name"] in created, f"{d['name']}: pool never created"
    used_types = {created[d["work_pool"]["name"]] for d in deployments()}
    assert used_types == {"process", "kubernetes"}
    assert created[deployment("retrain")["work_pool"]["name"]] == "kubernetes"
    text = rf.PREFECT_YAML.read_text()
    assert "--base-job-template infra/k8s/base-job-template.json" in text
    assert rf.BASE_JOB_TEMPLATE.is_file()


def test_job_variables_fit_their_pool_template() -> None:
    from prefect.workers.process import ProcessWorker

    templates = {
        "process": ProcessWorker.get_default_base_job_template(),
        "kubernetes": rf.base_job_template(),
    }
    created = pools_created_in_header()
    for d in deployments():
        template = templates[created[d["work_pool"]["name"]]]
        allowed = set(template["variables"]["properties"])
        extra = set(d["work_pool"].get("job_variables") or {}) - allowed
        assert not extra, f"{d['name']}: job variables {extra} unknown to its pool"


# -- the commands in the docs ------------------------------------------------------------------
def test_documented_commands_name_real_deployments_pools_and_parameters(
    flows: dict[str, Flow],
) -> None:
    by_full_name = {f"{flows[d['name']].name}/{d['name']}": d for d in deployments()}
    pools = {d["work_pool"]["name"] for d in deployments()}
    runs = 0
    for rel in DOCS_WITH_COMMANDS:
        text = (rf.ROOT / rel).read_text().replace("\\\n", " ")
        for line in re.findall(r"prefect deployment run[^\n]*", text):
            target = line.split()[3].strip("'\"")
            assert target in by_full_name, f"{rel}: `{line}` names no deployment"
            sig = inspect.signature(flows[by_full_name[target]["name"]].fn).parameters
            for param in re.findall(r"--param (\w+)=", line):
                assert param in sig, f"{rel}: `{line}`: {target} has no parameter {param}"
            runs += 1
        for pool in re.findall(r"prefect worker start --pool '?(\w[\w-]*)", text):
            assert pool in pools, f"{rel}: worker for unknown pool {pool}"
    assert runs >= 3
    for rel in ("README.md", "deployments/prefect.yaml"):
        words = " ".join((rf.ROOT / rel).read_text().replace("`", " ").split())
        assert "prefect deploy --all --prefect-file deployments/prefect.yaml" in words, rel


def test_documented_deploy_commands_are_plain_prefect_deploy() -> None:
    """Every documented registration is ``prefect deploy`` itself on prefect.yaml: ``--all``, or
    ``-n`` with deployments of the pool ``cluster`` (where only that pool exists)."""
    names = {d["name"]: d["work_pool"]["name"] for d in deployments()}
    commands = 0
    for rel in DOCS_WITH_COMMANDS:
        text = (rf.ROOT / rel).read_text().replace("\\\n", " ").replace("#", " ")
        assert "deploy.py" not in text, f"{rel} still names the removed deployments/deploy.py"
        for line in re.findall(r"prefect deploy -[^\n`]*", text):  # commands, not prose
            args = " ".join(line.split()[2:])
            assert "--prefect-file deployments/prefect.yaml" in args, f"{rel}: `{line}`"
            picked = re.findall(r"(?:-n|--name) (\S+)", args)
            assert ("--all" in args.split()) != bool(picked), f"{rel}: `{line}`: --all or -n"
            for name in picked:
                assert names.get(name) == "cluster", f"{rel}: `{line}`: {name} is no cluster one"
            commands += 1
    assert commands >= 4


def test_fastapi_pin_takes_the_prefect_clients_nulls() -> None:
    """FastAPI 0.151+ answers the client's explicit ``"limit": null`` with a 422 (``prefect
    deploy`` dies after the first deployment); 0.155+ breaks the server's start (``min_items``).
    scripts/check_prefect_server.sh proves it against a running server."""
    pin = tuple(int(x) for x in rf.lock_pins()["fastapi"].split("."))
    assert (0, 139) <= pin < (0, 151), f"fastapi=={rf.lock_pins()['fastapi']}"
    text = (rf.ROOT / "scripts" / "check_prefect_server.sh").read_text()
    assert '{"sort": null, "limit": null, "offset": null}' in text


# -- for real: register everything on a Prefect server -----------------------------------------
@pytest.mark.slow
def test_deploy_registers_every_deployment(tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        with get_client(sync_client=True) as client:
            for pool, kind in pools_created_in_header().items():
                template = rf.base_job_template() if kind == "kubernetes" else None
                client.create_work_pool(
                    WorkPoolCreate(name=pool, type=kind, base_job_template=template or {})
                )
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        env["PREFECT_HOME"] = str(tmp_path)
        prefect = Path(sys.executable).parent / "prefect"  # the CLI of this environment
        run = subprocess.run(
            [
                str(prefect),
                "deploy",
                "--all",
                "--prefect-file",
                "deployments/prefect.yaml",
            ],
            cwd=rf.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        with get_client(sync_client=True) as client:
            for d in deployments():
                flow_name = load_flow(d["entrypoint"]).name
                got = client.read_deployment_by_name(f"{flow_name}/{d['name']}")
                assert got.work_pool_name == d["work_pool"]["name"]
                assert got.parameters == (d.get("parameters") or {})
                got_schedules = [
                    (s.schedule.cron, s.schedule.timezone, s.active) for s in got.schedules
                ]
                want = [
                    (s["cron"], s["timezone"], s.get("active", True))
                    for s in d.get("schedules", [])
                ]
                assert got_schedules == want
