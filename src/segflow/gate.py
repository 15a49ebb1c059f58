"""The champion-challenger gate: a retrained model reaches production only when it is not worse
than the current one on a frozen benchmark.

* The benchmark (``gate.benchmark``) is an ingested dataset, or raw images plus truth masks
  that are ingested once into ``<models>/benchmarks/<hash>.zarr`` with the training dataset's
  geometry. It is versioned by its content hash (images and truth) and frozen: the first
  content seen under a benchmark source (its URL; for raw images also the truth URL, layout
  and geometry) is recorded under ``benchmarks/frozen/``, and a source whose content changed
  is refused (:func:`freeze`).
* Training refuses a benchmark that shares images with the training dataset, compared by the
  hash of the decoded pixels (and of the source bytes), never by file name.
* Challenger and champion are scored on the benchmark with the same settings (the config's
  TTA; each version's own out-of-fold threshold and post-processing), image by image; a paired
  bootstrap gives a confidence interval of the mean difference in thresholded Jaccard.
* The rule: promote when challenger >= champion - ``margin``; the first version when it beats
  ``min_score``; ``mode: manual`` records the evaluation and never promotes.

Maths and decisions are plain functions; the flow's gate task (tasks/gate.py) calls
:func:`evaluate_gate` then :func:`apply_gate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segflow.config import format_validation_error
from segflow.dataset import Dataset, open_group
from segflow.errors import ConfigError
from segflow.storage import StorageOptions, Store, sha256_json
from segflow.versions import (
    PRODUCTION,
    ModelVersion,
    blocked_by,
    move_production,
    read_aliases,
    read_history,
    resolve_version,
    took_effect,
    update_record,
)

log = logging.getLogger("segflow.gate")
FROZEN = "benchmarks/frozen"  # one object per benchmark source, created once
LEGACY = "benchmarks/frozen.json"  # written by earlier versions: read, never written
PROMOTED, NOT_PROMOTED, NOT_GATED = "promoted", "not promoted", "not gated"
_MEANS = ("dice", "jaccard", "thresholded_jaccard")
_BOOTSTRAP_CHUNK = 1 << 20  # resampled indices held at once (8 MiB, and as much for values)


class GateConfig(BaseModel):
    """``config.gate`` of train_flow / pipeline_flow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    benchmark: str | None = Field(None, description="URL: ingested dataset, or raw images")
    truth: str | None = Field(None, description="masks of raw benchmark images (default: beside)")
    layout: Literal["isic", "nerve", "folder"] = "isic"
    margin: float = Field(0.0, ge=0, le=1, description="tolerated drop in thresholded Jaccard")
    min_score: float = Field(0.0, ge=0, le=1, description="the first version must beat this")
    mode: Literal["auto", "manual"] = "auto"
    tta: Literal["d4", "flips", "none"] | None = Field(None, description="default: predict.tta")
    bootstrap: int = Field(2000, ge=100, le=100_000)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)

    @classmethod
    def parse(cls, data: dict[str, Any] | None) -> GateConfig:
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error("config.gate", e)) from None


class BenchmarkError(ConfigError):
    """The benchmark cannot be used: missing masks, changed content, or shared with training."""


@dataclass(frozen=True)
class Benchmark:
    url: str
    content_hash: str
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the benchmark --------------------------------------------------------------------------------
def prepare_benchmark(
    gate: GateConfig, models_url: str, train_dataset: str, storage: StorageOptions | None = None
) -> Benchmark:
    """The benchmark as an ingested dataset, checked, frozen, and disjoint from training."""
    if not gate.benchmark:
        raise ConfigError("config.gate.benchmark is not set; the gate needs a benchmark URL")
    url, source = _as_dataset(gate, models_url, train_dataset, storage)
    ds = Dataset(Store(url, storage))
    if "masks" not in ds.group or not ds.column("has_mask").all():
        missing = int((~ds.column("has_mask")).sum()) if "has_mask" in ds.group else ds.n
        raise BenchmarkError(
            f"benchmark {url}: {missing} of {ds.n} images have no truth mask; every benchmark "
            "image needs one (give gate.truth for raw images whose masks live elsewhere)"
        )
    bench = Benchmark(url, str(ds.attrs["content_hash"]), ds.n)
    freeze(bench, source, models_url, storage)
    check_overlap(bench.url, train_dataset, models_url, storage)
    return bench


def benchmark_listing(gate: GateConfig, storage: StorageOptions | None = None) -> list[str]:
    """What the benchmark is made of now: the listing (names and fingerprints) of its images
    and of its truth masks (``gate.truth``; beside the images by default, then in the first)."""
    from segflow.pipeline.keys import listing_hash

    listing = [listing_hash(Store(str(gate.benchmark), storage))]
    return listing + ([listing_hash(Store(gate.truth, storage))] if gate.truth else [])


def _as_dataset(
    gate: GateConfig, models_url: str, train_dataset: str, storage: StorageOptions | None
) -> tuple[str, dict[str, Any]]:
    """The ingested benchmark's URL, and the source it is frozen under: the URL itself for an
    ingested dataset; for raw images, their URL, the truth's, the layout and the geometry (a
    raw benchmark ingested at another size is another benchmark)."""
    store = Store(str(gate.benchmark), storage)
    if store.exists("zarr.json"):  # already an ingested dataset
        return store.url, {"benchmark": store.url}
    from segflow.ingest import IngestConfig, ingest

    train = Dataset(Store(train_dataset, storage))
    geometry = [list(train.size), train.resize]
    key = sha256_json([benchmark_listing(gate, storage), gate.layout, *geometry])[:16]
    url = Store(models_url, storage).uri(f"benchmarks/{key}.zarr")
    cfg = IngestConfig(
        layout=gate.layout,
        source=store.url,
        masks=gate.truth,
        dataset=url,
        size=tuple(train.size),
        resize=train.resize,
        storage=storage or StorageOptions(),
        require_masks=True,
    )
    res = ingest(cfg)
    if res.n_images == 0:
        raise BenchmarkError(f"benchmark {gate.benchmark}: no usable image with a mask found")
    truth = Store(gate.truth, storage).url if gate.truth else None
    return url, {
        "benchmark": store.url,
        "truth": truth,
        "layout": gate.layout,
        "size": geometry[0],
        "resize": geometry[1],
    }


def freeze(
    bench: Benchmark,
    source: dict[str, Any],
    models_url: str,
    storage: StorageOptions | None = None,
) -> dict[str, Any]:
    """A benchmark keeps its content: the first content seen for ``source`` is frozen, and a
    different content later (an image added, a truth mask fixed) is refused, loudly, because a
    moved yardstick makes the gate sections of earlier versions incomparable.

    One object per benchmark source, ``benchmarks/frozen/<source key>.json``, created once and
    exclusively (never a shared file read, modified and rewritten): of two runs freezing at
    once, exactly one creates it and both compare against what it holds. Returns that record."""
    root = Store(models_url, storage)
    rel = f"{FROZEN}/{sha256_json(source)[:16]}.json"
    if not root.exists(rel):
        legacy = root.read_json(LEGACY) if root.exists(LEGACY) else {}
        was = legacy.get(bench.url) or {}  # frozen.json of earlier versions, keyed by URL
        record = {
            "source": source,
            "url": bench.url,
            "content_hash": was.get("content_hash") or bench.content_hash,
            "n_images": was.get("n_images") or bench.n_images,
            "frozen_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if _create_once(root, rel, record):
            log.info(
                "benchmark %s frozen: content %s, %d images (%s)",
                source["benchmark"],
                record["content_hash"][:12],
                record["n_images"],
                root.uri(rel),
            )
    frozen = root.read_json(rel)
    if frozen["content_hash"] != bench.content_hash:
        truth = f" with truth {source['truth']}" if source.get("truth") else ""
        raise BenchmarkError(
            f"benchmark {source['benchmark']}{truth} changed since it was frozen on "
            f"{frozen['frozen_at']}: its content hash was {frozen['content_hash'][:12]} "
            f"({frozen['n_images']} images), now {bench.content_hash[:12]} ({bench.n_images} "
            "images). A benchmark is a fixed yardstick: scores on other content are not "
            "comparable with the gate sections already recorded. Put the new benchmark at a new "
            f"URL and set gate.benchmark to it, or delete {root.uri(rel)} deliberately to "
            "freeze the new content under this URL"
        )
    return frozen


def _create_once(root: Store, rel: str, obj: Any) -> bool:
    """Write ``rel`` only when nothing is there (True), atomically and exclusively: locally a
    hard link of a finished temporary file, on S3 a conditional PUT (If-None-Match)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    target = root.path(rel)
    try:
        if root.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)  # fails when the target exists, never replaces it
            finally:
                os.unlink(tmp)
        else:
            root.fs.pipe_file(target, data, mode="create")
    except FileExistsError:
        return False
    return True


def pixel_hashes(url: str, storage: StorageOptions | None = None) -> dict[str, str]:
    """``{sha256 of the decoded frame: image id}``, plus the source-byte hashes."""
    ds = Dataset(Store(url, storage))
    images = ds.group["images"]
    ids = ds.ids
    out = {}
    for i in range(ds.n):
        out["px:" + hashlib.sha256(np.ascontiguousarray(images[i]).tobytes()).hexdigest()] = ids[i]
    for i, h in enumerate(ds.column("content_hashes")):
        if h:
            out[f"src:{h}"] = ids[i]
    return out


def check_overlap(
    benchmark: str, train_dataset: str, models_url: str, storage: StorageOptions | None = None
) -> None:
    """Refuse a benchmark that shares images with the training data (a model scored on images
    it learned from would look better than it is)."""
    bench = pixel_hashes(benchmark, storage)
    train = _cached_pixel_hashes(train_dataset, models_url, storage)
    shared = sorted(set(bench) & set(train))
    if shared:
        pairs = sorted({(bench[h], train[h]) for h in shared})
        shown = ", ".join(f"{b} = training {t}" for b, t in pairs[:5])
        raise BenchmarkError(
            f"the benchmark {benchmark} shares {len(pairs)} image(s) with the training dataset "
            f"{train_dataset} (same pixels): {shown}{' ...' if len(pairs) > 5 else ''}. Remove "
            "them from the training data, or use a benchmark of images never trained on"
        )


def _cached_pixel_hashes(url: str, models_url: str, storage: StorageOptions | None) -> dict:
    """The training dataset's hashes, kept under ``<models>/benchmarks/pixels/`` by content
    hash: a retrain on the same data does not re-read every image."""
    content = str(open_group(Store(url, storage), "r").attrs.get("content_hash", ""))
    root = Store(models_url, storage)
    rel = f"benchmarks/pixels/{content[:32]}.json"
    if content and root.exists(rel):
        return root.read_json(rel)
    hashes = pixel_hashes(url, storage)
    if content:
        root.write_json(rel, hashes, durable=False)
    return hashes


# -- scoring --------------------------------------------------------------------------------------
@dataclass
class VersionScores:
    version: str
    threshold: float
    postprocess: str
    per_image: dict[str, list[float]]  # metric -> one score per benchmark image
    masks: np.ndarray = field(repr=False)  # (N, H, W) bool, for the disagreement grid

    def means(self) -> dict[str, float]:
        return {k: round(float(np.mean(v)), 6) for k, v in self.per_image.items()}


def score_version(
    version: ModelVersion,
    benchmark: str,
    tta: str,
    storage: StorageOptions | None = None,
    batch_size: int = 8,
) -> VersionScores:
    """Every benchmark image through ``version``'s ensemble with ``tta``, thresholded and
    post-processed by the version's own out-of-fold choice, scored against the truth."""
    import torch

    from segflow.masks import postprocess
    from segflow.metrics import per_image_scores
    from segflow.predict.ensemble import load_ensemble

    choice = version.record.get("choice") or Store(version.models, storage).read_json(
        "postprocess.json"
    )
    threshold, method = float(choice["threshold"]), str(choice["postprocess"])
    ensemble = load_ensemble(Store(version.models, storage), None)
    ds = Dataset(Store(benchmark, storage))
    images, truths = ds.group["images"], ds.group["masks"]
    masks, scores = [], {k: [] for k in _MEANS}
    for start in range(0, ds.n, batch_size):
        stop = min(ds.n, start + batch_size)
        probs = ensemble.predict(np.ascontiguousarray(images[start:stop]), tta)
        pred = np.stack([postprocess(p >= threshold, method) for p in probs]).astype(bool)
        truth = np.asarray(truths[start:stop]) > 0
        s = per_image_scores(torch.from_numpy(pred), torch.from_numpy(truth))
        for k in _MEANS:
            scores[k] += [round(float(x), 6) for x in s[k]]
        masks.append(pred)
    return VersionScores(version.id, threshold, method, scores, np.concatenate(masks))


def bootstrap_ci(
    diff: np.ndarray, n: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences ``diff``."""
    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # resamples in chunks of about _BOOTSTRAP_CHUNK indices: memory stays bounded for a large
    # benchmark, and drawing the same stream row by row gives the same means as one big draw
    rows = max(1, _BOOTSTRAP_CHUNK // diff.size)
    means = np.empty(n, dtype=np.float64)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        means[start : start + k] = diff[rng.integers(0, diff.size, size=(k, diff.size))].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return round(float(lo), 6), round(float(hi), 6)


def decide(
    gate: GateConfig,
    challenger: float,
    champion: float | None,
    champion_id: str | None,
    ci: tuple[float, float] | None = None,
) -> tuple[bool, str]:
    """(promote?, why) by the configured rule, on benchmark thresholded Jaccard."""
    if champion is None:
        ok = challenger > gate.min_score
        op = ">" if ok else "<="
        why = (
            f"first version: benchmark thresholded Jaccard {challenger:.4f} {op} "
            f"gate.min_score {gate.min_score:.4f}"
        )
    else:
        bar = champion - gate.margin
        ok = challenger >= bar
        op = ">=" if ok else "<"
        interval = f"; mean difference 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
        why = (
            f"challenger thresholded Jaccard {challenger:.4f} {op} champion {champion_id} "
            f"{champion:.4f} - gate.margin {gate.margin:.4f}{interval}"
        )
    if gate.mode == "manual":
        return False, f"gate.mode manual: never promotes on its own (rule says: {why})"
    return ok, why


@dataclass
class GateResult:
    record: dict[str, Any]  # the ``gate`` section of the version record
    disagreement_png: bytes | None = None


def evaluate_gate(
    gate: GateConfig,
    models_url: str,
    challenger_id: str,
    bench: Benchmark,
    tta: str = "flips",
    storage: StorageOptions | None = None,
) -> GateResult:
    """Score the challenger and the current champion on the benchmark and decide."""
    tta = gate.tta or tta
    challenger = resolve_version(models_url, challenger_id, storage)
    champion_id = read_aliases(models_url, storage).get(PRODUCTION)
    mine = score_version(challenger, bench.url, tta, storage, gate.batch_size)
    ids = Dataset(Store(bench.url, storage)).ids
    record: dict[str, Any] = {
        "benchmark": bench.to_dict(),
        "tta": tta,
        "mode": gate.mode,
        "margin": gate.margin,
        "min_score": gate.min_score,
        "champion": champion_id,
        "challenger_scores": {
            **mine.means(),
            "threshold": mine.threshold,
            "postprocess": mine.postprocess,
        },
    }
    png = None
    if champion_id == challenger_id:
        record.update(
            decision=NOT_PROMOTED, promote=False, reason=f"{challenger_id} is already production"
        )
        return GateResult(record)
    champ_scores, ci = None, None
    if champion_id:
        champ = score_version(
            resolve_version(models_url, champion_id, storage),
            bench.url,
            tta,
            storage,
            gate.batch_size,
        )
        diff = np.subtract(
            mine.per_image["thresholded_jaccard"], champ.per_image["thresholded_jaccard"]
        )
        ci = bootstrap_ci(diff, gate.bootstrap, gate.confidence, gate.seed)
        champ_scores = champ.means()
        record["champion_scores"] = {
            **champ_scores,
            "threshold": champ.threshold,
            "postprocess": champ.postprocess,
        }
        record["paired"] = {
            "metric": "thresholded_jaccard",
            "mean_difference": round(float(diff.mean()), 6),
            "ci": list(ci),
            "confidence": gate.confidence,
            "bootstrap": gate.bootstrap,
            "n_better": int((diff > 0).sum()),
            "n_worse": int((diff < 0).sum()),
        }
        record["per_image"] = [
            {"id": i, "challenger": a, "champion": b, "diff": round(a - b, 6)}
            for i, a, b in zip(
                ids,
                mine.per_image["thresholded_jaccard"],
                champ.per_image["thresholded_jaccard"],
                strict=True,
            )
        ]
        png = disagreement_grid(bench.url, mine.masks, champ.masks, storage)
    else:
        record["per_image"] = [
            {"id": i, "challenger": a}
            for i, a in zip(ids, mine.per_image["thresholded_jaccard"], strict=True)
        ]
    promote, why = decide(
        gate,
        mine.means()["thresholded_jaccard"],
        champ_scores["thresholded_jaccard"] if champ_scores else None,
        champion_id,
        ci,
    )
    record.update(decision=PROMOTED if promote else NOT_PROMOTED, promote=promote, reason=why)
    return GateResult(record, png)


@dataclass(frozen=True)
class AppliedGate:
    aliases: dict[str, Any]  # the aliases afterwards
    record: dict[str, Any]  # the ``gate`` section as saved (decision as it ended)


def apply_gate(
    models_url: str,
    challenger_id: str,
    record: dict[str, Any],
    storage: StorageOptions | None = None,
) -> AppliedGate:
    """Write the ``gate`` section into the version record (not when the challenger already is
    production: that version keeps the section of the evaluation that promoted it) and, when
    the decision is to
    promote, move production (one history event, compare-and-swap on ``record["champion"]``).
    A promotion is turned down, and the record says why, when a person took the challenger
    out of production (a rollback, or a manual promotion of another version): a retrain that
    rebuilds the same version id must not undo it. Also when production moved during the
    evaluation: the replay ignores a gate event whose champion is no longer production."""
    record = dict(record)
    aliases: dict[str, Any] | None = None
    if record.get("promote"):
        blocker = blocked_by(read_history(models_url, storage), challenger_id)
        if blocker is not None:
            how = "rolled back" if blocker.action == "rollback" else "demoted by hand"
            _refuse(
                record,
                f"{challenger_id} was {how} on {blocker.at} ({blocker.reason}); promote it by "
                "hand with `segflow models promote`",
            )
        else:
            moved = move_production(
                models_url,
                challenger_id,
                "gate",
                record["reason"],
                storage=storage,
                seen=record.get("champion"),
            )
            if took_effect(read_history(models_url, storage), moved["event"]):
                aliases = moved
            else:
                now = read_aliases(models_url, storage).get(PRODUCTION)
                _refuse(record, f"production moved to {now} during evaluation")
    if record.get("champion") != challenger_id:
        update_record(models_url, challenger_id, storage, gate=record)
    # else: the production version evaluated again (a rerun, a retrain that rebuilt the same
    # version): not a challenger evaluation. Its gate section stays the one that promoted it
    if aliases is None:
        aliases = read_aliases(models_url, storage)
    log.info("gate: %s %s: %s", challenger_id, record["decision"], record["reason"])
    return AppliedGate({k: v for k, v in aliases.items() if k != "event"}, record)


def _refuse(record: dict[str, Any], why: str) -> None:
    record.update(
        decision=NOT_PROMOTED,  # the state message reads "not promoted: <why>"
        promote=False,
        reason=f"{why} (the evaluation said: {record['reason']})",
    )


def disagreement_grid(
    benchmark: str,
    a: np.ndarray,
    b: np.ndarray,
    storage: StorageOptions | None = None,
    n: int = 8,
    cols: int = 4,
) -> bytes:
    """The ``n`` benchmark images where the two models' masks differ most (pixels in one mask
    and not the other): each image twice, challenger then champion, the truth outlined."""
    from segflow.pipeline.report import _grid, _overlay, _png

    ds = Dataset(Store(benchmark, storage))
    differ = (a ^ b).reshape(len(a), -1).sum(1)
    rows = [int(i) for i in np.argsort(-differ, kind="stable")[:n]]
    tiles = []
    for r in rows:
        image, truth = ds.group["images"][r], ds.group["masks"][r] > 0
        tiles += [_overlay(image, truth, a[r]), _overlay(image, truth, b[r])]
    return _png(_grid(tiles, cols))
