"""The synthetic ISIC-layout data: files and formats, determinism, and that it is neither
trivial (discs on flat skin) nor unlearnable. Thresholds were measured on these exact seeds and
sizes, with margin: see each test."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from segflow.demo_data import DemoDataResult, generate_demo_data, make_sample

SIZE = (96, 128)


def samples(n: int = 16, size: tuple[int, int] = SIZE, seed: int = 0):
    """The samples generate_demo_data would write, without encoding them."""
    return [make_sample(np.random.default_rng([seed, i]), size) for i in range(n)]


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# -- files and formats ---------------------------------------------------------------------------
def test_writes_isic_layout(location) -> None:
    """Once into a local folder, once into S3 (moto), through the same Store."""
    result = generate_demo_data(location.url("demo"), n=8, size=(64, 80), storage=location.storage)

    assert isinstance(result, DemoDataResult)
    assert (result.out, result.n, result.size) == (location.url("demo"), 8, (64, 80))
    expected = sorted(
        [f"ISIC_{i:07d}.jpg" for i in range(8)]
        + [f"ISIC_{i:07d}_segmentation.png" for i in range(8)]
    )
    assert result.files == expected
    store = location.store("demo")
    assert [f.rel for f in store.list()] == expected  # nothing else, no temporary files
    for i in range(8):
        image = decode(store.read_bytes(f"ISIC_{i:07d}.jpg"))
        mask = decode(store.read_bytes(f"ISIC_{i:07d}_segmentation.png"))
        assert (image.format, image.mode) == ("JPEG", "RGB")
        assert np.asarray(image).shape == (64, 80, 3)
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (80, 64))
        assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}


def test_result_out_is_the_store_url(tmp_path: Path) -> None:
    result = generate_demo_data(str(tmp_path / "a" / "b"), n=1, size=(32, 32))
    assert result.out == str(tmp_path / "a" / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == result.files


# -- determinism --------------------------------------------------------------------------------
def _bytes_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        generate_demo_data(str(tmp_path / name), n=4, size=(64, 64), seed=seed)
    a, b, c = (_bytes_of(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_one_sample_regenerates_alone(tmp_path: Path) -> None:
    generate_demo_data(str(tmp_path), n=5, size=(64, 64), seed=3)
    image, mask = make_sample(np.random.default_rng([3, 4]), (64, 64))
    written = np.asarray(decode((tmp_path / "ISIC_0000004_segmentation.png").read_bytes()))
    np.testing.assert_array_equal(written, mask * 255)
    jpeg = np.asarray(decode((tmp_path / "ISIC_0000004.jpg").read_bytes())).astype(int)
    assert np.abs(jpeg - image).mean() < 4  # only JPEG loss between them


def test_make_sample_types() -> None:
    image, mask = make_sample(np.random.default_rng(0), (40, 56))
    assert (image.dtype, image.shape) == (np.uint8, (40, 56, 3))
    assert (mask.dtype, mask.shape) == (np.uint8, (40, 56))
    assert set(np.unique(mask).tolist()) == {0, 1}


# -- not trivial --------------------------------------------------------------------------------
def test_lesion_size_and_position_vary() -> None:
    masks = [m for _, m in samples()]
    fractions = [m.mean() for m in masks]
    assert all(0.03 <= f <= 0.7 for f in fractions), fractions
    assert max(fractions) - min(fractions) > 0.15  # measured 0.06..0.37
    centres = np.array([ndimage.center_of_mass(m) for m in masks]) / SIZE
    assert np.abs(centres - 0.5).max() > 0.08  # not always centred; measured 0.17


def test_lesions_are_irregular_single_pieces() -> None:
    masks = [m for _, m in samples()]
    # A disc or ellipse fills ~99% of its convex hull; measured 0.84..0.96 here.
    solidity = [m.sum() / ConvexHull(np.argwhere(m)).volume for m in masks]
    assert sum(s < 0.97 for s in solidity) >= 12, np.round(solidity, 3)
    for m in masks:
        assert ndimage.label(m)[1] == 1
        assert np.array_equal(ndimage.binary_fill_holes(m), m > 0)


def test_lesions_are_not_flat_colour() -> None:
    # Intensity std inside the mask: 0 for a flat disc, ~2 from noise alone; measured >= 11.
    stds = [image.mean(-1)[mask > 0].std() for image, mask in samples()]
    assert min(stds) > 7, np.round(stds, 1)


def dark_thin_pixels(image: np.ndarray, mask: np.ndarray) -> int:
    """Pixels of thin dark lines (a black top-hat) on the skin, away from the lesion's soft
    edge and from the image border, where the vignette's dark corner reads as a valley."""
    grey = image.astype(float).mean(-1)
    tophat = ndimage.grey_closing(grey, size=(5, 5)) - grey
    skin = ~ndimage.binary_dilation(mask > 0, iterations=3)
    skin[:3], skin[-3:], skin[:, :3], skin[:, -3:] = False, False, False, False
    return int(((tophat > 20) & skin).sum())


def test_most_but_not_all_images_have_hair() -> None:
    # Measured over 100 samples at 64x64 and at 96x128: 0..1 such pixels without hair, 13+ with.
    has_hair = [dark_thin_pixels(image, mask) > 10 for image, mask in samples()]
    assert 0.6 <= np.mean(has_hair) < 1.0, has_hair


# -- learnable, but not by a threshold ----------------------------------------------------------
def best_dice(features: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Dice of the best single threshold (either direction) on a feature over all pixels:
    with the pixels sorted by feature, every cut point is a candidate threshold."""
    f = np.concatenate([x.ravel() for x in features])
    m = np.concatenate([x.ravel() for x in masks]) > 0
    hits_below = np.cumsum(m[np.argsort(f, kind="stable")])  # foreground among the k lowest
    k = np.arange(1, f.size + 1)
    below = 2 * hits_below / (k + m.sum())
    above = 2 * (m.sum() - hits_below[:-1]) / (f.size - k[:-1] + m.sum())
    return float(max(below.max(), above.max()))


def border_contrast(image: np.ndarray) -> np.ndarray:
    """Distance of the 5x5-smoothed colour from the median colour of the image border."""
    smooth = ndimage.uniform_filter(image.astype(float), size=(5, 5, 1))
    border = np.concatenate([smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1]])
    return np.linalg.norm(smooth - np.median(border, axis=0), axis=-1)


def test_grey_threshold_fails_but_local_contrast_works() -> None:
    data = samples()
    images, masks = [i for i, _ in data], [m for _, m in data]
    # Measured on seeds 0..7: best grey or channel 0.60..0.79, colour contrast 0.66..0.79.
    for channel in range(3):
        assert best_dice([i[..., channel].astype(float) for i in images], masks) < 0.88
    assert best_dice([i.astype(float).mean(-1) for i in images], masks) < 0.88
    assert best_dice([border_contrast(i) for i in images], masks) > 0.6


# -- bad arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "received", "allowed"),
    [
        ({"n": 0}, "0", "n must be an integer >= 1"),
        ({"n": -3}, "-3", "n must be an integer >= 1"),
        ({"n": 2.5}, "2.5", "n must be an integer >= 1"),
        ({"n": 2, "size": (31, 64)}, "(31, 64)", "integers >= 32"),
        ({"n": 2, "size": (64,)}, "(64,)", "integers >= 32"),
        ({"n": 2, "size": (64, 64.0)}, "(64, 64.0)", "integers >= 32"),
        ({"n": 2, "seed": -1}, "-1", "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments_raise_value_error(
    tmp_path: Path, kwargs: dict, received: str, allowed: str
) -> None:
    with pytest.raises(ValueError) as error:
        generate_demo_data(str(tmp_path / "x"), **kwargs)
    assert received in str(error.value)
    assert allowed in str(error.value)
    assert not (tmp_path / "x").exists()  # validated before anything is written


def test_make_sample_rejects_small_size() -> None:
    with pytest.raises(ValueError, match=re.escape("integers >= 32, got (16, 16)")):
        make_sample(np.random.default_rng(0), (16, 16))
