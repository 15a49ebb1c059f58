"""Configuration of the model server (``segflow serve``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from segflow.config import StageConfig

# A request holds its image, its full-size float32 probabilities and its mask at once (~8 bytes
# a pixel): 40 MP is ~0.3 GB per request in flight and still covers dermoscopy photographs
# (ISIC's are at most a few tens of MP). The batch predictor keeps Pillow's own bomb limit.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ServeConfig(StageConfig):
    """Everything ``segflow serve`` takes."""

    models: str = Field(description="URL of the trained models (segflow train / train_flow)")
    version: str | None = Field(
        None,
        description="model version: id, production, previous or latest (default: production, "
        "else latest)",
    )
    tta: Literal["d4", "flips", "none"] = Field("flips", description="d4 | flips | none")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="larger images get 413")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="larger bodies get 413")
    # runtime
    ray_address: str | None = Field(None, description="Ray cluster address")
    replicas: int = Field(1, ge=1, description="model replicas (Ray Serve deployment)")
    gpus_per_replica: float | None = Field(
        None, ge=0, description="GPUs per replica (default: 1 with GPUs, else 0)"
    )
    cpus_per_replica: int | None = Field(
        None, ge=1, description="default: the cluster's CPUs shared out among the replicas"
    )
