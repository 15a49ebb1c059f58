"""Encoder weights from files, object storage and a named pip-shipped source; no mocks."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from segflow.storage import StorageOptions, Store
from segflow.train.weights import (
    NAMED_SOURCES,
    WeightsError,
    encoder_state_for,
    load_encoder_weights,
    read_state_dict,
)
from tests.conftest import make_bucket

LITE0 = "timm-tf_efficientnet_lite0"


def _unet(encoder: str = "resnet18", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # different seeds give different random encoders
    return smp.Unet(encoder, encoder_weights=None, classes=1).eval()


def _save(state: dict, path: Path) -> str:
    torch.save(state, path)
    return str(path)


def _assert_same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_encoder_state_dict_file_round_trip(tmp_path: Path):
    src, dst = _unet(seed=1), _unet(seed=2)
    path = _save(src.encoder.state_dict(), tmp_path / "enc.pt")
    report = load_encoder_weights(dst, "resnet18", path)
    _assert_same_encoder(src, dst)
    assert report.n_tensors == len(src.encoder.state_dict())
    assert report.encoder == "resnet18" and report.source == path
    assert report.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_whole_model_and_wrapped_checkpoints_load(tmp_path: Path):
    src = _unet(seed=1)
    whole = _save(src.state_dict(), tmp_path / "whole.pt")
    dst = _unet(seed=2)
    report = load_encoder_weights(dst, "resnet18", whole)
    _assert_same_encoder(src, dst)
    assert report.n_tensors == len(src.encoder.state_dict())
    # A training checkpoint from DataParallel: {"model": {"module.encoder.*": ...}, "epoch": 3}
    wrapped = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    dst = _unet(seed=3)
    load_encoder_weights(dst, "resnet18", _save(wrapped, tmp_path / "ckpt.pt"))
    _assert_same_encoder(src, dst)


@pytest.mark.s3
def test_round_trip_from_object_store(s3_endpoint: str):
    storage = StorageOptions(endpoint_url=s3_endpoint)
    bucket = make_bucket(s3_endpoint)
    small = "mobilenet_v2"  # a quarter of resnet18's bytes: the transport is under test here
    src = _unet(small, seed=1)
    store = Store(f"s3://{bucket}/weights", storage)
    enc_url = store.write_bytes("enc.pt", _to_bytes(src.encoder.state_dict()))
    whole_url = store.write_bytes("whole.pth", _to_bytes(src.state_dict()))
    for url in (enc_url, whole_url):
        dst = _unet(small, seed=2)
        report = load_encoder_weights(dst, small, url, storage)
        _assert_same_encoder(src, dst)
        assert report.n_tensors == len(src.encoder.state_dict())
    with pytest.raises(WeightsError, match=r"no encoder weights at s3://.*/nope\.pt"):
        read_state_dict(f"s3://{bucket}/weights/nope.pt", storage)


def test_other_encoder_file_is_refused_with_keys(tmp_path: Path):
    path = _save(_unet("resnet34").encoder.state_dict(), tmp_path / "r34.pt")
    with pytest.raises(WeightsError) as info:
        load_encoder_weights(_unet(), "resnet18", path)
    msg = str(info.value)
    assert "unexpected" in msg and "encoder.layer1.2.conv1.weight" in msg
    assert "'resnet18'" in msg and path in msg


def test_wrong_shape_names_key_and_both_shapes(tmp_path: Path):
    state = _unet().encoder.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    path = _save(state, tmp_path / "bad.pt")
    model = _unet(seed=5)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_encoder_weights(model, "resnet18", path)
    assert (
        "encoder.layer1.0.conv1.weight: expected (64, 64, 3, 3), file has (128, 64, 3, 3)"
        in str(info.value)
    )
    # Nothing was half-loaded.
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_missing_file_names_path_and_named_sources(tmp_path: Path):
    path = str(tmp_path / "nowhere" / "enc.pt")
    with pytest.raises(WeightsError) as info:
        load_encoder_weights(_unet(), "resnet18", path)
    msg = str(info.value)
    assert f"no encoder weights at {path}" in msg
    assert all(name in msg for name in NAMED_SOURCES)


class NotATensor:
    """A class torch.load(weights_only=True) must refuse to rebuild."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_arbitrary_pickle_is_refused(tmp_path: Path):
    path = _save({"x": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"weights_only=True.*for safety"):
        read_state_dict(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsError, match="weights_only"):
        load_encoder_weights(_unet(), "resnet18", str(garbage))


def test_non_tensor_values_are_refused(tmp_path: Path):
    path = _save({"conv.weight": torch.zeros(1), "note": "hello"}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="plain state dict of tensors"):
        read_state_dict(path)


def test_named_source_loads_lite0_imagenet():
    name = "efficientnet-lite0-imagenet"
    assert NAMED_SOURCES[name] == LITE0
    model, random_init = _unet(LITE0, seed=1), _unet(LITE0, seed=1)
    report = load_encoder_weights(model, LITE0, name)
    assert report.n_tensors == 294 and len(report.sha256) == 64
    x = torch.linspace(-2, 2, 3 * 64 * 64).reshape(1, 3, 64, 64)
    with torch.no_grad():
        got, ref = model.encoder(x)[-1], random_init.encoder(x)[-1]
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, ref)


def test_named_source_refuses_other_encoders():
    with pytest.raises(WeightsError, match=f"fit only encoder '{LITE0}'"):
        encoder_state_for(_unet(), "resnet18", "efficientnet-lite0-imagenet")
