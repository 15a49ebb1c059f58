"""The model server on a real local Ray Serve, over real HTTP, with a tiny trained ensemble."""

from __future__ import annotations

import base64
import io
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from segflow.errors import SegflowError
from segflow.masks import largest_box
from segflow.predict.config import PredictConfig
from segflow.predict.run import predict
from segflow.serve import ServeConfig
from segflow.serve.app import HTTPError, parse_multipart
from segflow.storage import StorageOptions
from segflow.train import train
from segflow.versions import VersionNotFound
from tests.makers import coded_pair, jpeg_bytes, png_bytes
from tests.train.conftest import make_dataset, small_config

# Ray Serve's own config models use pydantic-1-style Field arguments
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")
MAX_PIXELS = 100_000  # small, so a 400x400 image is over the limit
MAX_BYTES = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("serve")
    dataset = make_dataset(str(base), StorageOptions(), n=16, size=32)
    url = str(base / "models")
    result = train(small_config(dataset, url, epochs=1))
    assert result.ok
    return url


@pytest.fixture(scope="module")
def server(models) -> Iterator[tuple[httpx.Client, object]]:
    import ray
    from ray import serve as ray_serve

    from segflow.serve.deployment import serve, stop
    from segflow.serve.proxy import proxy_env

    started = not ray.is_initialized()  # serve() starts a local Ray, the proxy guard in it
    saved = {k: os.environ.get(k) for k in proxy_env(MAX_BYTES)}
    cfg = ServeConfig(
        models=models, port=_free_port(), max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES, tta="flips"
    )
    result = serve(cfg)
    try:
        with httpx.Client(base_url=result.url, timeout=60) as client:
            yield client, result
    finally:
        stop()
        assert not ray_serve.status().applications
        if started:
            ray.shutdown()
        for k, v in saved.items():  # the guard's environment is for that Ray only
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _image(k: int = 3, h: int = 45, w: int = 61) -> bytes:
    return jpeg_bytes(coded_pair(k, h, w)[0])


def _png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _predicted_mask(models: str, data: bytes, tmp_path: Path) -> np.ndarray:
    """What `segflow predict` writes for the same file."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "one.jpg").write_bytes(data)
    predict(
        PredictConfig(
            models=models,
            source=str(tmp_path / "src"),
            out=str(tmp_path / "out"),
            tta="flips",
            executor="inline",
        )
    )
    return np.asarray(Image.open(tmp_path / "out" / "masks" / "one.png"))


def _error(resp: httpx.Response, status: int, reason: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["status"] == status and body["error"] == reason and body["message"]
    return body


# -- the happy path ---------------------------------------------------------------------------
def test_a_jpeg_comes_back_as_the_mask_segflow_predict_writes(server, models, tmp_path):
    client, started = server
    data = _image()
    resp = client.post("/v1/segment", content=data, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    mask = _png_array(base64.b64decode(body["mask_png_base64"]))
    assert mask.shape == (45, 61) and (body["height"], body["width"]) == (45, 61)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    np.testing.assert_array_equal(mask, _predicted_mask(models, data, tmp_path))
    assert body["version"] == started.version == "unversioned"
    assert body["foreground_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)
    assert body["threshold"] == started.threshold and body["tta"] == "flips"
    assert body["latency_ms"] > 0 and body["crop"] is None
    if body["bbox"] is not None:
        x0, y0, x1, y1 = body["bbox"]
        assert mask[y0:y1, x0:x1].any() and 0 <= x0 < x1 <= 61 and 0 <= y0 < y1 <= 45


def test_format_png_returns_the_png_itself(server):
    client, _ = server
    data = _image()
    as_json = client.post("/v1/segment", content=data, headers={"Content-Type": "image/jpeg"})
    resp = client.post(
        "/v1/segment?format=png", content=data, headers={"Content-Type": "image/jpeg"}
    )
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert resp.headers["x-model-version"] == "unversioned"
    expected = _png_array(base64.b64decode(as_json.json()["mask_png_base64"]))
    np.testing.assert_array_equal(_png_array(resp.content), expected)


def test_multipart_upload_equals_the_raw_body(server):
    client, _ = server
    data = _image(5, 40, 52)
    raw = client.post("/v1/segment", content=data, headers={"Content-Type": "image/jpeg"})
    files = {"file": ("lesion.jpg", data, "image/jpeg")}
    multi = client.post("/v1/segment", files=files, data={"note": "a form field comes first"})
    assert multi.status_code == 200, multi.text
    assert multi.json()["mask_png_base64"] == raw.json()["mask_png_base64"]


def test_crop_masked_is_the_image_inside_the_component(server):
    client, _ = server
    img = coded_pair(7, 48, 64)[0]
    resp = client.post(
        "/v1/segment?crop=masked", content=png_bytes(img), headers={"Content-Type": "image/png"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    mask = _png_array(base64.b64decode(body["mask_png_base64"]))
    bbox, _, _, component = largest_box(mask)
    assert bbox is not None and list(bbox) == body["bbox"]
    x0, y0, x1, y1 = body["crop"]["box"]
    assert x0 <= bbox[0] and y0 <= bbox[1] and x1 >= bbox[2] and y1 >= bbox[3]  # the margin
    arr = _png_array(base64.b64decode(body["crop"]["png_base64"]))
    assert arr.shape == (y1 - y0, x1 - x0, 3)
    inside = component[y0:y1, x0:x1].astype(bool)
    # a PNG is lossless: inside the component the crop is the image, outside it is black
    np.testing.assert_array_equal(arr[inside], img[y0:y1, x0:x1][inside])
    assert not arr[~inside].any()


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "ctype", "status", "reason"),
    [
        (b"this is not an image", "image/jpeg", 400, "unreadable"),
        (b"", "image/png", 400, "empty"),
        (b"<xml/>", "text/plain", 415, "unsupported_media_type"),
        (b"\xff\xd8", "application/octet-stream", 415, "unsupported_media_type"),
    ],
)
def test_bad_bodies_get_clear_4xx_errors(server, content, ctype, status, reason):
    client, _ = server
    resp = client.post("/v1/segment", content=content, headers={"Content-Type": ctype})
    _error(resp, status, reason)


def test_no_content_type_is_415(server):
    client, _ = server
    req = client.build_request("POST", "/v1/segment", content=_image())
    assert "content-type" not in req.headers  # raw bytes with no type at all
    body = _error(client.send(req), 415, "unsupported_media_type")
    assert "(none)" in body["message"]


def test_an_image_over_the_pixel_limit_is_413(server):
    client, _ = server
    big = jpeg_bytes(np.zeros((400, 400, 3), np.uint8))  # 160,000 pixels > 100,000
    resp = client.post("/v1/segment", content=big, headers={"Content-Type": "image/jpeg"})
    body = _error(resp, 413, "too_large")
    assert "160,000" in body["message"] and "100,000" in body["message"]


def test_an_unknown_version_is_404_with_the_available_ones(server, models):
    client, _ = server
    jpeg = {"Content-Type": "image/jpeg"}
    for resp in (
        client.post("/v1/segment?version=v999", content=_image(), headers=jpeg),
        client.post("/v1/segment", content=_image(), headers={**jpeg, "X-Model-Version": "v9"}),
        client.get("/v1/model", params={"version": "v999"}),
    ):
        body = _error(resp, 404, "unknown_version")
        assert body["available"] == ["unversioned"] and "unversioned" in body["message"]
        assert models not in resp.text and "models" not in body["message"]  # no server paths
    ok = client.post("/v1/segment?version=unversioned", content=_image(), headers=jpeg)
    assert ok.status_code == 200


def test_multipart_without_a_file_and_bad_parameters_are_400(server):
    client, _ = server
    _error(client.post("/v1/segment", data={"a": "b"}, files={"other": ("", b"x")}), 400, "no_file")
    _error(
        client.post(
            "/v1/segment?format=gif", content=_image(), headers={"Content-Type": "image/jpeg"}
        ),
        400,
        "bad_parameter",
    )
    _error(client.get("/no/such/route"), 404, "http_error")


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (decoders refuse it from the header alone)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_413_quotes_the_servers_own_pixel_limit(server):
    client, _ = server
    # 20000 x 20000 = 400 MP: past Pillow's own bomb guard, which answers first
    bomb = _png_header(20_000, 20_000)
    resp = client.post("/v1/segment", content=bomb, headers={"Content-Type": "image/png"})
    body = _error(resp, 413, "too_large")
    assert "100,000" in body["message"] and "400,000,000" in body["message"]
    assert "178" not in body["message"]


def test_an_undecodable_tiff_is_400_not_500(server):
    import tifffile

    client, _ = server
    buf = io.BytesIO()  # a 4-D page (depth, H, W, RGB): Pillow cannot take it
    arr = np.zeros((2, 32, 32, 3), np.uint8)
    tifffile.imwrite(buf, arr, photometric="rgb", volumetric=True, tile=(2, 16, 16))
    resp = client.post(
        "/v1/segment", content=buf.getvalue(), headers={"Content-Type": "image/tiff"}
    )
    assert resp.status_code in (400, 415), resp.text
    assert resp.json()["error"] in ("unreadable", "unsupported_media_type")
    assert client.get("/healthz").status_code == 200


def test_bodies_over_the_byte_limit_are_refused_before_they_are_read(server):
    client, _ = server
    jpeg = {"Content-Type": "image/jpeg"}
    declared = client.post("/v1/segment", content=b"\xff" * (MAX_BYTES + 1), headers=jpeg)
    assert "1,000,000" in _error(declared, 413, "too_large")["message"]
    # answered by the guard in Serve's proxy: no replica round trip, no body queued there
    assert declared.headers.get("x-refused-by") == "proxy"

    sent = 0

    def chunks(head: bytes):  # no Content-Length: the server counts, and stops at the limit
        nonlocal sent
        yield head
        for _ in range(64):
            sent += 65_536
            yield b"\0" * 65_536

    streamed = client.post("/v1/segment", content=chunks(b"\xff\xd8\xff\xe0" * 4), headers=jpeg)
    _error(streamed, 413, "too_large")
    # junk that does not start like an image is refused on its first bytes
    refused = client.post("/v1/segment", content=chunks(b"junk" * 4), headers=jpeg)
    assert "6a 75 6e 6b" in _error(refused, 400, "unreadable")["message"]
    assert refused.headers.get("x-refused-by") == "proxy"
    text = client.post("/v1/segment", content=b"x", headers={"Content-Type": "text/plain"})
    _error(text, 415, "unsupported_media_type")
    assert text.headers.get("x-refused-by") == "proxy"
    assert client.get("/healthz").status_code == 200


# -- the other endpoints --------------------------------------------------------------------------
def test_healthz_model_and_openapi(server):
    client, started = server
    assert client.get("/healthz").json() == {"status": "ok", "version": "unversioned"}
    info = client.get("/v1/model").json()
    assert info["version"] == "unversioned" and info["folds"] == [0, 1]
    assert info["threshold"] == started.threshold and info["postprocess"] == started.postprocess
    assert info["config"]["folds"] == 2 and info["frame"] == {"size": [32, 32], "resize": "stretch"}
    oof = info["metrics"]["oof"]
    assert 0 <= oof["oof_thresholded_jaccard"] <= 1 and len(info["metrics"]["folds"]) == 2
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/segment"]["post"]
    assert {"image/*", "multipart/form-data"} <= set(post["requestBody"]["content"])
    assert {"200", "400", "404", "413", "415"} <= set(post["responses"])
    assert "/healthz" in spec["paths"] and "/v1/model" in spec["paths"]


# -- start-up -------------------------------------------------------------------------------------
def test_an_unknown_version_fails_at_start(models):
    from segflow.serve.deployment import serve

    with pytest.raises(VersionNotFound, match="'v7' not found") as e:
        serve(ServeConfig(models=models, version="v7"))
    assert isinstance(e.value, SegflowError)


def test_the_cli_has_help_json_and_config():
    from typer.testing import CliRunner

    from segflow.cli import app

    res = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for flag in (
        "--models",
        "--version",
        "--tta",
        "--host",
        "--port",
        "--ray-address",
        "--replicas",
        "--gpus-per-replica",
        "--json",
        "--config",
    ):
        assert flag in res.output


def test_the_cli_exits_2_on_an_unknown_version(models, monkeypatch, capsys):
    from segflow.cli import main

    monkeypatch.setattr(sys, "argv", ["segflow", "serve", "--models", models, "--version", "v7"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "model version 'v7' not found" in err and "available" in err


def test_a_versioned_models_url_serves_its_record(models, tmp_path):
    import shutil

    from segflow.serve.service import Service, VersionMismatch, resolve
    from segflow.versions import write_version

    root = tmp_path / "models"
    shutil.copytree(models, root / "runs" / "r1")
    record = {
        "version": "r1",
        "run": "runs/r1",
        "created_at": "2026-01-01T00:00:00Z",
        "dataset": {"url": "ds", "content_hash": "h", "n_images": 16},
        "config": {"folds": 2},
        "folds": [0, 1],
        "scores": {"oof_tj": 0.5},
        "choice": {"threshold": 0.35, "postprocess": "lcc"},
        "code_version": "abc",
    }
    write_version(str(root), record)
    latest = resolve(ServeConfig(models=str(root)))
    assert (latest.version.id, latest.threshold, latest.postprocess) == ("r1", 0.35, "lcc")
    assert latest.info["metrics"] == {"oof_tj": 0.5} and latest.info["code_version"] == "abc"
    service = Service(ServeConfig(models=str(root)), latest)
    for ok in (None, "r1", "latest"):
        service.check_version(ok)
    with pytest.raises(VersionMismatch, match="'r0' is not served") as e:
        service.check_version("r0")
    assert e.value.available == ["r1"]
    pinned = resolve(ServeConfig(models=str(root), version="r1"))
    with pytest.raises(VersionMismatch):  # pinned: 'latest' may have moved on
        Service(ServeConfig(models=str(root), version="r1"), pinned).check_version("latest")


def test_a_request_may_name_the_version_by_the_alias_the_server_resolved(models, tmp_path):
    import shutil

    from segflow.serve.service import Service, VersionMismatch, resolve
    from segflow.versions import move_production, write_version

    root = tmp_path / "models"
    for n, created in (("r1", "2026-01-01"), ("r2", "2026-01-02")):
        shutil.copytree(models, root / "runs" / n)
        write_version(str(root), {"version": n, "run": f"runs/{n}", "created_at": created})
    for n in ("r1", "r2"):
        move_production(str(root), n, "promote", "test", actor="test")

    def service(version: str | None) -> Service:
        cfg = ServeConfig(models=str(root), version=version)
        return Service(cfg, resolve(cfg))

    default = service(None)  # production: r2
    assert default.version == "r2"
    for ok in (None, "r2", "production"):
        default.check_version(ok)
    for refused in ("previous", "latest", "r1"):  # latest: not the name it resolved
        with pytest.raises(VersionMismatch, match=f"{refused!r} is not served"):
            default.check_version(refused)
    previous = service("previous")
    assert previous.version == "r1"
    for ok in ("previous", "r1"):
        previous.check_version(ok)
    with pytest.raises(VersionMismatch):
        previous.check_version("production")
    service("production").check_version("production")
    with pytest.raises(VersionMismatch):  # pinned by id: no alias follows it
        service("r2").check_version("production")


def test_production_is_refused_once_promoted_away_from_the_served_version(
    models, tmp_path, monkeypatch
):
    import shutil

    from segflow.serve import service as svc
    from segflow.versions import move_production, write_version

    root = tmp_path / "models"
    for n, created in (("r1", "2026-01-01"), ("r2", "2026-01-02")):
        shutil.copytree(models, root / "runs" / n)
        write_version(str(root), {"version": n, "run": f"runs/{n}", "created_at": created})
    move_production(str(root), "r1", "promote", "test", actor="test")
    cfg = ServeConfig(models=str(root))
    served = svc.Service(cfg, svc.resolve(cfg))
    served.check_version("production")  # r1, as at start
    move_production(str(root), "r2", "promote", "test", actor="test")
    served.check_version("production")  # read a moment ago: kept a few seconds
    monkeypatch.setattr(svc, "ALIAS_TTL_S", 0.0)
    with pytest.raises(svc.VersionMismatch, match="serves 'r1', 'production' is now 'r2'"):
        served.check_version("production")
    served.check_version("r1")


def test_replicas_that_cannot_be_placed_fail_locally_and_warn_on_a_cluster(caplog):
    from segflow.serve.deployment import _check_resources

    with pytest.raises(SegflowError, match=r"1 GPU \(1 replica\(s\) x 1\) but the cluster has 0"):
        _check_resources(1, 1.0, 1, {"CPU": 2.0}, local=True)
    _check_resources(2, 0.0, 1, {"CPU": 2.0}, local=True)  # fits
    _check_resources(2, 1.0, 1, {"CPU": 2.0, "GPU": 1.0}, local=False)
    assert "2 GPU" in caplog.text and "wait" in caplog.text


# -- the multipart parser -------------------------------------------------------------------------
def test_multipart_parser_is_exact_on_binary_content():
    payload = bytes(range(256)) * 4 + b"\r\n\r\n--\r\n\r"  # CR/LF runs, dashes, a trailing CR
    req = httpx.Request(
        "POST", "http://x/", files={"file": ("a b.tif", payload, "image/tiff")}, data={"x": "1"}
    )
    data, name = parse_multipart(req.read(), req.headers["content-type"])
    assert data == payload and name == "a b.tif"


def test_multipart_parser_caps_the_parts():
    tiny = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(200)
    )
    with pytest.raises(HTTPError, match="more than 16 parts"):
        parse_multipart(tiny + b"--B--\r\n", "multipart/form-data; boundary=B")
    few = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(3)
    )
    last = b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\nIMG\r\n--B--\r\n'
    assert parse_multipart(few + last, "multipart/form-data; boundary=B") == (b"IMG", None)


def test_multipart_parser_takes_a_named_part_without_a_filename():
    boundary = "XyZ"
    body = (
        b'preamble\r\n--XyZ\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
        b"\x89PNG\r\n--XyZ--\r\n"
    )
    assert parse_multipart(body, f"multipart/form-data; boundary={boundary}") == (
        b"\x89PNG",
        None,
    )
    with pytest.raises(HTTPError, match="no boundary"):
        parse_multipart(body, "multipart/form-data")
    with pytest.raises(HTTPError, match="cut short"):
        parse_multipart(b"--XyZ", "multipart/form-data; boundary=XyZ")
