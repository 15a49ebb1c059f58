"""Joint image+mask augmentation for binary segmentation, batch-wise in pure torch.

Replaces the Keras seed's ``ImageDataGenerator`` (shift 0.2, rotation 90 degrees, zoom 0.2,
flips) plus colour jitter. Everything runs on the images' device (GPU when training there) with
no per-sample Python loops: each transform is computed for the whole batch and kept per sample
with ``torch.where``, which avoids host syncs that boolean indexing would cost on a GPU.

Random parameters are drawn from a CPU ``torch.Generator`` in one fixed-shape draw, so the same
seed gives the same augmentation whatever device runs it and whatever the config enables.
Geometric transforms hit image and mask alike; colour transforms hit the image only. Masks are
only ever flipped, rotated by 90 degrees or resampled with ``nearest``, so they stay exactly
{0, 1}.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

# Column layout of the per-sample uniform draw (B, _N_PARAMS); one draw keeps seeds stable.
(
    _HFLIP,
    _VFLIP,
    _ROT90,
    _ROT90_K,
    _AFFINE,
    _ANGLE,
    _SHIFT_X,
    _SHIFT_Y,
    _ZOOM,
    _BRIGHTNESS,
    _CONTRAST,
    _HUE,
) = range(12)
_N_PARAMS = 12

# NTSC RGB -> YIQ; Y carries luma, (I, Q) the chroma plane a hue shift rotates.
_RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.596, -0.274, -0.322],
        [0.211, -0.523, 0.312],
    ],
    dtype=torch.float32,
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5  # probability per sample
    vflip: float = 0.5
    rot90: float = 0.5  # probability of a random k*90 degree rotation (k in 1..3); only when H == W
    affine: float = 0.5  # probability of shift/scale/rotate
    shift: float = 0.2  # max |shift| as a fraction of size
    rotate: float = 90.0  # max |angle| in degrees
    zoom: float = 0.2  # scale in [1-zoom, 1+zoom]
    brightness: float = 0.2  # additive, images only
    contrast: float = 0.2  # multiplicative around the per-image mean, images only
    hue: float = 0.05  # hue rotation as a fraction of a full turn, images only
    enabled: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "enabled":
                if not isinstance(value, bool):
                    raise ValueError(f"AugmentConfig.enabled must be a bool, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"AugmentConfig.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"AugmentConfig.{f.name} must be finite and >= 0, got {value!r}")
        for name in ("hflip", "vflip", "rot90", "affine"):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"AugmentConfig.{name} is a probability in [0, 1], got {getattr(self, name)!r}"
                )
        # zoom >= 1 would allow a zero or negative scale, i.e. a degenerate sampling grid.
        if self.zoom >= 1:
            raise ValueError(f"AugmentConfig.zoom must be in [0, 1), got {self.zoom!r}")
        if self.contrast > 1:
            raise ValueError(f"AugmentConfig.contrast must be in [0, 1], got {self.contrast!r}")


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """images: (B, 3, H, W) float in [0, 1]; masks: (B, 1, H, W) float in {0, 1}; same device.
    Returns augmented copies on the same device. Geometric transforms hit image and mask alike;
    colour transforms hit the image only. Output images are clamped to [0, 1]; masks stay
    exactly {0, 1}."""
    _validate(images, masks, generator)
    if not cfg.enabled or images.shape[0] == 0:
        return images.clone(), masks.clone()
    # Drawn on the CPU generator so results do not depend on the training device.
    u = torch.rand(images.shape[0], _N_PARAMS, generator=generator).to(images.device)
    given = images, masks
    images, masks = _flips_rot90(images, masks, u, cfg)
    images, masks = _affine(images, masks, u, cfg)
    images = _colour(images, u, cfg)
    # Every step returns a fresh tensor or its input; only the caller's tensors must not be
    # written to, and a mask that no step touched must still come back as a copy.
    images = images.clamp(0, 1) if images is given[0] else images.clamp_(0, 1)
    return images, masks.clone() if masks is given[1] else masks


def _validate(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> None:
    if not isinstance(images, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise ValueError(
            f"images and masks must be torch.Tensor, got {type(images).__name__} "
            f"and {type(masks).__name__}"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must have shape (B, 1, H, W), got {tuple(masks.shape)}")
    for name, t in (("images", images), ("masks", masks)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
        raise ValueError(
            f"images and masks must agree in batch and spatial size, got images "
            f"{tuple(images.shape)} and masks {tuple(masks.shape)}; expected masks "
            f"({images.shape[0]}, 1, {images.shape[2]}, {images.shape[3]})"
        )
    if images.device != masks.device:
        raise ValueError(
            f"images and masks must be on the same device, got {images.device} and {masks.device}"
        )
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        got = generator.device if isinstance(generator, torch.Generator) else type(generator)
        raise ValueError(f"generator must be a CPU torch.Generator, got {got}")


def _pick(selected: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-sample choice between two (B, C, H, W) tensors by a (B,) bool mask."""
    return torch.where(selected.view(-1, 1, 1, 1), new, old)


def _dihedral_table() -> torch.Tensor:
    """(16, 3) bool lookup: code ``h + 2*v + 4*k`` (hflip h, then vflip v, then k quarter turns)
    -> (transpose, hflip, vflip) applied in that order, which reaches the same result in three
    selective passes instead of five. Derived by brute force on a 2x2 probe, whose eight
    dihedral images are all distinct, so the table cannot drift from torch's conventions."""
    probe = torch.arange(4).view(2, 2)
    canonical = {}
    for t, fh, fv in itertools.product((False, True), repeat=3):
        x = probe.T if t else probe
        x = x.flip(-1) if fh else x
        x = x.flip(-2) if fv else x
        canonical[tuple(x.flatten().tolist())] = (t, fh, fv)
    rows = []
    for k, v, h in itertools.product(range(4), (False, True), (False, True)):
        x = probe.flip(-1) if h else probe
        x = x.flip(-2) if v else x
        x = torch.rot90(x, k, dims=(-2, -1))
        rows.append(canonical[tuple(x.flatten().tolist())])
    return torch.tensor(rows)


_DIHEDRAL = _dihedral_table()


def _flips_rot90(
    images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    # A quarter turn swaps H and W, which a batch of non-square samples cannot hold.
    rotate = cfg.rot90 > 0 and images.shape[-2] == images.shape[-1]
    if not (rotate or cfg.hflip > 0 or cfg.vflip > 0):
        return images, masks
    hflip = (u[:, _HFLIP] < cfg.hflip).long()
    vflip = (u[:, _VFLIP] < cfg.vflip).long()
    k = (u[:, _ROT90_K] * 3).long().clamp(max=2) + 1  # uniform over 1..3
    k = torch.where(u[:, _ROT90] < cfg.rot90, k, 0) if rotate else torch.zeros_like(k)
    ops = _DIHEDRAL.to(u.device)[hflip + 2 * vflip + 4 * k]
    steps = (
        (rotate, lambda x: x.transpose(-2, -1)),
        (rotate or cfg.hflip > 0, lambda x: x.flip(-1)),
        (rotate or cfg.vflip > 0, lambda x: x.flip(-2)),
    )
    for column, (possible, op) in enumerate(steps):
        if possible:  # decided from the config, not the draw, to avoid a device sync
            images = _pick(ops[:, column], op(images), images)
            masks = _pick(ops[:, column], op(masks), masks)
    return images, masks


def _affine_theta(u: torch.Tensor, cfg: AugmentConfig, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) output->input maps in normalized coordinates for ``F.affine_grid``.

    The rotation is built in pixel units and conjugated into normalized units, so a non-square
    image rotates rigidly instead of shearing. Unselected samples get the identity."""
    angle = torch.deg2rad((2 * u[:, _ANGLE] - 1) * cfg.rotate)
    inv_scale = 1 / (1 + (2 * u[:, _ZOOM] - 1) * cfg.zoom)
    # Shift is a fraction of the size; the normalized frame spans 2 units per side.
    tx = 2 * (2 * u[:, _SHIFT_X] - 1) * cfg.shift
    ty = 2 * (2 * u[:, _SHIFT_Y] - 1) * cfg.shift
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    aspect = height / width
    theta = torch.stack(
        [
            torch.stack([cos, -sin * aspect, tx], dim=-1),
            torch.stack([sin / aspect, cos, ty], dim=-1),
        ],
        dim=1,
    )
    identity = torch.eye(2, 3, dtype=theta.dtype, device=theta.device).expand_as(theta)
    sel = (u[:, _AFFINE] < cfg.affine).view(-1, 1, 1)
    return torch.where(sel, theta, identity)


def _affine(
    images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.affine <= 0:
        return images, masks
    theta = _affine_theta(u, cfg, images.shape[-2], images.shape[-1])
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # Same grid and same reflection padding for both, so borders stay consistent; nearest keeps
    # the mask binary because it only ever copies existing mask values.
    out_images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    out_masks = F.grid_sample(
        masks, grid.to(masks.dtype), mode="nearest", padding_mode="reflection", align_corners=False
    )
    # Unselected samples keep their exact input rather than an identity resample (float noise).
    sel = u[:, _AFFINE] < cfg.affine
    return _pick(sel, out_images, images), _pick(sel, out_masks, masks)


def _colour(images: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Hue, contrast and brightness fused into one per-sample affine colour map, one pass.

    Contrast scales around the mean over channels and pixels of the hue-rotated image; the
    map is linear, so that mean comes from the input's channel means without an extra pass."""
    if cfg.hue <= 0 and cfg.contrast <= 0 and cfg.brightness <= 0:
        return images
    batch = images.shape[0]
    matrix = _hue_matrix(u, cfg)  # (B, 3, 3), float32
    contrast = (1 + (2 * u[:, _CONTRAST] - 1) * cfg.contrast).view(-1, 1, 1)
    brightness = ((2 * u[:, _BRIGHTNESS] - 1) * cfg.brightness).view(-1, 1, 1)
    channel_mean = images.mean(dim=(2, 3)).float().unsqueeze(-1)  # (B, 3, 1)
    mean = (matrix @ channel_mean).mean(dim=1, keepdim=True)  # (B, 1, 1)
    bias = (1 - contrast) * mean + brightness
    out = torch.baddbmm(
        bias.to(images.dtype), (contrast * matrix).to(images.dtype), images.reshape(batch, 3, -1)
    )
    return out.view_as(images)


def _hue_matrix(u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Per-sample RGB->RGB map that rotates the (I, Q) chroma plane of YIQ by 2*pi*h."""
    angle = 2 * math.pi * (2 * u[:, _HUE] - 1) * cfg.hue
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rotation = torch.stack(
        [
            torch.stack([one, zero, zero], dim=-1),
            torch.stack([zero, cos, -sin], dim=-1),
            torch.stack([zero, sin, cos], dim=-1),
        ],
        dim=1,
    )
    to_yiq, to_rgb = (m.to(device=u.device) for m in (_RGB_TO_YIQ, _YIQ_TO_RGB))
    return to_rgb @ rotation @ to_yiq
