"""The fold ensemble: every fold's model rebuilt from ``config.json`` + ``best.pt``.

Folds are averaged in probability space, not logit space: the threshold and post-processing
are chosen on out-of-fold *probabilities*, and a probability mean keeps one over-confident
fold from outvoting the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segflow.errors import InputError
from segflow.predict.tta import tta_views
from segflow.predict.uncertainty import view_disagreement
from segflow.storage import Store
from segflow.train.model import ModelSpec, load_model, load_spec, normalise, resize_input


@dataclass
class Ensemble:
    models: list[torch.nn.Module]
    specs: list[ModelSpec]
    folds: list[int]
    device: torch.device
    amp_dtype: torch.dtype | None = None

    @property
    def spec(self) -> ModelSpec:
        return self.specs[0]

    def predict(self, images: np.ndarray, tta: str) -> np.ndarray:
        """uint8 (B, H, W, 3) frames at the dataset size -> float32 (B, H, W) probabilities."""
        return self.predict_scored(images, tta, score=False)[0]

    @torch.no_grad()
    def predict_scored(
        self, images: np.ndarray, tta: str, score: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """As :meth:`predict`, plus each image's uncertainty (float32 (B,), see
        :mod:`segflow.predict.uncertainty`; ``None`` with a single view). Every fold's TTA
        views stay on the device; only the mean and B scores come back."""
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        frame = tuple(x.shape[-2:])
        total = torch.zeros((x.shape[0], 1, *frame), device=self.device)
        kept: list[torch.Tensor] = []
        for model, spec in zip(self.models, self.specs, strict=True):
            xi = _prepare(x, spec)
            with torch.autocast(
                self.device.type, self.amp_dtype or torch.float32, self.amp_dtype is not None
            ):
                views = tta_views(model, xi, tta)  # (V, B, 1, h, w)
            if tuple(views.shape[-2:]) != frame:
                v, b = views.shape[:2]
                views = F.interpolate(
                    views.flatten(0, 1), size=frame, mode="bilinear", align_corners=False
                ).unflatten(0, (v, b))
            total += views.mean(0)
            if score:
                kept.append(views[:, :, 0])
        probs = (total / len(self.models))[:, 0].float().cpu().numpy()
        scores = view_disagreement(torch.cat(kept)) if score else None
        return probs, None if scores is None else scores.float().cpu().numpy()


def _prepare(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Exactly the training-time input path: resize to the input size, then normalise."""
    return normalise(resize_input(x, spec), spec)


def finished_folds(models: Store) -> list[int]:
    folds = sorted(
        int(f.rel.split("/")[0].removeprefix("fold-"))
        for f in models.list()
        if f.rel.endswith("/fold.complete.json") and f.rel.startswith("fold-")
    )
    if not folds:
        raise InputError(f"no finished folds under {models.url}; run `segflow train` first")
    return folds


def load_ensemble(models: Store, folds: list[int] | None, device: str | None = None) -> Ensemble:
    available = finished_folds(models)
    chosen = available if folds is None else folds
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise InputError(
            f"folds {missing} are not finished under {models.url}; finished: {available}"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = [load_spec(models.child(f"fold-{k}")) for k in chosen]
    frames = {(s.dataset_size, s.resize) for s in specs}
    if len(frames) > 1:
        raise InputError(f"folds disagree on the dataset frame (size, resize): {sorted(frames)}")
    nets = [load_model(models.child(f"fold-{k}"), "best.pt", str(dev)) for k in chosen]
    amp = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if dev.type == "cuda":
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    return Ensemble(nets, specs, chosen, dev, amp)
