"""The model spec (``config.json`` beside every checkpoint) and building a model from it.

A predictor needs nothing but the models location: ``config.json`` says how to build the
network and how to feed it (input size, normalisation, the dataset's resize policy), and
``best.pt`` holds its weights.
"""

from __future__ import annotations

import io
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from segflow import __version__
from segflow.errors import InputError
from segflow.storage import Store

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelSpec(BaseModel):
    """Everything needed to rebuild and feed a trained network."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str
    encoder: str
    encoder_depth: int = 5
    decoder_channels: list[int] | None = None
    in_channels: int = 3
    classes: int = 1
    input_size: tuple[int, int]  # (H, W) the network sees
    dataset_size: tuple[int, int]  # (H, W) of the dataset frame (ingest geometry)
    resize: str  # the dataset's resize policy: stretch | letterbox
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on [0, 1] RGB
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float = 0.5
    encoder_weights: str | None = None  # where the initial encoder weights came from
    segflow_version: str = __version__


def resize_input(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """[0, 1] RGB (B, 3, h, w) -> the network's input size (antialiased bilinear)."""
    h, w = spec.input_size
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x


def normalise(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A freshly initialised network for ``spec``; never downloads weights."""
    kwargs: dict[str, Any] = {"encoder_depth": spec.encoder_depth}
    unet_like = spec.arch.lower() in ("unet", "unetplusplus", "manet")
    if spec.decoder_channels and unet_like:
        kwargs["decoder_channels"] = list(spec.decoder_channels)
    elif unet_like and spec.encoder_depth != 5:
        kwargs["decoder_channels"] = [256, 128, 64, 32, 16][5 - spec.encoder_depth :]
    return smp.create_model(
        spec.arch,
        encoder_name=spec.encoder,
        encoder_weights=None,
        in_channels=spec.in_channels,
        classes=spec.classes,
        **kwargs,
    )


def save_spec(store: Store, spec: ModelSpec) -> str:
    return store.write_json("config.json", spec.model_dump(mode="json"))


def load_spec(store: Store) -> ModelSpec:
    if not store.exists("config.json"):
        raise InputError(f"no model config.json at {store.url}; is this a segflow fold folder?")
    return ModelSpec.model_validate(store.read_json("config.json"))


def save_weights(store: Store, rel: str, state: dict[str, Any]) -> str:
    """``torch.save`` to bytes, then one atomic write (a half-written checkpoint never exists)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return store.write_bytes(rel, buf.getvalue())


def load_checkpoint(store: Store, rel: str, map_location: str | torch.device = "cpu") -> Any:
    """Load with ``weights_only=True``: tensors and plain containers only, never code."""
    data = store.read_bytes(rel)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(
            f"checkpoint {store.uri(rel)} is not a plain tensor state ({e}); segflow loads "
            "checkpoints with weights_only=True and never unpickles code"
        ) from None


def load_model(store: Store, rel: str = "best.pt", device: str = "cpu") -> torch.nn.Module:
    """Rebuild a fold's model from its folder: ``config.json`` + weights."""
    spec = load_spec(store)
    model = build_model(spec)
    state = load_checkpoint(store, rel, device)
    model.load_state_dict(state.get("model", state))
    return model.to(device).eval()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (auto | bf16 | fp16 | off) on ``device``; None: fp32."""
    if device.type != "cuda" or amp == "off":
        return None  # CPU autocast is slower than fp32 for convolutions on most CPUs
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
