"""Stage configs: YAML for every option, flags win, typed errors that say what was received."""

from __future__ import annotations

import pytest

from segflow.errors import ConfigError
from segflow.ingest import IngestConfig
from segflow.pipeline.keys import config_hash
from segflow.predict.config import PredictConfig

CANARY = "CANARY-s3cr3t-9f2c"


def test_yaml_gives_every_option_and_flags_override(tmp_path):
    f = tmp_path / "ingest.yaml"
    f.write_text(
        "layout: folder\nsource: /in\ndataset: /out\nsize: [128, 96]\nresize: letterbox\n"
        "mask-template: '{stem}.mask.png'\nworkers: 3\n"
    )
    cfg = IngestConfig.load(f, workers=1, dataset=None)
    assert cfg.size == (128, 96) and cfg.resize == "letterbox"
    assert cfg.mask_template == "{stem}.mask.png"
    assert cfg.workers == 1 and cfg.dataset == "/out"  # flag given wins; None leaves the file


def test_config_is_frozen():
    cfg = IngestConfig(layout="isic", source="/a", dataset="/b")
    with pytest.raises(Exception, match="frozen"):
        cfg.size = (1, 1)  # type: ignore[misc]


def test_config_hash_ignores_runtime_fields_only():
    a = IngestConfig(layout="isic", source="/a", dataset="/b", workers=1)
    b = IngestConfig(layout="isic", source="/a", dataset="/b", workers=8, batch_size=2)
    c = IngestConfig(layout="isic", source="/a", dataset="/b", size=(64, 64))
    assert config_hash(a) == config_hash(b) != config_hash(c)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"layout": "dicom"}, r"layout: .*received 'dicom'"),
        ({"size": (4, 4)}, r"size: .*8\.\.8192, got \(4, 4\)"),
        ({"colour": "red"}, r"colour: Extra inputs are not permitted"),
        ({"hu_window": (400, -1000)}, r"low < high"),
    ],
)
def test_invalid_values_raise_config_error_naming_them(overrides, expected):
    base = {"layout": "isic", "source": "/a", "dataset": "/b"}
    with pytest.raises(ConfigError, match=expected):
        IngestConfig.load(None, **{**base, **overrides})


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        IngestConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        IngestConfig.load(bad)


@pytest.mark.parametrize(
    "data",
    [
        {"source": "/a", "dataset": "/b"},  # missing field: pydantic's input is the whole dict
        {"layout": "dicom", "source": "/a", "dataset": "/b"},
        {"layout": "isic", "source": "/a", "dataset": "/b", "colour": CANARY},  # a misnamed key
        {"layout": "isic", "source": "/a", "dataset": "/b", "size": "big"},
        {"layout": "isic", "source": "/a", "dataset": "/b", "storage": CANARY},
        {"layout": "isic", "source": "/a", "dataset": "/b", "storage": {"secret": 12}},
        {"layout": "isic", "source": "/a", "dataset": "/b", "storage": {"aws_secret": CANARY}},
        {"layout": "isic", "source": "/a", "dataset": "/b", "storage": {"anon": "maybe"}},
    ],
)
def test_validation_errors_never_show_a_secret(data):
    storage = {"key": "AKIA" + CANARY, "secret": CANARY, "endpoint_url": f"http://u:{CANARY}@h:9"}
    if not isinstance(data.get("storage"), (str, type(None))):
        storage = {**storage, **data["storage"]}
    elif isinstance(data.get("storage"), str):
        storage = data["storage"]
    with pytest.raises(ConfigError) as err:
        IngestConfig.load(None, **{**data, "storage": storage})
    assert CANARY not in str(err.value)
    assert "invalid IngestConfig" in str(err.value)


def test_model_level_error_hides_the_input():
    with pytest.raises(ConfigError) as err:  # neither dataset nor source: a model-level check
        PredictConfig.load(None, models="/m", out="/o", storage={"secret": CANARY})
    assert "give exactly one input" in str(err.value) and CANARY not in str(err.value)


def test_yaml_errors_give_the_position_not_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(f"layout: isic\nstorage: {{secret: {CANARY}: x}}\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2") as err:
        IngestConfig.load(f)
    assert CANARY not in str(err.value)


def test_public_dict_and_repr_redact_endpoint_userinfo():
    storage = {"endpoint_url": f"http://user:{CANARY}@minio:9000", "secret": CANARY}
    cfg = IngestConfig(layout="isic", source="/a", dataset="/b", storage=storage)
    assert cfg.public_dict()["storage"]["endpoint_url"] == "http://***@minio:9000"
    assert CANARY not in repr(cfg) + str(cfg) + str(cfg.public_dict())
    assert cfg.storage.fsspec_kwargs()["endpoint_url"] == f"http://user:{CANARY}@minio:9000"
