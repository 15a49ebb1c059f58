"""The flows' config: one section per stage, secrets refused by name, the pipeline's layout
reaching every stage, and ``segflow run`` refusing before Prefect records anything."""

from __future__ import annotations

import pytest
import yaml

from segflow.errors import ConfigError
from segflow.pipeline.config import FlowConfig
from segflow.pipeline.runner import load_spec

CANARY = "CANARY-flowcfg-77a1"


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"storage": {"secret": CANARY}}, "config.storage.secret"),
        ({"storage": {"key": CANARY, "token": CANARY}}, "config.storage.key, config.storage.token"),
        ({"ingest": {"storage": {"secret": CANARY}}}, "config.ingest.storage"),
        ({"predict": {"storage": {"key": CANARY}}, "train": {}}, "config.predict.storage"),
    ],
)
def test_secrets_are_refused_by_name_never_by_value(config, named):
    with pytest.raises(ConfigError) as err:
        FlowConfig.parse(config)
    assert named in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert CANARY not in str(err.value)


def test_invalid_sections_name_the_field_and_hide_secrets():
    cfg = FlowConfig.parse({"storage": {"endpoint_url": f"http://u:{CANARY}@h:9"}})
    with pytest.raises(ConfigError, match=r"(?s)config.train.*epochs") as err:
        FlowConfig.parse({**cfg.model_dump(), "train": {"epochs": "many"}}).train_config("d", "m")
    assert CANARY not in str(err.value)
    with pytest.raises(ConfigError, match=r"config.ingest sets \['source'\]"):
        cfg.model_copy(update={"ingest": {"source": "x"}}).ingest_config("s", "isic", "m")


def test_the_flow_layout_reaches_predict_crops_and_evaluate():
    cfg = FlowConfig.parse({"truth": "/t"})
    predict = cfg.predict_config("/run", "/new", "/out", layout="isic")
    assert predict.layout == "isic"
    assert cfg.crops_config(predict, "/out").layout == "isic"
    assert cfg.evaluate_layout(predict) == "isic"
    own = FlowConfig.parse({"predict": {"layout": "folder"}})
    predict = own.predict_config("/run", "/new", "/out", layout="isic")
    assert predict.layout == "folder" and own.crops_config(predict, "/out").layout == "folder"
    assert own.crops_config(predict, "/out").predictions == "/out"


def test_crops_pair_images_as_predict_did():
    """Masks named by predict's pattern ids find their images only by the same pattern."""
    pattern = r"images/(?P<id>\d+)_test\.tif"
    cfg = FlowConfig.parse({"predict": {"image_pattern": pattern}})
    predict = cfg.predict_config("/run", "/new", "/out")
    crops = cfg.crops_config(predict, "/out")
    assert (crops.image_pattern, crops.pairs, crops.image_glob) == (pattern, None, "*")
    own = FlowConfig.parse({"predict": {"image_pattern": pattern}, "crops": {"pairs": "/p.csv"}})
    crops = own.crops_config(own.predict_config("/run", "/new", "/out"), "/out")
    assert (crops.image_pattern, crops.pairs) == (None, "/p.csv")
    plain = FlowConfig.parse({})
    assert plain.crops_config(plain.predict_config("/run", "/new", "/out"), "/o").pairing is None


def test_run_file_refuses_section_secrets_before_any_flow_runs(tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    spec = {
        "flow": "train",
        "dataset_source": "/raw",
        "layout": "isic",
        "models_url": "/m",
        "config": {"train": {"storage": {"secret": CANARY}}},
    }
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"config\.train\.storage") as err:
        load_spec(f)
    assert CANARY not in str(err.value)


def test_run_file_moves_top_level_secrets_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    spec = {
        "flow": "segment",
        "source": "/new",
        "models_url": "/m",
        "out_url": "/o",
        "layout": "isic",
        "config": {"storage": {"secret": CANARY, "region": "eu"}},
    }
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(spec))
    params = load_spec(f).parameters()
    assert CANARY not in str(params) and params["config"]["storage"] == {"region": "eu"}
    assert params["layout"] == "isic"
    import os

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == CANARY
