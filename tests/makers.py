"""Test data in the real formats (JPEG, PNG, TIFF via tifffile, .mhd via SimpleITK), written
through segflow's Store so the same makers fill a local folder or an S3 bucket."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from segflow.storage import Store


def colour_of(k: int) -> tuple[int, int, int]:
    """A distinct, JPEG-robust background colour per image number."""
    return (40 + (k * 37) % 170, 40 + (k * 91) % 170, 40 + (k * 53) % 170)


def lesion_box(k: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of image k's rectangular 'lesion'."""
    top, left = h // 4 + k % 3, w // 4 + k % 5
    return top, left, top + h // 2, left + w // 3


def coded_pair(k: int, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = colour_of(k)
    t, left, b, r = lesion_box(k, h, w)
    img[t:b, left:r] = (30, 20, 10)
    mask = np.zeros((h, w), np.uint8)
    mask[t:b, left:r] = 255
    return img, mask


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def png_bytes(img: np.ndarray | Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, "PNG", **kw)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def write_isic(
    store: Store, ks: range | list[int], h: int = 48, w: int = 64, masks: Store | None = None
) -> list[str]:
    ids = []
    for k in ks:
        img, mask = coded_pair(k, h, w)
        image_id = f"ISIC_{k:07d}"
        store.write_bytes(f"{image_id}.jpg", jpeg_bytes(img))
        (masks or store).write_bytes(f"{image_id}_segmentation.png", png_bytes(mask))
        ids.append(image_id)
    return ids


def write_nerve(store: Store, subjects: dict[int, int], n_test: int, h=40, w=56) -> None:
    """Kaggle layout: train/<s>_<n>.tif + train/<s>_<n>_mask.tif, test/<n>.tif (greyscale)."""
    k = 0
    for s, count in subjects.items():
        for n in range(1, count + 1):
            img, mask = coded_pair(k, h, w)
            store.write_bytes(f"train/{s}_{n}.tif", tiff_bytes(img[..., 0]))
            store.write_bytes(f"train/{s}_{n}_mask.tif", tiff_bytes(mask))
            k += 1
    for n in range(1, n_test + 1):
        store.write_bytes(f"test/{n}.tif", tiff_bytes(coded_pair(k + n, h, w)[0][..., 1]))


def write_mhd(store: Store, uid: str, volume_zyx: np.ndarray, spacing_xyz, origin_xyz) -> None:
    """A real MetaImage pair written by SimpleITK (then copied into the store)."""
    import tempfile
    from pathlib import Path

    import SimpleITK as sitk

    vol = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    vol.SetSpacing(tuple(float(x) for x in spacing_xyz))
    vol.SetOrigin(tuple(float(x) for x in origin_xyz))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{uid}.mhd"
        sitk.WriteImage(vol, str(path), useCompression=False)
        for f in Path(tmp).iterdir():
            store.write_bytes(f.name, f.read_bytes())
