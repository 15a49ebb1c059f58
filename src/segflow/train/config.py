"""Configuration of the training stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from segflow.config import StageConfig
from segflow.errors import ConfigError

Loss = Literal["dice", "bce", "bce_dice", "focal", "jaccard"]
LOSSES: tuple[str, ...] = ("dice", "bce", "bce_dice", "focal", "jaccard")


class TrainConfig(StageConfig):
    """Everything ``segflow train`` takes."""

    dataset: str = Field(description="URL of the Zarr dataset (segflow ingest)")
    models: str = Field(description="URL of the models location (splits, folds, checkpoints)")
    folds: int = Field(5, ge=2, le=20, description="K of the K-fold split")
    fold_ids: list[int] | None = Field(
        None, description="train only these folds, e.g. 0,3 (default: all)"
    )
    seed: int = Field(42, description="seed of split, init and augmentation")
    # model
    arch: str = Field("Unet", validate_default=True, description="smp architecture (Unet, FPN...)")
    # Lite0 with its packaged ImageNet weights: the encoder that trains best per second on a
    # CPU, and pretrained without a download (docs: README "Training defaults")
    encoder: str = Field("timm-tf_efficientnet_lite0", description="smp encoder (resnet34...)")
    encoder_weights: str | None = Field(
        "auto",
        validate_default=True,
        description="state-dict file/URL, a named source (efficientnet-lite0-imagenet), or "
        "auto: the packaged weights of the encoder when there are some, else random",
    )
    encoder_depth: int = Field(5, ge=3, le=5)
    decoder_channels: list[int] | None = None
    size: tuple[int, int] | None = Field(
        None, description="input H W (default: from the dataset's fingerprint, train/plan.py)"
    )
    # optimisation
    epochs: int = Field(30, ge=1, description="epochs")
    batch_size: int = Field(16, ge=1, description="batch size")
    loss: Loss = Field("bce_dice", description="dice | bce | bce_dice | focal | jaccard")
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["plateau", "cosine"] = "plateau"
    plateau_patience: int = Field(3, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    min_lr: float = Field(1e-7, ge=0)
    early_stopping: int | None = Field(10, ge=1, description="patience in epochs; null: off")
    grad_clip: float | None = Field(1.0, gt=0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    augment: dict[str, Any] = Field(default_factory=dict, description="AugmentConfig fields")
    monitor: Literal["dice", "jaccard", "thresholded_jaccard", "loss"] = "dice"
    threshold: float = Field(0.5, gt=0, lt=1)
    # warm start (segflow.train.warmstart)
    init_from: str = Field(
        "none", min_length=1, description="production | <version id> | run-folder URL | none"
    )
    init_models: str | None = Field(None, description="models URL whose versions/ it names")
    init_lr_scale: float = Field(
        0.1,
        gt=0,
        le=1,
        description="learning-rate multiplier for a warm start (init_from): at the cold rate "
        "the first epoch undoes much of the trained network (docs/results.md)",
    )
    # planning to a deadline (segflow.train.plan)
    time_budget: str | None = Field(
        None,
        description="train within this wall time (e.g. 30m, 2h, 900s): plans encoder, size, "
        "batch and epochs to it and stops in time (default: fixed epochs, early stopping)",
    )
    min_epochs: int = Field(8, ge=1, description="with --time-budget: epochs a plan must fit")
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="keep an exponential moving average of the weights with this decay per "
        "step (e.g. 0.99): validation, best.pt and the ensemble use the average; 0: none "
        "(default: none, or 0.99 when a --time-budget plan takes 500+ steps)",
    )
    plan: dict[str, Any] | None = None  # written by the planner: the plan and what it measured
    deadline: float | None = None  # unix time by which the whole training must be done
    # runtime
    executor: Literal["ray", "inline"] = Field(
        "ray", description="ray | inline (inline: folds in-process)"
    )
    ray_address: str | None = Field(None, description="Ray cluster (auto, ray://...)")
    gpus_per_fold: float | None = Field(
        None, ge=0, description="GPUs per fold (default: 1 with GPUs, else 0)"
    )
    cpus_per_fold: int | None = Field(None, ge=1, description="CPU threads per fold")
    max_retries: int = Field(1, ge=0)
    prefetch: int = Field(4, ge=1, description="batches read ahead")
    cache_mb: int = Field(2048, ge=0, description="hold a fold's data in RAM below this")
    overwrite: bool = Field(
        False,
        description="when `models` holds a training of another config, delete it and train "
        "afresh (default: refuse, naming the fields that differ)",
    )

    runtime_fields = frozenset(
        {
            "storage",
            "fold_ids",
            "executor",
            "ray_address",
            "gpus_per_fold",
            "cpus_per_fold",
            "max_retries",
            "prefetch",
            "cache_mb",
            "overwrite",
            "deadline",
        }
    )

    @field_validator("arch")
    @classmethod
    def _arch_ok(cls, v: str) -> str:
        from segmentation_models_pytorch import _MODEL_ARCHITECTURES

        names = {a.__name__.lower(): a.__name__ for a in _MODEL_ARCHITECTURES}
        if v.lower() not in names:
            raise ValueError(f"unknown arch {v!r}; allowed: {sorted(names.values())}")
        return names[v.lower()]

    @field_validator("encoder")
    @classmethod
    def _encoder_ok(cls, v: str) -> str:
        from segmentation_models_pytorch.encoders import get_encoder_names

        names = get_encoder_names()
        if v not in names and not v.startswith("tu-"):
            close = [n for n in names if v.split("-")[0].split("_")[0] in n][:8]
            raise ValueError(f"unknown encoder {v!r}; e.g. {close or names[:8]} (see smp docs)")
        return v

    @field_validator("encoder_weights")
    @classmethod
    def _weights_auto(cls, v: str | None, info: Any) -> str | None:
        if v != "auto":
            return v
        from segflow.train.weights import NAMED_SOURCES

        # the packaged weights of this encoder; an encoder without any starts from random
        encoder = info.data.get("encoder")
        return next((name for name, enc in NAMED_SOURCES.items() if enc == encoder), None)

    @field_validator("ema_decay")
    @classmethod
    def _no_average(cls, v: float | None) -> float | None:
        return None if v == 0 else v  # 0 turns the average off, also against the planner

    @field_validator("time_budget")
    @classmethod
    def _budget_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from segflow.train.budget import parse_budget

        try:
            parse_budget(v)
        except ConfigError as e:  # pydantic reports ValueErrors with the field's name
            raise ValueError(str(e)) from None
        return v.strip()

    @field_validator("augment")
    @classmethod
    def _augment_ok(cls, v: dict[str, Any]) -> dict[str, Any]:
        from dataclasses import fields

        from segflow.train.augment import AugmentConfig

        allowed = {f.name for f in fields(AugmentConfig)}
        unknown = set(v) - allowed
        if unknown:
            raise ValueError(f"unknown augment keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return v
