"""The champion-challenger gate and warm starts on tiny real models, locally and on moto S3:
a worse challenger (trained on masks shuffled between images) is refused, a better one is
promoted, manual mode never promotes, a benchmark that shares pixels with the training data
is refused, rollback moves what `segflow predict` uses, and a warm start loads the champion."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segflow.gate import (
    BenchmarkError,
    GateConfig,
    apply_gate,
    bootstrap_ci,
    decide,
    evaluate_gate,
    prepare_benchmark,
)
from segflow.storage import StorageOptions, Store
from segflow.train.warmstart import WarmStartError, init_hash, pin_init
from segflow.versions import PRODUCTION, move_production, read_aliases, read_history
from tests.conftest import Location, make_bucket
from tests.lifecycle.helpers import ingest_lesions, lesion_pair, train_version, write_lesions
from tests.makers import png_bytes

TRAIN, BENCH = list(range(32)), list(range(200, 216))
# the module's models are trained once per location; on a shared 2-core machine that alone can
# take minutes
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module", params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def world(request, tmp_path_factory):
    """Two versions on one models URL: ``good`` (true masks) and ``bad`` (shuffled masks)."""
    if request.param == "local":
        loc = Location("local", str(tmp_path_factory.mktemp("gate")), StorageOptions())
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        loc = Location(
            "s3", f"s3://{make_bucket(endpoint)}/g", StorageOptions(endpoint_url=endpoint)
        )
    good = ingest_lesions(loc, "good", TRAIN)
    bad = ingest_lesions(loc, "bad", TRAIN, shuffle=True)
    models = loc.url("models")
    # batches of 4: 4 steps an epoch, enough for "good" to learn where the box is
    train_version(models, "good", good, loc.storage, epochs=8, fold_ids=[0], batch_size=4)
    train_version(models, "bad", bad, loc.storage, epochs=8, fold_ids=[0], batch_size=4)
    bench_raw = loc.store("bench")
    write_lesions(bench_raw, BENCH)
    gate = GateConfig(benchmark=bench_raw.url, tta="none", bootstrap=500)
    bench = prepare_benchmark(gate, models, good, loc.storage)
    return {"loc": loc, "models": models, "good": good, "bad": bad, "gate": gate, "bench": bench}


def _set_production(w, *vids: str) -> None:
    """A fresh alias history promoting ``vids`` in order (the module's tests share the models
    URL, and a version a person demoted in an earlier test is never re-promoted by the gate)."""
    models = Store(w["models"], w["loc"].storage)
    if models.exists("versions/history"):
        models.delete("versions/history", recursive=True)
    for vid in vids:
        move_production(w["models"], vid, "promote", "test set-up", "test", w["loc"].storage)


def _gate(w, challenger: str, **changes) -> dict:
    gate = w["gate"].model_copy(update=changes)
    st = w["loc"].storage
    res = evaluate_gate(gate, w["models"], challenger, w["bench"], "none", st)
    return apply_gate(w["models"], challenger, res.record, st).record


def test_worse_challenger_is_refused_and_production_stays(world):
    _set_production(world, "good")
    events = len(read_history(world["models"], world["loc"].storage))
    record = _gate(world, "bad")
    assert record["decision"] == "not promoted" and not record["promote"], record["reason"]
    assert (
        "challenger thresholded Jaccard" in record["reason"]
        and "< champion good" in record["reason"]
    )
    assert (
        record["challenger_scores"]["thresholded_jaccard"]
        < record["champion_scores"]["thresholded_jaccard"]
    )
    lo, hi = record["paired"]["ci"]
    assert lo <= record["paired"]["mean_difference"] <= hi < 0  # clearly worse, paired
    assert len(record["per_image"]) == len(BENCH)
    assert {"id", "challenger", "champion", "diff"} <= set(record["per_image"][0])
    st = world["loc"].storage
    assert read_aliases(world["models"], st)[PRODUCTION] == "good"
    assert len(read_history(world["models"], st)) == events  # nothing moved
    saved = Store(world["models"], st).read_json("versions/bad.json")["gate"]
    assert saved["decision"] == "not promoted" and saved["benchmark"]["content_hash"]


def test_better_challenger_is_promoted(world):
    _set_production(world, "bad")
    record = _gate(world, "good")
    assert record["decision"] == "promoted", record["reason"]
    st = world["loc"].storage
    aliases = read_aliases(world["models"], st)
    assert (aliases[PRODUCTION], aliases["previous"]) == ("good", "bad")
    last = read_history(world["models"], st)[-1]
    assert (last.version, last.action, last.reason) == ("good", "gate", record["reason"])


def test_manual_mode_never_promotes(world):
    _set_production(world, "bad")
    record = _gate(world, "good", mode="manual")
    assert record["decision"] == "not promoted" and "gate.mode manual" in record["reason"]
    assert read_aliases(world["models"], world["loc"].storage)[PRODUCTION] == "bad"


def test_rollback_then_predict_uses_previous(world, tmp_path: Path, caplog):
    from segflow.cli import app

    st = world["loc"].storage
    _set_production(world, "good", "bad")
    ep = ["--endpoint-url", st.endpoint_url] if st.endpoint_url else []
    runner = CliRunner()
    res = runner.invoke(
        app, ["models", "rollback", "--models", world["models"], "--reason", "bad masks", *ep]
    )
    assert res.exit_code == 0, res.output
    assert read_aliases(world["models"], st)[PRODUCTION] == "good"
    with caplog.at_level(logging.INFO, logger="segflow.versions"):
        res = runner.invoke(
            app,
            [
                "predict",
                "--models",
                world["models"],
                "--dataset",
                world["bench"].url,
                "--out",
                world["loc"].url("pred-after-rollback"),
                "--executor",
                "inline",
                "--tta",
                "none",
                "--json",
                *ep,
            ],
        )
    assert res.exit_code == 0, res.output
    assert "production -> good" in caplog.text
    # the masks' identity record names the model folder they came from
    identity = Store(world["loc"].url("pred-after-rollback"), st).read_json("_shards/identity.json")
    assert identity["models"].rstrip("/").endswith("runs/good")


def test_benchmark_sharing_training_pixels_is_refused(world):
    loc = world["loc"]
    raw = loc.store("leaky-bench")
    # training image 3 under another file name: the pixels, not the names, give it away
    write_lesions(raw, [3, 201], names=[999, 201])
    gate = GateConfig(benchmark=raw.url)
    with pytest.raises(
        BenchmarkError, match=r"shares 1 image.*ISIC_0000999 = training ISIC_0000003"
    ):
        prepare_benchmark(gate, world["models"], world["good"], loc.storage)


def test_warm_start_loads_the_champion(world):
    """Fold 0 from production ("good") versus a cold start, one epoch each on the same data
    with a small learning rate: the warm start's first validation loss is where the champion
    ended, far below the cold one's (a fresh Adam at a large rate would first shake the loaded
    weights)."""
    st = world["loc"].storage
    _set_production(world, "good")
    losses = {}
    for name, init in (("cold", "none"), ("warm", "production")):
        out = train_version(
            world["models"],
            f"ws-{name}",
            world["good"],
            st,
            epochs=1,
            fold_ids=[0],
            init_from=init,
            init_models=world["models"],
            lr=1e-4,
        )
        assert out["cfg"].init_from == init
        losses[name] = _first_val_loss(Store(out["cfg"].models, st))
    champion = min(_val_losses(Store(f"{world['models']}/runs/good", st)))
    assert losses["warm"] < 0.7 * losses["cold"], losses
    assert losses["warm"] < champion + 0.1, (losses, champion)


def test_warm_start_pins_hashes_and_checks_the_architecture(world):
    from segflow.train import TrainConfig
    from segflow.train.loop import fit_fold
    from segflow.train.run import prepare_run

    st, models = world["loc"].storage, world["models"]
    base = {"dataset": world["good"], "storage": st, "init_models": models}
    _set_production(world, "good")
    pinned = pin_init(TrainConfig(models=world["loc"].url("x"), init_from="production", **base))
    assert pinned.init_from == "good"  # every fold starts from the same version
    h_good = init_hash(pinned)
    _set_production(world, "bad")
    h_bad = init_hash(
        pin_init(TrainConfig(models=world["loc"].url("x"), init_from="production", **base))
    )
    assert h_good and h_bad and h_good != h_bad  # new weights behind "production": a new run key
    assert init_hash(TrainConfig(models=world["loc"].url("x"), **base)) is None
    cfg = TrainConfig(
        models=world["loc"].url("wrong-arch"),
        init_from="good",
        encoder="resnet34",
        encoder_depth=3,
        decoder_channels=[32, 16, 8],
        folds=2,
        size=(32, 32),
        epochs=1,
        **base,
    )
    prepare_run(cfg)
    with pytest.raises(WarmStartError, match=r"Unet/resnet18, depth 3 model.*Unet/resnet34"):
        fit_fold(cfg, 0)


def test_train_cli_init_from_flag(world, tmp_path: Path, caplog):
    """`segflow train --init-from production --init-models URL` warm-starts from the
    production version (pinned to its id in train_config.json); a bad value is a clear error."""
    import yaml

    from segflow.cli import app

    st = world["loc"].storage
    _set_production(world, "good")
    ep = ["--endpoint-url", st.endpoint_url] if st.endpoint_url else []
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"encoder_depth": 3, "decoder_channels": [32, 16, 8]}))
    run = world["loc"].url("cli-warm")
    args = ["train", "--config", str(tiny), "--dataset", world["good"], "--models", run]
    args += ["--encoder", "resnet18", "--size", "32", "32", "--epochs", "1", "--fold-ids", "0"]
    args += ["--batch-size", "8", "--executor", "inline", "--json", *ep]
    runner = CliRunner()
    with caplog.at_level(logging.INFO, logger="segflow.train"):
        res = runner.invoke(
            app, [*args, "--init-from", "production", "--init-models", world["models"]]
        )
    assert res.exit_code == 0, res.output
    assert "fold 0: warm start from good fold 0" in caplog.text
    assert Store(run, st).read_json("train_config.json")["init_from"] == "good"
    res = runner.invoke(app, [*args, "--overwrite", "--init-from", "no-such-version"])
    assert res.exit_code != 0 and "init_from 'no-such-version'" in str(res.exception or "")


def test_decision_rule_and_bootstrap():
    gate = GateConfig(benchmark="x", margin=0.02, min_score=0.3)
    assert decide(gate, 0.70, 0.71, "v1")[0]  # within the margin
    ok, why = decide(gate, 0.68, 0.71, "v1", (-0.05, -0.01))
    assert not ok and "0.6800 < champion v1 0.7100 - gate.margin 0.0200" in why and "CI" in why
    assert decide(gate, 0.31, None, None) == (True, decide(gate, 0.31, None, None)[1])
    ok, why = decide(gate, 0.30, None, None)
    assert not ok and "first version" in why
    lo, hi = bootstrap_ci([0.1] * 10 + [0.0] * 10, n=1000, seed=1)
    assert 0.0 < lo < 0.05 < hi < 0.1


def _val_losses(run: Store) -> list[float]:
    rows = list(csv.DictReader(io.StringIO(run.read_bytes("fold-0/metrics.csv").decode())))
    key = next(k for k in rows[0] if "val" in k and "loss" in k)  # however it is named
    return [float(r[key]) for r in rows]


def _first_val_loss(run: Store) -> float:
    return _val_losses(run)[0]


def test_a_benchmark_is_frozen_by_content_hash(location):
    from segflow.ingest import IngestConfig, ingest

    train = ingest_lesions(location, "train", [0, 1, 2, 3])
    raw = location.store("bench-raw")
    write_lesions(raw, [300, 301, 302])
    bench = location.url("bench.zarr")
    icfg = IngestConfig(
        layout="isic",
        source=raw.url,
        dataset=bench,
        size=(32, 32),
        storage=location.storage,
        workers=1,
    )
    ingest(icfg)
    gate = GateConfig(benchmark=bench)
    models = location.url("models")
    first = prepare_benchmark(gate, models, train, location.storage)
    assert first.n_images == 3 and prepare_benchmark(gate, models, train, location.storage) == first
    write_lesions(raw, [303])  # someone adds an image to the yardstick
    ingest(icfg)
    with pytest.raises(BenchmarkError, match=r"changed since it was frozen on .*: its content"):
        prepare_benchmark(gate, models, train, location.storage)


def test_a_raw_benchmark_is_frozen_by_images_and_truth(location):
    """Raw images with their truth in another folder: a changed image, or only a fixed truth
    mask, is a changed benchmark, refused (not silently frozen anew under a new derived URL);
    the check-benchmark cache key moves with the truth's listing too."""
    from segflow.tasks.gate import _bench_key

    train = ingest_lesions(location, "train", [0, 1, 2, 3])
    images, truth = location.store("bench-img"), location.store("bench-truth")
    write_lesions(images, [300, 301, 302])
    for f in images.list(pattern="*_segmentation.png"):  # the truth lives in its own folder
        truth.write_bytes(f.rel, images.read_bytes(f.rel))
        images.delete(f.rel)
    gate = GateConfig(benchmark=images.url, truth=truth.url)
    models = location.url("models")
    first = prepare_benchmark(gate, models, train, location.storage)
    assert first.n_images == 3 and prepare_benchmark(gate, models, train, location.storage) == first

    class _DS:  # the task key needs only the training dataset's hash
        hash = "d"

    key = _bench_key(gate, models, _DS(), location.storage)
    _, mask = lesion_pair(999)  # someone "fixes" one truth mask: same images, other truth
    truth.write_bytes("ISIC_0000301_segmentation.png", png_bytes(mask))
    assert _bench_key(gate, models, _DS(), location.storage) != key
    with pytest.raises(BenchmarkError, match=r"with truth .* changed since it was frozen") as err:
        prepare_benchmark(gate, models, train, location.storage)
    assert first.content_hash[:12] in str(err.value) and "new URL" in str(err.value)
    truth.write_bytes("ISIC_0000301_segmentation.png", png_bytes(lesion_pair(301)[1]))
    assert prepare_benchmark(gate, models, train, location.storage).content_hash == (
        first.content_hash
    )  # restored: the frozen content again
    write_lesions(images, [303])  # an image added, its mask in the truth folder
    truth.write_bytes(
        "ISIC_0000303_segmentation.png", images.read_bytes("ISIC_0000303_segmentation.png")
    )
    images.delete("ISIC_0000303_segmentation.png")
    with pytest.raises(BenchmarkError, match="changed since it was frozen"):
        prepare_benchmark(gate, models, train, location.storage)


def test_concurrent_first_freezes_agree(location):
    """Two runs freeze the same benchmark source at once with different contents: one object
    per source, created exclusively (never a shared file rewritten): exactly one wins, the
    other is refused, and two other sources frozen at the same moment are both kept."""
    import threading

    from segflow.gate import Benchmark, freeze

    models = location.url("models")
    source = {"benchmark": "s3://b/bench", "truth": None}
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(4)

    def run(name: str, content: str, src: dict) -> None:
        barrier.wait()
        try:
            outcomes[name] = freeze(
                Benchmark(f"u-{name}", content, 3), src, models, location.storage
            )
        except BenchmarkError as e:
            outcomes[name] = e

    threads = [
        threading.Thread(target=run, args=("a", "a" * 64, source)),
        threading.Thread(target=run, args=("b", "b" * 64, source)),
        threading.Thread(target=run, args=("c", "c" * 64, {"benchmark": "other"})),
        threading.Thread(target=run, args=("d", "d" * 64, {"benchmark": "third"})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for n in "ab" if isinstance(outcomes[n], dict)]
    assert len(won) == 1, outcomes
    lost = "b" if won == ["a"] else "a"
    assert isinstance(outcomes[lost], BenchmarkError)
    assert outcomes[won[0]]["content_hash"] == won[0] * 64
    for n in "cd":  # each other source was frozen, and stays frozen
        assert outcomes[n]["content_hash"] == n * 64
        with pytest.raises(BenchmarkError):
            freeze(
                Benchmark("x", "e" * 64, 3),
                {"benchmark": {"c": "other", "d": "third"}[n]},
                models,
                location.storage,
            )


def test_bootstrap_is_chunked_with_the_same_result(monkeypatch):
    """The resamples are drawn in bounded chunks: the same interval as one (n, N) draw for the
    same seed, and memory that does not grow with bootstrap x N."""
    import tracemalloc

    import numpy as np

    import segflow.gate as gate_mod

    diff = np.random.default_rng(5).normal(0.01, 0.1, size=37)  # an odd N: odd chunk sizes
    rng = np.random.default_rng(3)
    means = diff[rng.integers(0, diff.size, size=(1001, diff.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    one_draw = (round(float(lo), 6), round(float(hi), 6))
    monkeypatch.setattr(gate_mod, "_BOOTSTRAP_CHUNK", 37 * 7, raising=False)  # 7 resamples a chunk
    assert bootstrap_ci(diff, n=1001, seed=3) == one_draw
    monkeypatch.undo()
    assert bootstrap_ci(diff, n=1001, seed=3) == one_draw

    big = np.random.default_rng(6).normal(0.0, 0.1, size=200_000)
    tracemalloc.start()
    try:
        bootstrap_ci(big, n=200, seed=0)  # one draw: 200 x 200,000 x 8 B = 320 MB of indices
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
