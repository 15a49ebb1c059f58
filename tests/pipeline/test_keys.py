"""Cache keys: code versions follow the imports of each stage; task keys take the task's own
typed parameters."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segflow.ingest import IngestConfig
from segflow.pipeline import keys
from segflow.pipeline.keys import STAGE_ENTRIES, code_hash, stage_modules
from segflow.storage import Store
from segflow.tasks.common import stage_task

PKG = Path(keys.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the package source, to touch files in."""
    root = tmp_path_factory.mktemp("src") / "segflow"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _touch(path: Path) -> bytes:
    before = path.read_bytes()
    path.write_bytes(before + b"\n# touched\n")
    return before


def test_each_stage_reaches_the_modules_the_old_hand_list_missed():
    reached = {s: {n.removeprefix("segflow.") for n in stage_modules(s)} for s in STAGE_ENTRIES}
    dataset = {"dataset", "ingest.dataset"}  # wherever the dataset contract lives
    assert "metrics" in reached["evaluate"]
    assert "geometry" in reached["crops"]  # through imaging
    assert reached["oof"] & dataset and reached["choose"] & dataset
    assert "geometry" in reached["choose"]


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_touching_a_module_a_stage_reaches_changes_its_key_only_then(stage, tree):
    reached = stage_modules(stage, tree)
    before = code_hash(stage, tree)
    for name, path in reached.items():
        original = _touch(path)
        try:
            assert code_hash(stage, tree) != before, f"{stage}: {name} changed, key did not"
        finally:
            path.write_bytes(original)
    unrelated = [p for p in tree.rglob("*.py") if p not in reached.values()]
    assert unrelated, f"{stage} reaches every module"
    for path in unrelated:
        original = _touch(path)
        try:
            assert code_hash(stage, tree) == before, f"{stage}: {path} is not its code"
        finally:
            path.write_bytes(original)


def test_serve_and_cli_are_no_stage_code():
    for stage in STAGE_ENTRIES:
        names = set(stage_modules(stage))
        assert not names & {"segflow.cli", "segflow.serve.app", "segflow.serve.deployment"}


def test_a_key_that_names_no_task_parameter_fails_at_definition():
    def key(cfg: IngestConfig, dataset: str) -> str:
        return "k"

    with pytest.raises(TypeError, match="takes 'dataset', not a task parameter"):

        @stage_task("t", key)
        def t(cfg: IngestConfig) -> None: ...


def test_a_key_whose_parameter_type_differs_fails_at_definition():
    def key(cfg: str) -> str:
        return "k"

    with pytest.raises(TypeError, match="'cfg' is <class 'str'> there"):

        @stage_task("t", key)
        def t(cfg: IngestConfig) -> None: ...


def test_task_key_changes_with_inputs_and_config_not_runtime(tmp_path):
    from segflow.pipeline.stages import ingest_key
    from tests.makers import write_isic

    src = Store(str(tmp_path / "raw"))
    write_isic(src, range(2), h=16, w=16)
    cfg = IngestConfig(layout="isic", source=src.url, dataset=str(tmp_path / "ds"))
    first = ingest_key(cfg)
    assert ingest_key(cfg.model_copy(update={"workers": 3})) == first
    assert ingest_key(cfg.model_copy(update={"size": (64, 64)})) != first
    write_isic(src, range(2, 3), h=16, w=16)
    assert ingest_key(cfg) != first


def test_a_rollback_on_one_out_folder_misses_the_shard_and_summary_cache(tmp_path):
    """Version A, then B, then A again into one folder: A's cached shards and summary describe
    masks B has since overwritten, so A's second run must not hit them; an unchanged rerun
    still does (the folder's identity file is not rewritten then)."""
    from segflow.pipeline.manifests import PredictionPlan, ShardEntry, ShardManifest
    from segflow.pipeline.stages import shard_key, summary_key
    from segflow.predict.config import PredictConfig
    from segflow.predict.run import _forget_other_models

    cfg = PredictConfig(models=str(tmp_path / "m"), out=str(tmp_path / "out"), dataset="d")
    out = Store(cfg.out, cfg.storage)
    entry = ShardEntry(shard=0, n=1, hash="h")
    plan = PredictionPlan(
        out=cfg.out,
        version="v1",
        version_hash="vh",
        threshold=0.5,
        postprocess="none",
        folds=[0],
        shards=[entry],
        source_hash="s",
        hash="p",
    )
    shards = [ShardManifest(shard=0, n_outputs=1, n_errors=0, marker="m", hash="x")]

    def keys() -> tuple[str, str]:
        return shard_key(cfg, plan, 0), summary_key(cfg, plan, shards)

    shard_refs = [{"shard": 0, "n": 1, "hash": "h"}]
    _forget_other_models(out, shard_refs, {"ensemble": "A"})
    first = keys()
    _forget_other_models(out, shard_refs, {"ensemble": "A"})  # unchanged rerun
    assert keys() == first
    _forget_other_models(out, shard_refs, {"ensemble": "B"})
    _forget_other_models(out, shard_refs, {"ensemble": "A"})  # the rollback
    again = keys()
    assert again[0] != first[0] and again[1] != first[1]
