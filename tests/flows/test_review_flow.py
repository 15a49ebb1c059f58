"""segment_flow publishes the run's review gallery (the most uncertain images) as an artifact,
and writes the QA table, against a real Prefect API."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from segflow.flows.segment import segment_flow
from segflow.storage import StorageOptions, Store
from segflow.train import train
from tests.flows.conftest import tiny_config
from tests.flows.helpers import latest_artifact
from tests.makers import write_isic
from tests.train.conftest import make_dataset, small_config


def test_segment_flow_publishes_the_review_artifact(prefect_api, tmp_path):
    dataset = make_dataset(str(tmp_path), StorageOptions(), n=12, size=32)
    models = str(tmp_path / "models")
    train(small_config(dataset, models, epochs=1))
    ids = write_isic(Store(str(tmp_path / "new")), range(100, 105), h=40, w=48)
    out = tmp_path / "out"

    res = segment_flow(str(tmp_path / "new"), models, str(out), tiny_config(), "isic", review_k=3)

    review = res["review"]
    assert len(review["items"]) == 3 and review["n_images"] == 5
    scores = [i["uncertainty"] for i in review["items"]]
    assert scores == sorted(scores, reverse=True) and {i["id"] for i in review["items"]} <= set(ids)
    for name in ("index.html", "review.png", "uncertainty.png", "review.json"):
        assert (out / "review" / name).stat().st_size > 0
    table = pq.read_table(out / "summary.parquet").to_pylist()
    assert sorted(r["id"] for r in table) == ids
    assert {r["model_version"] for r in table} == {res["version"]}
    assert res["predictions"]["table"].endswith("summary.parquet")

    md = latest_artifact("review").data
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md)
    assert len(pngs) == 2  # the grid and the histogram
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[0]))))
    assert grid.shape == (128, 512, 3)  # 3 tiles of 128 px, 4 per row
    assert all(i["id"] in md for i in review["items"])
    assert "index.html" in latest_artifact("review-gallery").data
