"""The configuration of the Prefect flows: one section per stage, each checked by that stage's
own config model, so a flow accepts exactly what the stage commands accept.

Only the stage-specific options live in a section; the locations and the layout come from the
flow's parameters (``dataset_source``, ``layout``, ``models_url``, ``source``, ``out_url``).
Secrets never belong here: flow parameters are stored and shown by Prefect, so credentials come
from the usual AWS variables of the process that runs the flow.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segflow.config import StageConfig, format_validation_error
from segflow.crops import CropsConfig
from segflow.errors import ConfigError
from segflow.ingest.config import IngestConfig
from segflow.predict.config import PredictConfig
from segflow.storage import SECRET_FIELDS, StorageOptions
from segflow.train.config import TrainConfig

C = TypeVar("C", bound=StageConfig)
STAGES = ("ingest", "train", "predict", "evaluate", "crops")


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

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        # a ConfigError, not a ValueError: pydantic lets it through as is, so the message is
        # never wrapped with the input it was given
        if isinstance(data, dict):
            refuse_secrets(data, sections=STAGES)
        return data

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
        fixed = {
            "layout": layout,
            "source": dataset_source,
            "dataset": self.dataset_url(models_url),
        }
        return _build(IngestConfig, self.ingest, "ingest", self.storage, fixed)

    def train_config(self, dataset_url: str, run_url: str) -> TrainConfig:
        fixed = {"dataset": dataset_url, "models": run_url}
        return _build(TrainConfig, self.train, "train", self.storage, fixed)

    def predict_config(
        self, run_url: str, source: str, out_url: str, layout: str | None = None
    ) -> PredictConfig:
        """Predict's config; the flow's ``layout`` applies unless the section sets its own."""
        section = {**_layout(layout), **self.predict}
        fixed = {"models": run_url, "source": source, "out": out_url}
        return _build(PredictConfig, section, "predict", self.storage, fixed)

    def crops_config(self, predict: PredictConfig, out_url: str) -> CropsConfig:
        """Crops of predict's output, in predict's layout and with its pairing (the same ids
        find the same images), unless the section sets its own."""
        keys = ("image_glob", "image_pattern", "pairs")
        own = any(k in self.crops for k in keys)
        chosen = predict.image_pattern or predict.pairs or predict.image_glob != "*"
        inherit = bool(chosen) and not own
        pairing = {k: getattr(predict, k) for k in keys} if inherit else {}
        section = {"layout": predict.layout, **pairing, **self.crops}
        fixed = {
            "predictions": predict.out,
            "source": predict.source,
            "out": f"{out_url.rstrip('/')}/crops",
        }
        return _build(CropsConfig, section, "crops", self.storage, fixed)

    def evaluate_layout(self, predict: PredictConfig) -> str:
        return str(self.evaluate.get("layout", predict.layout))


def refuse_secrets(data: dict[str, Any], sections: tuple[str, ...] = ()) -> None:
    """Refuse credentials in a flow's parameters, naming the fields, never their values: Prefect
    stores and shows flow parameters. A stage section may not carry storage options at all:
    they are flow-wide (``config.storage``)."""
    given = [f"storage.{k}" for k in SECRET_FIELDS if _get(data, "storage", k) is not None]
    given += [
        f"{s}.storage" for s in sections if isinstance(data.get(s), dict) and "storage" in data[s]
    ]
    if given:
        env = " / ".join(SECRET_FIELDS.values())
        raise ConfigError(
            f"config.{', config.'.join(given)} given in a flow config: flow parameters are "
            "stored and shown by Prefect, so storage options belong in config.storage "
            f"(endpoint_url, region...) and credentials in {env} of the process that runs "
            "the flow; remove them"
        )


def _layout(layout: str | None) -> dict[str, Any]:
    return {} if layout is None else {"layout": layout}


def _get(data: dict[str, Any], *path: str) -> Any:
    for name in path:
        if not isinstance(data, dict):
            return None
        data = data.get(name)  # type: ignore[assignment]
    return data


def _build(
    model: type[C],
    section: dict[str, Any],
    name: str,
    storage: StorageOptions,
    fixed: dict[str, Any],
) -> C:
    clash = sorted(set(section) & set(fixed))
    if clash:
        raise ConfigError(
            f"config.{name} sets {clash}, which the flow's parameters decide; remove them "
            f"from the {name!r} section"
        )
    try:
        return model.model_validate({**section, **fixed, "storage": storage})
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"config.{name}", e)) from None
