"""Hardening of the flows: no credential ever reaches an output, and no stored task result can
run code.

The sweep runs every CLI command and every flow with a config that holds a canary secret (as
an access key, a secret key, a session token and the password of an endpoint URL) and, in
turn, each kind of invalid field, and then looks for the canary everywhere: stdout, stderr,
log records, every file written, and everything the Prefect API holds (flow and task runs with
their parameters and state messages, logs, artifacts, blocks).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client

from segflow.errors import SegflowError
from segflow.flows.ingest import ingest_flow
from segflow.flows.pipeline import pipeline_flow
from segflow.flows.segment import segment_flow
from segflow.flows.train import train_flow
from segflow.pipeline.stages import ingest_key
from segflow.storage import Store
from tests.flows.helpers import task_runs
from tests.makers import write_isic

CANARY = "CANARY-7d1e-do-not-print"
SECRETS = {
    "key": f"AKIA{CANARY}",
    "secret": CANARY,
    "token": f"tok-{CANARY}",
    "endpoint_url": f"http://minio:{CANARY}@127.0.0.1:9",
}
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# -- the sweep ------------------------------------------------------------------------------------
def _commands(tmp: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """``command -> (a config with its required options, one wrong value)``; the first key of
    each config is the one the "missing" case drops (for predict: its only input, which a
    model-level check catches)."""
    t = str(tmp)
    run_cfg = {"ingest": {"size": [16, 16]}}
    return {
        "ingest": (
            {"layout": "isic", "source": f"{t}/raw", "dataset": f"{t}/ds"},
            {"layout": "dicom"},
        ),
        "train": ({"dataset": f"{t}/ds", "models": f"{t}/m"}, {"epochs": "many"}),
        "predict": (
            {"source": f"{t}/new", "models": f"{t}/m", "out": f"{t}/o"},
            {"tta": "sideways"},
        ),
        "evaluate": ({"truth": f"{t}/new", "predictions": f"{t}/o"}, {"layout": "weird"}),
        "export-rle": ({"predictions": f"{t}/o", "out": f"{t}/rle.csv"}, {"layout": "weird"}),
        "crops": (
            {"predictions": f"{t}/o", "source": f"{t}/new", "out": f"{t}/c"},
            {"mode": "weird"},
        ),
        "serve": ({"models": f"{t}/m"}, {"port": "eighty"}),
        "run": (
            {
                "models_url": f"{t}/m",
                "flow": "pipeline",
                "dataset_source": f"{t}/raw",
                "layout": "isic",
                "source": f"{t}/new",
                "out_url": f"{t}/o",
                "config": run_cfg,
            },
            {"config": {**run_cfg, "ingest": {"size": "big"}}},
        ),
        "demo-data": ({"out": f"{t}/demo", "n": 2, "size": [16, 16]}, {"n": "many"}),
    }


NO_CONFIG = {"version"}  # commands without --config: nothing to leak


def _cases(base: dict[str, Any], wrong: dict[str, Any], command: str) -> dict[str, Any]:
    """Each kind of invalid input, as YAML text, every one holding the canary secrets."""
    secrets = {k: v for k, v in SECRETS.items()}

    def with_storage(data: dict[str, Any], storage: dict[str, Any]) -> dict[str, Any]:
        if command == "run":  # a run file's storage lives in its config section
            return {**data, "config": {**data.get("config", {}), "storage": storage}}
        return {**data, "storage": storage}

    first = next(iter(base))
    cases = {
        "missing": with_storage({k: v for k, v in base.items() if k != first}, secrets),
        "wrong value": with_storage({**base, **wrong}, secrets),
        "unknown key": with_storage({**base, "colour": "red"}, secrets),
        "misnamed secret": with_storage(base, {**secrets, "aws_secret_access_key": CANARY}),
        "bad storage field": with_storage(base, {**secrets, "anon": "maybe"}),
        "storage not a mapping": with_storage(base, CANARY),  # type: ignore[arg-type]
    }
    if command == "run":
        stage = {**base["config"], "ingest": {"size": [16, 16], "storage": secrets}}
        cases["secret in a stage section"] = {**base, "config": stage}
    texts = {name: yaml.safe_dump(data) for name, data in cases.items()}
    texts["broken yaml"] = yaml.safe_dump(with_storage(base, secrets)).replace(
        f"secret: {CANARY}", f"secret: {CANARY}: [unclosed"
    )
    return texts


def _run_cli(argv: list[str], monkeypatch) -> str:
    """``segflow <argv>`` in this process (the CLI's own ``main``); returns what it raised
    past ``main``, formatted as a traceback would be printed, or ''."""
    from segflow.cli import main

    monkeypatch.setattr(sys, "argv", ["segflow", *argv])
    try:
        main()
    except SystemExit:
        return ""
    except Exception as e:  # an unhandled error prints its traceback: it must be clean too
        return "".join(traceback.format_exception(e))
    return ""


def _direct_flow_calls(tmp: Path) -> dict[str, Any]:
    t = str(tmp)
    storage = {k: SECRETS[k] for k in ("secret", "key")}
    endpoint = {"endpoint_url": SECRETS["endpoint_url"]}
    return {
        "ingest_flow": lambda: ingest_flow(
            {"layout": "isic", "source": f"{t}/raw", "dataset": f"{t}/ds", "storage": storage}
        ),
        "train_flow": lambda: train_flow(f"{t}/raw", "isic", f"{t}/m", {"storage": storage}),
        "segment_flow": lambda: segment_flow(
            f"{t}/new", f"{t}/m", f"{t}/o", {"predict": {"storage": storage}}
        ),
        "pipeline_flow": lambda: pipeline_flow(
            f"{t}/raw",
            "isic",
            f"{t}/m",
            f"{t}/new",
            f"{t}/o",
            {"storage": endpoint, "ingest": {"size": "big"}},
        ),
        # a valid config with an endpoint password: the flow runs (and may well succeed)
        "ingest_flow, endpoint password": lambda: ingest_flow(
            {
                "layout": "isic",
                "source": f"{t}/raw",
                "dataset": f"{t}/ds2",
                "storage": endpoint,
                "size": [16, 16],
            }
        ),
    }


def _api_text() -> str:
    """Everything the Prefect API holds that a run could have written to, as JSON text."""
    parts: list[str] = []
    with get_client(sync_client=True) as client:
        for read in (client.read_flow_runs, client.read_task_runs, client.read_logs):
            offset = 0
            while batch := read(limit=200, offset=offset):
                parts += [r.model_dump_json() for r in batch]
                offset += len(batch)
        parts += [a.model_dump_json() for a in client.read_artifacts()]
        parts += [b.model_dump_json() for b in client.read_block_documents(include_secrets=True)]
    return "\n".join(parts)


def _files_text(root: Path, inputs: set[Path]) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and p not in inputs}


def test_no_secret_reaches_any_output(tmp_path, prefect_api, monkeypatch, capfd, caplog):
    from segflow.cli import app

    for var in AWS_VARS:  # `segflow run` moves secrets here; restored afterwards
        monkeypatch.delenv(var, raising=False)
    write_isic(Store(str(tmp_path / "raw")), range(2), h=16, w=16)
    write_isic(Store(str(tmp_path / "new")), range(2), h=16, w=16)
    commands = _commands(tmp_path)
    listed = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert listed == set(commands) | NO_CONFIG, "a command is missing from the sweep"

    inputs: set[Path] = set()
    ran: list[str] = []
    for command, (base, wrong) in commands.items():
        for case, text in _cases(base, wrong, command).items():
            cfg = tmp_path / "configs" / f"{command}-{case.replace(' ', '-')}.yaml"
            cfg.parent.mkdir(exist_ok=True)
            cfg.write_text(text)
            inputs.add(cfg)
            assert CANARY in text
            raised = _run_cli([command, "--config", str(cfg)], monkeypatch)
            assert CANARY not in raised, (command, case, raised)
            ran.append(f"{command} / {case}")
    for name, call in _direct_flow_calls(tmp_path).items():
        try:
            call()
            assert "endpoint password" in name, f"{name} accepted a secret"
        except SegflowError as e:
            assert CANARY not in "".join(traceback.format_exception(e)), name
        ran.append(name)

    out, err_text = capfd.readouterr()
    leaks = {
        "stdout": CANARY in out,
        "stderr": CANARY in err_text,
        "log records": CANARY in caplog.text,
        "Prefect API": CANARY in _api_text(),
    }
    files = _files_text(tmp_path, inputs)
    leaks.update({f"file {p}": True for p, data in files.items() if CANARY.encode() in data})
    assert not any(leaks.values()), {k: v for k, v in leaks.items() if v}
    assert len(ran) >= 9 * 7 + 5 and "run / secret in a stage section" in ran
    assert any("_prefect" in p for p in files)  # the flows did write (their result storage)


# -- stored results -------------------------------------------------------------------------------
class Boom:
    """Unpickling this touches a file: the proof that a stored record was decoded as a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_under_a_cache_key_is_never_loaded(local, prefect_api):
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    from segflow.ingest import IngestConfig

    src = local.store("raw")
    write_isic(src, range(2), h=16, w=16)
    config = {"layout": "isic", "source": src.url, "dataset": local.url("ds"), "size": [16, 16]}
    key = ingest_key(IngestConfig.model_validate(config))
    marker = Path(local.url("pwned"))
    record = Path(local.url("_prefect")) / key  # where the task's cache record lives
    record.parent.mkdir(parents=True)
    meta = ResultRecordMetadata(storage_key=str(record), serializer=PickleSerializer())
    record.write_bytes(ResultRecord(metadata=meta, result=Boom(marker)).serialize())

    before = task_runs()
    result = ingest_flow(config)
    (run,) = [r for i, r in task_runs().items() if i not in before]
    assert not marker.exists(), "the planted pickle was unpickled"
    assert run.state.name == "Completed" and result["n_images"] == 2  # ran again, not "Cached"
    stored = json.loads(record.read_bytes())  # and replaced the planted record with JSON
    assert stored["metadata"]["serializer"] == {"type": "segflow-manifest"}
    assert json.loads(stored["result"])["manifest"] == "DatasetManifest"

    before = task_runs()
    assert ingest_flow(config) == result
    (again,) = [r for i, r in task_runs().items() if i not in before]
    assert again.state.name == "Cached"  # a record of our own is a cache hit
