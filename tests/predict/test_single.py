"""One image at a time (the server's path): the same masks as the batch predictor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segflow.geometry import from_frame, place
from segflow.imaging import Rejected, decode_image
from segflow.masks import expand_box, full_size_mask, largest_box, masked_crop, postprocess
from segflow.predict.config import PredictConfig
from segflow.predict.ensemble import load_ensemble
from segflow.predict.postprocess import resolve_choice
from segflow.predict.run import predict
from segflow.predict.single import finish, masked_crop_png, prepare, segment_bytes
from segflow.storage import StorageOptions, Store
from segflow.train import train
from tests.makers import coded_pair, jpeg_bytes, png_bytes, tiff_bytes
from tests.train.conftest import make_dataset, small_config


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("single")
    dataset = make_dataset(str(base), StorageOptions(), n=16, size=32)
    url = str(base / "models")
    assert train(small_config(dataset, url, epochs=1)).ok
    return url


@pytest.fixture(scope="module")
def ensemble(models):
    return load_ensemble(Store(models), None)


def _inputs() -> dict[str, bytes]:
    grey = coded_pair(4, 50, 38)[0][..., 1]
    return {
        "a.jpg": jpeg_bytes(coded_pair(1, 45, 61)[0]),
        "b.jpg": jpeg_bytes(coded_pair(2, 160, 120)[0]),  # large enough for JPEG draft mode
        "c.png": png_bytes(grey),  # greyscale
    }


def test_segment_bytes_equals_the_batch_predictor(models, ensemble, tmp_path):
    inputs = _inputs()
    (tmp_path / "src").mkdir()
    for name, data in inputs.items():
        (tmp_path / "src" / name).write_bytes(data)
    cfg = PredictConfig(
        models=models,
        source=str(tmp_path / "src"),
        out=str(tmp_path / "out"),
        tta="d4",
        executor="inline",
    )
    predict(cfg)  # one batch of all three images
    threshold, method = resolve_choice(cfg.models, cfg.storage, cfg.threshold, cfg.postprocess)
    for name, data in inputs.items():
        res = segment_bytes(ensemble, data, name, threshold, method, "d4", 10**6)
        written = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name[0]}.png"))
        assert res.mask.dtype == bool and res.size == written.shape
        np.testing.assert_array_equal(res.mask, written > 0)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(res.mask_png()))), written)
        assert res.foreground == pytest.approx(float(res.mask.mean()))


def test_largest_component_box_and_fraction():
    prob = np.zeros((32, 32), np.float32)
    prob[4:10, 4:12] = 0.9  # the larger component
    prob[20:23, 20:23] = 0.9
    placement = place((64, 64), (32, 32), "stretch")
    res = finish(prob, placement, 0.5, "none")
    assert res.size == (64, 64) and res.n_components == 2
    box, area, _, component = largest_box(res.mask)
    assert res.bbox == box and res.area == area and res.bbox[0] < 10
    np.testing.assert_array_equal(res.component, component)
    assert res.foreground == pytest.approx(res.mask.mean())
    empty = finish(np.zeros((32, 32), np.float32), placement, 0.5, "lcc")
    assert empty.bbox is None and empty.foreground == 0.0 and not empty.mask.any()


def test_full_size_mask_is_the_inverse_resize_then_threshold_then_postprocess():
    rng = np.random.default_rng(0)
    prob = rng.random((32, 32)).astype(np.float32)
    placement = place((50, 70), (32, 32), "letterbox")
    expected = postprocess(from_frame(prob, placement, nearest=False) >= 0.6, "lcc_fill")
    np.testing.assert_array_equal(full_size_mask(prob, placement, 0.6, "lcc_fill"), expected)


@pytest.mark.parametrize(
    ("data", "max_pixels", "reason"),
    [
        (b"", 10**6, "unreadable"),
        (b"GIF89a but not really", 10**6, "unreadable"),
        (jpeg_bytes(np.zeros((300, 300, 3), np.uint8)), 50_000, "too_large"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(ensemble, data, max_pixels, reason):
    with pytest.raises(Rejected) as e:
        segment_bytes(ensemble, data, "x.jpg", 0.5, "none", "none", max_pixels)
    assert e.value.reason == reason


def test_masked_crop_is_cut_from_the_full_resolution_image(ensemble):
    img = coded_pair(2, 160, 120)[0]
    data = png_bytes(img)  # lossless, so the crop can be compared pixel for pixel
    prepared = prepare(data, "b.png", ensemble.spec, 10**6)
    prob = np.zeros((32, 32), np.float32)
    prob[8:20, 6:18] = 1.0
    res = finish(prob, prepared.placement, 0.5, "none")
    png, box = masked_crop_png(prepared, res, data, 10**6)
    assert box == expand_box(res.bbox, 0.1, res.size)
    expected = masked_crop(img, res.component, box, "black")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)
    # a JPEG decoded in draft mode for the model is decoded again in full for the crop
    jpeg = jpeg_bytes(np.ascontiguousarray(np.tile(img, (4, 4, 1))))  # 640 x 480
    prepared = prepare(jpeg, "big.jpg", ensemble.spec, 10**6)
    assert prepared.decoded.image.size != (480, 640)
    res = finish(prob, prepared.placement, 0.5, "none")
    png, box = masked_crop_png(prepared, res, jpeg, 10**6)
    full = np.asarray(decode_image(jpeg, "big.jpg", 10**6).image)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(png))), masked_crop(full, res.component, box, "black")
    )
    empty = finish(np.zeros((32, 32), np.float32), prepared.placement, 0.5, "none")
    assert masked_crop_png(prepared, empty, jpeg, 10**6) is None


def test_a_tiff_is_decoded_by_name(ensemble):
    res = segment_bytes(
        ensemble, tiff_bytes(coded_pair(3, 40, 56)[0]), "x.tif", 0.5, "none", "none", 10**6
    )
    assert res.size == (40, 56)
