"""Configuration of the prediction stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from segflow.config import StageConfig
from segflow.pairing import IMAGE_PATTERN_HELP, PAIRS_HELP


class PredictConfig(StageConfig):
    """Everything ``segflow predict`` takes."""

    models: str = Field(description="URL of the trained models (segflow train)")
    out: str = Field(description="URL to write masks (and probabilities) to")
    dataset: str | None = Field(None, description="predict every row of this Zarr dataset")
    source: str | None = Field(None, description="or: predict raw files from this URL")
    layout: Literal["isic", "nerve", "folder"] = Field(
        "folder",
        description="isic | nerve | folder; isic names the masks <id>_segmentation.png, the "
        "others <id>.png (recorded in predictions.json for crops, evaluate, export-rle)",
    )
    image_glob: str = Field("*", description="folder layout: which files are images")
    image_pattern: str | None = Field(None, description=IMAGE_PATTERN_HELP)
    pairs: str | None = Field(None, description=f"{PAIRS_HELP}; only its image column is read")
    folds: str = Field("all", description="'all' or a list like '0,2'")
    tta: Literal["d4", "flips", "none"] = Field("flips", description="d4 | flips | none")
    threshold: Literal["auto"] | float = Field("auto", description="'auto' (out-of-fold) or 0..1")
    postprocess: Literal["auto", "none", "lcc", "lcc_fill"] = Field(
        "auto", description="auto | none | lcc | lcc_fill"
    )
    save_probabilities: bool = Field(False, description="also write probabilities")
    max_pixels: int = Field(178_956_970, gt=0)
    # runtime
    executor: Literal["ray", "inline"] = Field("ray", description="ray | inline")
    ray_address: str | None = Field(None, description="Ray cluster address")
    gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per worker (default: 1 with GPUs, else 0)"
    )
    workers: int | None = Field(None, ge=1, description="predictor actors (default: GPUs or 1)")
    batch_size: int = Field(8, ge=1, description="images per model batch")
    shard_size: int = Field(256, ge=1, description="inputs per resumable shard")
    io_threads: int | None = Field(None, ge=1, description="decode/write threads per worker")

    runtime_fields = frozenset(
        {
            "storage",
            "executor",
            "ray_address",
            "gpus_per_worker",
            "workers",
            "batch_size",
            "io_threads",
        }
    )

    @model_validator(mode="after")
    def _one_input(self) -> PredictConfig:
        if (self.dataset is None) == (self.source is None):
            raise ValueError(
                "give exactly one input: --dataset URL (an ingested dataset) or --source URL "
                f"(raw files); got dataset={self.dataset!r} source={self.source!r}"
            )
        if (self.image_pattern or self.pairs) and not self.source:
            raise ValueError("--image-pattern and --pairs choose files of --source; give --source")
        if self.image_pattern and self.pairs:
            raise ValueError("give --image-pattern (pairing by name) or --pairs (a CSV), not both")
        return self

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_ok(cls, v: object) -> object:
        if v == "auto":
            return v
        try:
            t = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"threshold must be 'auto' or a number, got {v!r}") from None
        if not 0 < t < 1:
            raise ValueError(f"threshold must be in (0, 1), got {t}")
        return t

    @field_validator("folds")
    @classmethod
    def _folds_ok(cls, v: str) -> str:
        if v != "all" and not all(x.strip().isdigit() for x in v.split(",")):
            raise ValueError(f"folds must be 'all' or comma-separated fold numbers, got {v!r}")
        return v

    def fold_list(self) -> list[int] | None:
        return None if self.folds == "all" else [int(x) for x in self.folds.split(",")]
