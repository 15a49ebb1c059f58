"""The configuration of the Prefect flows: one section per stage, each checked by that stage's
own config model, so a flow accepts exactly what the stage commands accept.

Only the stage-specific options live in a section; the locations come from the flow's
parameters (``dataset_source``, ``models_url``, ``source``, ``out_url``). Secrets never belong
here: flow parameters are stored and shown by Prefect, so credentials come from the usual
AWS variables of the process that runs the flow.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segflow.config import format_validation_error
from segflow.crops import CropsConfig
from segflow.errors import ConfigError
from segflow.ingest.config import IngestConfig
from segflow.predict.config import PredictConfig
from segflow.storage import StorageOptions
from segflow.train.config import TrainConfig

_SECRETS = ("key", "secret", "token")


class FlowConfig(BaseModel):
    """``config`` of train_flow / segment_flow / pipeline_flow (every key optional)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str | None = Field(None, description="Zarr dataset URL (default: models/dataset.zarr)")
    storage: StorageOptions = StorageOptions()
    ingest: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    predict: dict[str, Any] = Field(default_factory=dict)
    truth: str | None = Field(None, description="ground-truth masks: evaluate runs when given")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="{layout: isic|folder}")
    crops: dict[str, Any] = Field(default_factory=dict)
    version: str | None = Field(
        None, description="segment_flow: model version (default production, else latest)"
    )
    gate: dict[str, Any] = Field(default_factory=dict, description="segflow.gate.GateConfig")

    @model_validator(mode="after")
    def _no_secrets(self) -> FlowConfig:
        leaked = [k for k in _SECRETS if getattr(self.storage, k) is not None]
        if leaked:
            raise ValueError(
                f"storage.{leaked[0]} given in a flow config: flow parameters are stored and "
                "shown by Prefect, so credentials must come from AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the worker's environment"
            )
        return self

    @classmethod
    def parse(cls, data: dict[str, Any] | None) -> FlowConfig:
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error("flow config", e)) from None

    # -- one stage config per section ---------------------------------------------------------
    def dataset_url(self, models_url: str) -> str:
        return self.dataset or f"{models_url.rstrip('/')}/dataset.zarr"

    def ingest_config(self, dataset_source: str, layout: str, models_url: str) -> IngestConfig:
        return _build(
            IngestConfig, self.ingest, "ingest", layout=layout, source=dataset_source,
            dataset=self.dataset_url(models_url), storage=self.storage,
        )  # fmt: skip

    def train_config(self, dataset_url: str, run_url: str) -> TrainConfig:
        return _build(
            TrainConfig, self.train, "train", dataset=dataset_url, models=run_url,
            storage=self.storage,
        )  # fmt: skip

    def predict_config(self, run_url: str, source: str, out_url: str) -> PredictConfig:
        return _build(
            PredictConfig, self.predict, "predict", models=run_url, source=source,
            out=out_url, storage=self.storage,
        )  # fmt: skip

    def crops_config(self, predictions: str, source: str, out_url: str) -> CropsConfig:
        layout = self.crops.get("layout", self.predict.get("layout", "isic"))
        return _build(
            CropsConfig, {"layout": layout, **self.crops}, "crops", predictions=predictions,
            source=source, out=f"{out_url.rstrip('/')}/crops", storage=self.storage,
        )  # fmt: skip

    def evaluate_layout(self) -> str:
        return str(self.evaluate.get("layout", self.predict.get("layout", "isic")))


def _build(model: type, section: dict[str, Any], name: str, **fixed: Any):
    clash = sorted(set(section) & (set(fixed) - {"storage"}))
    if clash:
        raise ConfigError(
            f"config.{name} sets {clash}, which the flow's parameters decide; remove them "
            f"from the {name!r} section"
        )
    try:
        return model.model_validate({**section, **fixed})
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"config.{name}", e)) from None
