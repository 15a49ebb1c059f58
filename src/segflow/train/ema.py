"""An exponential moving average (EMA) of a network's weights, for ``train.ema_decay``.

A short CPU schedule ends while the weights still move from batch to batch; their average
over the last few hundred steps is usually a better model than the last step's weights.
The average starts at the network's initial weights, so early steps use a smaller decay
(:func:`decay_at`, the warm-up of timm's ``ModelEmaV2``), or the first epochs' validation
would score mostly the initialisation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def decay_at(decay: float, step: int) -> float:
    """The decay used at update ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1.0 + step) / (10.0 + step))


class Ema:
    """The averaged copy of a network: :meth:`update` after every optimiser step; the copy
    (``module``, always in eval mode) is what validation scores and ``best.pt`` holds."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = decay_at(self.decay, self.steps)
        for avg, now in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if avg.dtype.is_floating_point:
                avg.lerp_(now.detach(), 1.0 - d)
            else:  # counters (BatchNorm's num_batches_tracked) follow the network
                avg.copy_(now)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.steps = int(state["steps"])
