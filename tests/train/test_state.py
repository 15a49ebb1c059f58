"""Which saved fold a config may resume: fields derived from the config count too."""

from __future__ import annotations

from segflow.dataset import Dataset
from segflow.storage import Store
from segflow.train.model import save_spec
from segflow.train.state import differences, fold_record, model_spec
from tests.train.conftest import small_config


def test_a_fold_built_at_another_default_size_is_a_mismatch(local, tiny_dataset):
    """size=None in both records, but an older segflow's default input size differed: the
    saved config.json's input_size must be compared, not only the config fields."""
    cfg = small_config(tiny_dataset, f"{local.base}/m", local.storage)
    assert cfg.size is None
    spec = model_spec(cfg, Dataset(Store(tiny_dataset, local.storage)))
    fold = Store(cfg.models, local.storage).child("fold-0")
    fold.write_json("train_config.json", fold_record(cfg))
    save_spec(fold, spec)
    assert differences(cfg, fold, spec) == {}  # the same config and network: resumable

    older = spec.model_copy(update={"input_size": (64, 64)})  # the old default, size=None
    save_spec(fold, older)
    assert differences(cfg, fold, spec) == {"input_size": ([64, 64], [32, 32])}

    # "auto" in an older config.json is compared as what it resolved to for that encoder
    save_spec(fold, spec)
    saved = fold.read_json("config.json")
    fold.write_json("config.json", {**saved, "encoder_weights": "auto"})
    assert differences(cfg, fold, spec) == {}  # resnet18 has no packaged weights: None
    weighted = spec.model_copy(update={"encoder_weights": "some-weights"})
    assert differences(cfg, fold, weighted) == {"encoder_weights": (None, "some-weights")}
