"""Which config a fold's saved state belongs to.

A fold folder (checkpoints, metrics, ``fold.complete.json``) is only worth resuming or
skipping when it was trained with the config asked for now. Each fold therefore records the
fields that determine its weights in ``fold-k/train_config.json`` before it writes anything
else, and every later run compares against that record: a finished resnet18 fold must never
stand in for a requested resnet34 one.

A fold trained before that record existed has only its ``config.json`` (its ModelSpec), so only
the network can be compared: its epochs, lr, loss or seed are unknown. Its record then holds
those ModelSpec fields and ``"legacy": true``, never the whole config, which it was not checked
against; later runs compare such a fold on those fields alone.
"""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING, Any

from segflow.errors import ConfigError
from segflow.storage import Store
from segflow.train.config import TrainConfig
from segflow.train.model import ModelSpec
from segflow.train.plan import default_size, recorded
from segflow.train.splits import SPLITS

if TYPE_CHECKING:  # only its size and resize policy are read
    from segflow.dataset import Dataset

log = logging.getLogger("segflow.train")

RECORD = "train_config.json"  # in each fold folder, and the whole config at the models root
SPEC = "config.json"  # the fold's ModelSpec
LEGACY = "legacy"  # in a fold record: only the ModelSpec fields beside it were checked
#: what a models location holds from one training run; ``--overwrite`` removes these
TRAINING_FILES = (
    SPLITS,
    "oof.zarr",
    RECORD,
    "train_summary.json",
    "oof_scores.json",
    "postprocess.json",  # predict.postprocess.CHOICE_FILE, chosen on the old OOF
)

Differences = dict[str, tuple[Any, Any]]  # field -> (saved value, requested value)
#: what the network is built with but derived, not a config field: ``size=None`` means
#: ``default_size`` of the day, ``encoder_weights="auto"`` the encoder's packaged weights, so
#: equal config fields may still build another network than the fold's saved config.json
DERIVED = ("input_size", "encoder_weights")


class ConfigMismatchError(ConfigError):
    """A models location holds folds trained with another config than the one asked for."""

    def __init__(self, models: str, folds: dict[str, Differences]) -> None:
        self.models, self.folds = models, folds
        fields: Differences = {}
        for diff in folds.values():
            for name, pair in diff.items():
                fields.setdefault(name, pair)
        lines = [
            f"{models} holds {', '.join(sorted(folds))} trained with a different config; "
            "they can be neither resumed nor skipped. Fields that differ (saved -> asked):"
        ]
        lines += [f"  {name}: {saved!r} -> {asked!r}" for name, (saved, asked) in fields.items()]
        lines.append(
            "Either train into a new models location (--models NEW_URL), or pass --overwrite "
            "to delete that training (folds, split, out-of-fold array) and train afresh."
        )
        super().__init__("\n".join(lines))


def fold_record(cfg: TrainConfig) -> dict[str, Any]:
    """The fields that decide a fold's weights: everything but how it runs and ``models``
    (the record lives there: a location copied to a new URL still holds the same folds)."""
    skip = cfg.runtime_fields | {"models"}
    return {k: v for k, v in cfg.public_dict().items() if k not in skip}


def model_spec(cfg: TrainConfig, dataset: Dataset) -> ModelSpec:
    """The network ``cfg`` asks for on ``dataset``."""
    return ModelSpec(
        arch=cfg.arch,
        encoder=cfg.encoder,
        encoder_depth=cfg.encoder_depth,
        decoder_channels=cfg.decoder_channels,
        input_size=cfg.size or default_size(dataset.size, cfg.encoder_depth),
        dataset_size=dataset.size,
        resize=dataset.resize,
        threshold=cfg.threshold,
        encoder_weights=cfg.encoder_weights,
    )


def with_plan(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the plan its run recorded in the models root's ``train_config.json``
    (a ``--time-budget`` run plans once, in its driver; see :mod:`segflow.train.plan`)."""
    if not cfg.time_budget or cfg.plan is not None:
        return cfg
    models = Store(cfg.models, cfg.storage)
    return recorded(cfg, models.read_json(RECORD) if models.exists(RECORD) else None)


def differences(cfg: TrainConfig, fold: Store, spec: ModelSpec) -> Differences:
    """How the fold's saved state differs from ``cfg``; empty when it matches (or is empty).

    Folds saved before the record existed have only their ``config.json``: compare that, and
    for their legacy record (see :func:`claim_fold`) the ModelSpec fields it holds."""
    if fold.exists(RECORD):
        saved, asked = fold.read_json(RECORD), fold_record(cfg)
        if saved.get(LEGACY):
            return _spec_differences(saved, spec)
        defaults = {k: f.default for k, f in type(cfg).model_fields.items()}
        # a field added to TrainConfig after the fold was saved had its default then
        diff = {
            k: (saved.get(k, defaults.get(k)), v)
            for k, v in asked.items()
            if saved.get(k, defaults.get(k)) != v
        }
        return {**diff, **_derived_differences(fold, spec)}
    if fold.exists(SPEC):
        return _spec_differences(fold.read_json(SPEC), spec)
    return {}


def _spec_fields(spec: ModelSpec) -> dict[str, Any]:
    fields = spec.model_dump(mode="json")
    fields.pop("segflow_version")  # which segflow wrote it does not change the weights
    return fields


def _derived_differences(fold: Store, spec: ModelSpec) -> Differences:
    """The fold's saved config.json against ``spec`` on :data:`DERIVED` (those it holds)."""
    if not fold.exists(SPEC):
        return {}
    saved, asked = fold.read_json(SPEC), _spec_fields(spec)
    if saved.get("encoder_weights") == "auto":  # as resolved when that fold was built
        from segflow.train.weights import NAMED_SOURCES

        encoder = saved.get("encoder")
        saved["encoder_weights"] = next((n for n, e in NAMED_SOURCES.items() if e == encoder), None)
    return {k: (saved[k], asked[k]) for k in DERIVED if k in saved and saved[k] != asked[k]}


def _spec_differences(saved: dict[str, Any], spec: ModelSpec) -> Differences:
    asked = _spec_fields(spec)
    return {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}


def claim_fold(cfg: TrainConfig, fold: Store, spec: ModelSpec) -> None:
    """Make ``fold`` this config's before anything is written to it: raise when it holds
    another config's state (or, with ``overwrite``, delete that state), then record what was
    checked: ``cfg``, or for a fold saved before the record existed its ModelSpec fields alone
    (``"legacy": true``). Calling it again with the same config changes nothing."""
    if diff := differences(cfg, fold, spec):
        if not cfg.overwrite:
            raise ConfigMismatchError(posixpath.dirname(fold.url), {_name(fold): diff})
        log.warning("%s: deleting a fold trained with another config (overwrite)", fold.url)
        fold.delete("", recursive=True)
    # state without a record is older than the record; a legacy record stays legacy
    legacy = fold.read_json(RECORD).get(LEGACY) if fold.exists(RECORD) else fold.exists(SPEC)
    # a legacy fold's epochs, lr, loss, seed... were never compared: recording cfg would pass
    # them off as checked, and every later run would trust them
    fold.write_json(RECORD, {**_spec_fields(spec), LEGACY: True} if legacy else fold_record(cfg))


def check_models(cfg: TrainConfig, models: Store, dataset: Dataset) -> None:
    """Refuse (or, with ``overwrite``, delete) a models location whose folds were trained
    with another config. Checks every fold folder, also those this run does not train: one
    location holds one training run, so mixed folds would make an incoherent ensemble."""
    spec = model_spec(cfg, dataset)
    found: dict[str, Differences] = {}
    for name in _fold_folders(models):
        if diff := differences(cfg, models.child(name), spec):
            found[name] = diff
    if not found:
        return
    if not cfg.overwrite:
        raise ConfigMismatchError(models.url, found)
    log.warning("%s: deleting a training run of another config (overwrite)", models.url)
    for name in [*_fold_folders(models), *TRAINING_FILES]:
        models.delete(name, recursive=True)


def _fold_folders(models: Store) -> list[str]:
    names = set()
    for file in (RECORD, SPEC):
        for path in models.fs.glob(models.path(f"fold-*/{file}")):
            names.add(posixpath.basename(posixpath.dirname(path)))
    return sorted(names)


def _name(fold: Store) -> str:
    return posixpath.basename(fold.url.rstrip("/"))
