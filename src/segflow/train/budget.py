"""Time budgets (``--time-budget 25m``): parsing, and the error of one that is too small."""

from __future__ import annotations

import math
import re

from segflow.errors import ConfigError

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*$", re.IGNORECASE)


class BudgetError(ConfigError):
    """The time budget cannot hold even one epoch of the cheapest plan."""

    def __init__(self, budget_s: float, minimum_s: float, detail: str) -> None:
        self.budget_s, self.minimum_s = budget_s, minimum_s
        super().__init__(
            f"--time-budget {format_seconds(budget_s)} cannot hold one epoch of the smallest "
            f"plan ({detail}); the minimum budget here is {format_seconds(minimum_s)} "
            f"(--time-budget {math.ceil(minimum_s / 60)}m). Give a larger budget, fewer "
            "folds (--fold-ids), or train without --time-budget"
        )


def parse_budget(text: str | float) -> float:
    """``"25m"``, ``"1.5h"``, ``"900s"``, ``"900"`` -> seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = _BUDGET.match(str(text))
        if not m:
            raise ConfigError(
                f"time budget {text!r} is not a duration; write e.g. 30m, 1.5h or 900s"
            )
        seconds = float(m[1]) * _UNITS[(m[2] or "").lower()]
    if seconds <= 0:
        raise ConfigError(f"time budget {text!r} must be positive")
    return seconds


def format_seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
