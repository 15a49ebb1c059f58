"""Stage configs: YAML for every option, flags win, typed errors that say what was received."""

from __future__ import annotations

import pytest

from segflow.errors import ConfigError
from segflow.ingest import IngestConfig


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


def test_fingerprint_ignores_runtime_fields_only():
    a = IngestConfig(layout="isic", source="/a", dataset="/b", workers=1)
    b = IngestConfig(layout="isic", source="/a", dataset="/b", workers=8, batch_size=2)
    c = IngestConfig(layout="isic", source="/a", dataset="/b", size=(64, 64))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


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
