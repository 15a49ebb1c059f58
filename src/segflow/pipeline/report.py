"""What a person sees in the Prefect dashboard: tables and markdown built from the manifests,
with images embedded as base64 PNGs (image artifacts need public URLs; object-store files
usually have none).

Plain functions returning data; ``segflow.pipeline.artifacts`` hands them to Prefect.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image

from segflow.dataset import open_group
from segflow.storage import StorageOptions, Store

TILE = 128  # px per overlay tile: a 4 x 2 grid stays well under 200 KB as PNG


def fold_rows(version: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fold (best-epoch validation scores and OOF scores), plus an "all" row."""
    scores = version["record"]["scores"]
    oof = {r["fold"]: r for r in scores["oof_per_fold"]}
    rows = []
    for f in scores["folds"]:
        o = oof.get(f["fold"], {})
        placement = f.get("placement") or {}
        rows.append(
            {
                "fold": f["fold"],
                "best_epoch": f["best_epoch"],
                "val_dice": _r(f["dice"]),
                "val_jaccard": _r(f["jaccard"]),
                "oof_n": o.get("n"),
                "oof_dice": _r(o.get("dice")),
                "oof_thresholded_jaccard": _r(o.get("thresholded_jaccard")),
                "ray_node": placement.get("node"),
                "gpu_slot": ",".join(placement.get("gpus") or []) or None,
            }
        )
    allrow = scores["oof"]
    rows.append(
        {
            "fold": "all",
            "best_epoch": None,
            "val_dice": None,
            "val_jaccard": None,
            "oof_n": allrow["n"],
            "oof_dice": _r(allrow["dice"]),
            "oof_thresholded_jaccard": _r(allrow["thresholded_jaccard"]),
            "ray_node": None,
            "gpu_slot": None,
        }
    )
    return rows


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def overlay_grid(
    run_url: str,
    dataset_url: str,
    storage: StorageOptions | None,
    threshold: float,
    n: int = 8,
    cols: int = 4,
) -> bytes:
    """PNG of ``n`` out-of-fold predictions: the image, the truth outline in green and the
    prediction at ``threshold`` tinted red. Rows are spread evenly over the OOF images."""
    import zarr

    run = Store(run_url, storage)
    group = open_group(Store(dataset_url, storage), "r")
    probs = zarr.open_array(run.zarr_store(read_only=True), path="oof.zarr/probs", mode="r")
    oof_files = run.fs.glob(run.path("fold-*/oof.json"))
    rows = sorted(r for p in oof_files for r in json.loads(run.fs.cat_file(p))["rows"])
    picked = [rows[i] for i in np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]
    tiles = [
        overlay_tile(group["images"][r], group["masks"][r] > 0, probs[r] >= threshold * 255)
        for r in picked
    ]
    return _png(_grid(tiles, cols))


def overlay_tile(image: np.ndarray, outline: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """A TILE x TILE overlay: ``pred`` filled (tinted red), ``outline``'s contour in green
    (the truth's for OOF; the prediction's own for the review gallery)."""
    out = image.astype(np.float32)
    out[pred] = 0.55 * out[pred] + 0.45 * np.array([255, 0, 0])
    out[_outline(outline)] = (0, 255, 0)
    tile = Image.fromarray(out.astype(np.uint8)).resize((TILE, TILE), Image.NEAREST)
    return np.asarray(tile)


_overlay = overlay_tile  # the name segflow.gate imports


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def tile_grid(tiles: list[np.ndarray], cols: int = 4) -> bytes:
    """PNG of ``tiles`` (each TILE x TILE x 3), ``cols`` per row."""
    return _png(_grid(tiles, cols))


def _grid(tiles: list[np.ndarray], cols: int) -> np.ndarray:
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * TILE, cols * TILE, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = t
    return grid


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def md_code(value: Any, table: bool = False) -> str:
    """``value`` as a Markdown code span, so an id, file name or URL from storage renders as
    text: links (``[x](javascript:...)``), HTML (``<img ...>``) and emphasis in it stay inert.
    The fence is one backtick longer than the longest run inside; newlines become spaces;
    ``table``: ``|`` is escaped, or it would end the table cell even inside a code span."""
    text = " ".join(str(value).splitlines())
    if table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" or text[:1] == text[-1:] == " " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def embed_png(data: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})"


def training_markdown(
    version: dict[str, Any], curves: dict[int, bytes], overlays: bytes | None
) -> str:
    rec = version["record"]
    choice, oof = rec["choice"], rec["scores"]["oof"]
    lines = [
        f"# Model version {md_code(rec['version'])}",
        "",
        f"* data: {md_code(rec['dataset']['url'])} ({rec['dataset']['n_images']} images, "
        f"content hash `{rec['dataset']['hash'][:12]}`)",
        f"* model: {rec['config']['arch']} / {rec['config']['encoder']}, "
        f"{len(rec['folds'])} folds, {rec['config']['epochs']} epochs max",
        f"* out-of-fold: Dice {oof['dice']:.4f}, thresholded Jaccard "
        f"{oof['thresholded_jaccard']:.4f} over {oof['n']} images",
        f"* chosen: threshold {choice['threshold']:.2f}, post-processing "
        f"`{choice['postprocess']}` (OOF thresholded Jaccard "
        f"{choice['oof_thresholded_jaccard']:.4f})",
        f"* record: {md_code(version['url'])}",
        *plan_lines(rec["config"].get("plan")),
        "",
        "## Training curves",
    ]
    # a heading and blank lines around each image: consecutive image lines would render as
    # one paragraph, every fold's charts run together with nothing saying which is which
    for fold, png in sorted(curves.items()):
        lines += ["", f"### Fold {fold}", "", embed_png(png, f"fold {fold}: loss and validation")]
    if overlays:
        lines += ["", "## Out-of-fold predictions (red: prediction, green: truth outline)"]
        lines.append(embed_png(overlays, "OOF overlays"))
    return "\n".join(lines)


def plan_lines(plan: dict[str, Any] | None) -> list[str]:
    """A ``--time-budget`` run's plan, fingerprint and measured step times (train/plan.py)."""
    if not plan:
        return []
    fp = plan["fingerprint"]
    return [
        f"* plan for {plan['budget_s'] / 60:.0f} min: {plan['encoder']} at "
        f"{plan['size'][0]}x{plan['size'][1]}, batch {plan['batch_size']}, up to "
        f"{plan['epochs']} epochs (~{plan['epoch_s']:.0f} s each), {plan['rounds']} round(s)",
        f"* fingerprint: {fp['n_labelled']} labelled images, median original "
        f"{fp['median_orig_size'][0]}x{fp['median_orig_size'][1]} (aspect "
        f"{fp['median_aspect']}), foreground {fp['foreground_fraction']:.1%}, compactness "
        f"{fp['compactness']}",
        "* step times (s/image, train / inference): "
        + "; ".join(f"{k}: {v['train_s']} / {v['infer_s']}" for k, v in plan["step_times"].items()),
    ]


def run_description(kind: str, data: dict[str, Any], config: dict[str, Any]) -> str:
    """What a flow run ran on: the locations, the data hash, and the config (no secrets:
    flow configs refuse them)."""
    lines = [f"# {kind} run", ""]
    lines += [f"* {k}: {md_code(v)}" for k, v in data.items()]
    lines += ["", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines)


def histogram_png(scores: np.ndarray, cut: float | None, what: str = "uncertainty") -> bytes:
    """PNG histogram of a run's per-image ``scores``, with the review cut marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    try:
        ax.hist(scores, bins=40, range=(0.0, max(1e-6, float(np.max(scores, initial=0.0)))))
        if cut is not None:
            ax.axvline(cut, color="red", linestyle="--", label=f"needs_review >= {cut:.3f}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel(what)
        ax.set_ylabel("images")
        ax.set_title(f"{what} of {len(scores)} images", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def review_markdown(
    items: list[dict[str, Any]], grid: bytes, hist: bytes, n_review: int | None, n: int
) -> str:
    """The ``review`` artifact: the most uncertain images (grid, ids, scores) and the
    histogram of the run's uncertainty."""
    flagged = "not calibrated" if n_review is None else f"{n_review} of {n} images"
    lines = [
        f"# The {len(items)} most uncertain images",
        "",
        f"* needs_review: {flagged}",
        "",
        "Red: the predicted mask; green: its contour at the threshold. Row by row, most "
        "uncertain first.",
        "",
        embed_png(grid, "most uncertain images"),
        "",
        "| rank | id | uncertainty | source |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {i} | {md_code(it['id'], table=True)} | {it['uncertainty']:.4f} | "
        f"{md_code(it['source'], table=True)} |"
        for i, it in enumerate(items, start=1)
    ]
    lines += ["", "## Uncertainty of the run", "", embed_png(hist, "uncertainty histogram")]
    return "\n".join(lines)
