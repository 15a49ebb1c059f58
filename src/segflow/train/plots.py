"""Training curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

import csv
import io


def plot_curves(metrics_csv: bytes, fold: int) -> bytes:
    """Loss and validation scores per epoch, side by side, titled with the fold: the
    training report shows one such pair per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(io.StringIO(metrics_csv.decode())))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        ax1.plot(epochs, [float(r[key]) for r in rows], marker="o", label=label)
    for key, label in (
        ("val_dice", "Dice"),
        ("val_jaccard", "Jaccard"),
        ("val_thresholded_jaccard", "thresholded Jaccard"),
    ):
        ax2.plot(epochs, [float(r[key]) for r in rows], marker="o", label=label)
    ax1.set(xlabel="epoch", title=f"fold {fold}: loss")
    ax2.set(xlabel="epoch", title=f"fold {fold}: validation", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
