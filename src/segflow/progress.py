"""Progress of a long run over a whole archive: count, rate and ETA, as plain figures that the
CLI's bar and the flow's ``predict-progress`` artifact both show."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressFigures:
    """``done`` of ``total`` inputs over the whole archive (those finished by an earlier,
    resumed run included); ``rate``: inputs per second in this run; ``eta_s``: seconds left
    at that rate (``None`` until something ran)."""

    done: int
    total: int
    rate: float
    eta_s: float | None

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.done / max(self.total, 1))

    def line(self, unit: str = "images") -> str:
        eta = "?" if self.eta_s is None else _clock(self.eta_s)
        return f"{self.done:,}/{self.total:,} {unit}, {self.rate:.1f}/s, ETA {eta}"


def progress_figures(done: int, total: int, ran: int, seconds: float) -> ProgressFigures:
    """``ran`` of the ``done`` inputs were finished in this run, in ``seconds``: the rate is
    theirs, so inputs resumed from an earlier run do not make the ETA look short."""
    rate = ran / seconds if seconds > 0 else 0.0
    eta = max(total - done, 0) / rate if rate > 0 else None
    return ProgressFigures(done, total, rate, eta)


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
