"""``segflow run --config pipeline.yaml``: run one of the Prefect flows from a YAML file.

The file holds the flow's parameters at the top level and its ``config`` section::

    flow: pipeline            # pipeline | train | segment
    dataset_source: data/raw  # train, pipeline
    layout: isic              # train, pipeline
    models_url: s3://bucket/models
    source: data/new          # segment, pipeline
    out_url: s3://bucket/out  # segment, pipeline
    config: {train: {folds: 5, epochs: 30}, predict: {tta: flips}}

Without ``PREFECT_API_URL`` the run uses Prefect's local (ephemeral) API. Storage credentials
in the file's ``config.storage`` are moved into the AWS variables of this process, never into
the flow's parameters (which Prefect stores and shows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from segflow.config import format_validation_error, read_yaml
from segflow.errors import ConfigError
from segflow.pipeline.config import FlowConfig
from segflow.storage import SECRET_FIELDS

REQUIRED = {
    "train": ("dataset_source", "layout", "models_url"),
    "segment": ("source", "models_url", "out_url"),
    "pipeline": ("dataset_source", "layout", "models_url", "source", "out_url"),
}
OPTIONAL = {"segment": ("layout",)}  # passed on only when given


class RunSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    flow: Literal["pipeline", "train", "segment"] = "pipeline"
    dataset_source: str | None = None
    layout: str | None = None
    models_url: str | None = None
    source: str | None = None
    out_url: str | None = None
    config: dict[str, Any] = {}

    def parameters(self) -> dict[str, Any]:
        missing = [k for k in REQUIRED[self.flow] if getattr(self, k) is None]
        if missing:
            raise ConfigError(
                f"flow {self.flow!r} needs {', '.join(missing)} in the run file "
                f"(it takes {', '.join(REQUIRED[self.flow])} and config)"
            )
        given = [k for k in OPTIONAL.get(self.flow, ()) if getattr(self, k) is not None]
        names = (*REQUIRED[self.flow], *given)
        return {**{k: getattr(self, k) for k in names}, "config": self.config}


def load_spec(path: str | Path, flow: str | None = None) -> RunSpec:
    data = read_yaml(path)
    if flow:
        data["flow"] = flow
    config = data.get("config") or {}
    data["config"] = _secrets_to_env(dict(config)) if isinstance(config, dict) else config
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"run file {path}", e)) from None
    FlowConfig.parse(spec.config)  # refused here, before Prefect records any parameter
    return spec


def _secrets_to_env(config: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(config.get("storage") or {}, dict):
        return config  # refused, without its value, by FlowConfig
    storage = dict(config.get("storage") or {})
    for field, var in SECRET_FIELDS.items():
        if field in storage:
            os.environ[var] = str(storage.pop(field))
    if storage or "storage" in config:
        config["storage"] = storage
    return config


def run_flow(spec: RunSpec) -> dict[str, Any]:
    """Run the flow in this process (Prefect records it through its API). The flows ship in
    the installed package as ``segflow.flows`` (pyproject.toml maps ``flows/`` there)."""
    if spec.flow == "train":
        from segflow.flows.train import train_flow as fn
    elif spec.flow == "segment":
        from segflow.flows.segment import segment_flow as fn
    else:
        from segflow.flows.pipeline import pipeline_flow as fn
    return fn(**spec.parameters())
