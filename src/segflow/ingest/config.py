"""Configuration of the ingest stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from segflow.config import StageConfig
from segflow.imaging import MaskPositive
from segflow.pairing import IMAGE_PATTERN_HELP, MASK_TEMPLATE_HELP, PAIRS_HELP

Layout = Literal["isic", "nerve", "luna", "folder"]
LAYOUTS: tuple[str, ...] = ("isic", "nerve", "luna", "folder")


class IngestConfig(StageConfig):
    """Everything ``segflow ingest`` takes. Fields marked runtime do not change the output."""

    layout: Layout = Field(description="isic | nerve | luna | folder")
    source: str = Field(description="URL of the raw archive (folder or s3 prefix)")
    dataset: str = Field(description="URL of the Zarr dataset to create or extend")
    masks: str | None = Field(None, description="URL of the masks when not beside the images")
    size: tuple[int, int] = Field((256, 256), description="target (H, W)")
    resize: Literal["stretch", "letterbox"] = Field("stretch", description="stretch | letterbox")
    require_masks: bool | None = Field(
        None, description="reject images without a mask; default: yes when any mask is found"
    )
    max_pixels: int = Field(
        178_956_970,
        gt=0,
        description="reject images above this many pixels, or whose decode would allocate "
        "more than 8 bytes per pixel of this limit",
    )
    mask_positive: MaskPositive = Field(
        "auto",
        description="mask foreground: ge128 (>= 128), nonzero, or auto (nonzero for label "
        "maps whose values stay below 128, else >= 128)",
    )
    allow_external_links: bool = Field(
        False,
        description="follow symbolic links that resolve outside the source (default: refuse "
        "them as unreadable; links inside the source are always followed)",
    )
    # folder layout (pairing: segflow.pairing, shared with predict and evaluate)
    image_glob: str = Field("*", description="folder layout: fnmatch of image paths")
    image_pattern: str | None = Field(None, description=f"folder layout: {IMAGE_PATTERN_HELP}")
    mask_template: str = Field(
        "{stem}_mask.png", description=f"folder layout: {MASK_TEMPLATE_HELP}"
    )
    pairs: str | None = Field(None, description=f"folder layout: {PAIRS_HELP}")
    # luna layout
    annotations: str | None = Field(None, description="luna: CSV URL (default: source/...)")
    hu_window: tuple[float, float] = Field((-1000.0, 400.0), description="luna: HU window")
    # runtime
    workers: int | None = Field(None, ge=1, description="local Dask workers (default: cores)")
    dask_address: str | None = Field(None, description="Dask scheduler address")
    batch_size: int | None = Field(
        None, ge=1, le=1024, description="images per Dask task (default: ~4 tasks per worker)"
    )
    strict: bool = Field(False, description="exit non-zero when anything was rejected")

    runtime_fields = frozenset({"storage", "workers", "dask_address", "strict", "batch_size"})

    @field_validator("size")
    @classmethod
    def _size_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8 or max(v) > 8192:
            raise ValueError(f"size must be two integers (H, W) in 8..8192, got {v}")
        return v

    @model_validator(mode="after")
    def _pairing_ok(self) -> IngestConfig:
        given = [f"--{n.replace('_', '-')}" for n in ("image_pattern", "pairs") if getattr(self, n)]
        if given and self.layout != "folder":
            raise ValueError(
                f"{' and '.join(given)} pair files of the folder layout only; "
                f"add --layout folder (got layout {self.layout})"
            )
        if len(given) == 2:
            raise ValueError("give --image-pattern (pairing by name) or --pairs (a CSV), not both")
        return self

    @field_validator("hu_window")
    @classmethod
    def _window_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] <= v[0]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {v}")
        return v
