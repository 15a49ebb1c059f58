"""The review gallery of a predict run: its most uncertain images as an overlay grid (the
prediction filled, its contour at the threshold), their ids and scores, and a histogram of the
run's uncertainty.

``segflow predict --review-gallery DIR`` writes ``DIR/index.html`` (plain static files, open
it in a browser), ``DIR/review.png``, ``DIR/uncertainty.png`` and ``DIR/review.json``;
``segment_flow`` writes the same under ``<out>/review/`` and publishes a ``review`` artifact.
The tiles are drawn by :func:`segflow.pipeline.report.overlay_tile`, as the training report's.
"""

from __future__ import annotations

import html
import io
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from segflow.geometry import place
from segflow.imaging import decode_image, image_to_frame
from segflow.pipeline.report import TILE, histogram_png, overlay_tile, tile_grid
from segflow.predict.table import read_table
from segflow.storage import StorageOptions, Store

REVIEW_DIR = "review"  # under a segment_flow output folder
GRID, HISTOGRAM, INDEX, ITEMS = "review.png", "uncertainty.png", "index.html", "review.json"
MAX_PIXELS = 178_956_970  # the decode limit of segflow predict


@dataclass(frozen=True)
class Gallery:
    """A written gallery: where its files are, and the images it shows (top first)."""

    folder: str
    grid: str
    histogram: str
    index: str
    items: list[dict[str, Any]]  # id, source, uncertainty, mask
    n_images: int  # images with a score in the run
    n_review: int | None
    review_threshold: float | None


def write_gallery(
    out_url: str,
    dest_url: str,
    items: list[dict[str, Any]],
    storage: StorageOptions | None = None,
    review_threshold: float | None = None,
) -> Gallery:
    """Render the ``items`` (the run's most uncertain rows, top first) of the predict output
    ``out_url`` into ``dest_url``; the histogram covers every scored row of its QA table."""
    out, dest = Store(out_url, storage), Store(dest_url, storage)
    scores = read_table(out).column("uncertainty").drop_null().to_numpy()
    tiles = [_tile(out, it, storage) for it in items]
    grid = tile_grid(tiles) if tiles else tile_grid([np.full((TILE, TILE, 3), 255, np.uint8)])
    hist = histogram_png(scores, review_threshold)
    n_review = None if review_threshold is None else int((scores >= review_threshold).sum())
    dest.write_bytes(GRID, grid)
    dest.write_bytes(HISTOGRAM, hist)
    dest.write_json(ITEMS, {"items": items, "review_threshold": review_threshold})
    dest.write_bytes(INDEX, _html(items, n_review, len(scores)).encode())
    return Gallery(
        folder=dest.url,
        grid=dest.uri(GRID),
        histogram=dest.uri(HISTOGRAM),
        index=dest.uri(INDEX),
        items=items,
        n_images=len(scores),
        n_review=n_review,
        review_threshold=review_threshold,
    )


def _tile(out: Store, item: dict[str, Any], storage: StorageOptions | None) -> np.ndarray:
    """The image at TILE x TILE with its predicted mask filled and outlined."""
    image = _image_tile(item["source"], storage)
    with Image.open(io.BytesIO(out.read_bytes(item["mask"]))) as m:
        mask = np.asarray(m.convert("L").resize((TILE, TILE), Image.Resampling.NEAREST)) > 127
    return overlay_tile(image, mask, mask)


def _image_tile(source: str, storage: StorageOptions | None) -> np.ndarray:
    """A TILE x TILE RGB view of an input: a file's URL, or ``<dataset>#<row>``."""
    if "#" in source and source.rsplit("#", 1)[1].isdigit():
        from segflow.dataset import open_group

        url, row = source.rsplit("#", 1)
        group = open_group(Store(url, storage), "r")
        top, left, bottom, right = (int(v) for v in group["pad_box"][int(row)])
        content = np.asarray(group["images"][int(row)])[top:bottom, left:right]
        img = Image.fromarray(content).convert("RGB")
        return np.asarray(img.resize((TILE, TILE), Image.Resampling.BILINEAR))
    folder, name = posixpath.split(source)
    data = Store(folder, storage).read_bytes(name)
    decoded = decode_image(data, name, MAX_PIXELS, (TILE, TILE), "stretch")
    return image_to_frame(decoded, place(decoded.orig_size, (TILE, TILE), "stretch"))


def _html(items: list[dict[str, Any]], n_review: int | None, n: int) -> str:
    flagged = "not calibrated" if n_review is None else f"{n_review} of {n} images"
    rows = "\n".join(
        f"<tr><td>{i}</td><td>{html.escape(str(it['id']))}</td>"
        f"<td>{it['uncertainty']:.4f}</td><td>{html.escape(str(it['source']))}</td></tr>"
        for i, it in enumerate(items, start=1)
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>segflow review gallery</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:left}}</style>
</head><body>
<h1>The {len(items)} most uncertain images</h1>
<p>needs_review: {flagged}. Red: the predicted mask; green: its contour at the threshold.
Row by row, most uncertain first.</p>
<img src="{GRID}" alt="most uncertain images">
<table><tr><th>rank</th><th>id</th><th>uncertainty</th><th>source</th></tr>
{rows}
</table>
<h2>Uncertainty of the run</h2>
<img src="{HISTOGRAM}" alt="uncertainty histogram">
<p>Data: <a href="{ITEMS}">{ITEMS}</a></p>
</body></html>
"""
