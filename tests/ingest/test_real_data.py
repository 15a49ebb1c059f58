"""Ingest of the real archives in ../shared/data (skipped where they are absent)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from segflow.ingest import Dataset, IngestConfig, ingest


def _first(folder, n, tmp, pattern):
    out = tmp / folder.name
    out.mkdir()
    for p in sorted(folder.glob(pattern))[:n]:
        os.symlink(p, out / p.name)
    return out


def test_isic2017_train_masks_are_resized_to_the_256_images(shared_data, tmp_path):
    train = shared_data / "isic2017" / "train"
    images = _first(train / "images", 200, tmp_path, "ISIC_*.jpg")
    ids = sorted(p.stem for p in images.iterdir())
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in ids:
        os.symlink(train / "masks" / f"{i}_segmentation.png", masks / f"{i}_segmentation.png")
    mismatched = sum(Image.open(masks / f"{i}_segmentation.png").size != (256, 256) for i in ids)
    res = ingest(
        IngestConfig(
            layout="isic",
            source=str(images),
            masks=str(masks),
            dataset=str(tmp_path / "ds"),
            allow_external_links=True,  # the folders are links into shared/data
            size=(256, 256),
        )
    )
    assert (res.n_images, res.n_rejected) == (200, 0)
    assert mismatched > 150 and res.quirks.get("mask_resized") == mismatched
    ds = Dataset.open(str(tmp_path / "ds"))
    assert sorted(ds.ids) == ids
    assert ds.group["masks"].shape == (200, 256, 256)
    assert ds.column("orig_size").tolist() == [[256, 256]] * 200
    fractions = [ds.mask(i).mean() for i in range(0, 200, 20)]
    assert all(0.005 < f < 0.95 for f in fractions)  # real lesions, not empty or full masks


def test_isbi2012_membrane_folder_layout(shared_data, tmp_path):
    em = shared_data / "isbi2012-membrane"
    res = ingest(
        IngestConfig(
            layout="folder",
            source=str(em / "images"),
            masks=str(em / "masks"),
            mask_template="{name}",
            dataset=str(tmp_path / "ds"),
            size=(128, 128),
        )
    )
    assert (res.n_images, res.n_rejected) == (30, 0)
    ds = Dataset.open(str(tmp_path / "ds"))
    assert set(ds.column("orig_channels").tolist()) == {1}
    fg = np.mean([ds.mask(i).mean() for i in range(ds.n)])
    assert 0.6 < fg < 0.9  # ~78% of the pixels are cell interior
