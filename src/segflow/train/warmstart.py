"""Warm starts: ``train.init_from`` initialises each fold from a trained version's weights.

``init_from`` is ``none`` (a cold start), ``production`` (the production alias of
``init_models``), a version id of ``init_models``, or the URL of a run folder (``fold-k/``).
The driver pins it to a version id once, before any fold starts (:func:`pin_init`), so every
fold of a run starts from the same ensemble even if the alias moves meanwhile; the run key
includes the initial weights' hash (:func:`init_hash`), so caching stays correct.

Fold ``k`` starts from the source's fold ``k`` when both runs have the same split; otherwise
(different data, different ``k``) from the source's first fold. Architecture and encoder must
match: a mismatch stops with an error naming both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from segflow.errors import ConfigError
from segflow.storage import Store, sha256_json, sha256_object
from segflow.train.config import TrainConfig
from segflow.train.model import ModelSpec, load_checkpoint, load_spec
from segflow.versions import PRODUCTION, VersionNotFound, read_aliases, resolve_version

log = logging.getLogger("segflow.train")
NONE = "none"
#: the spec fields that decide whether one network's weights fit another
_SHAPE_FIELDS = ("arch", "encoder", "encoder_depth", "decoder_channels", "in_channels", "classes")


class WarmStartError(ConfigError):
    """``init_from`` names weights that cannot initialise this run."""


@dataclass(frozen=True)
class InitSource:
    """The run folder a warm start reads, and the folds it has."""

    name: str  # what init_from resolved to (a version id or a URL)
    run: Store
    folds: tuple[int, ...]


def is_url(value: str) -> bool:
    return "://" in value or value.startswith(("/", "."))


def pin_init(cfg: TrainConfig, models_url: str | None = None) -> TrainConfig:
    """``cfg`` with ``init_from`` resolved to a version id (or left a URL / ``none``) and
    ``init_models`` set (default ``models_url``). ``production`` with nothing promoted yet is
    a cold start: the first version of a scheduled retrain has nothing to start from. A source
    that cannot be read (an unknown id, no finished fold) stops here, before any fold starts."""
    pinned = _pin(cfg, models_url)
    init_source(pinned)
    return pinned


def _pin(cfg: TrainConfig, models_url: str | None = None) -> TrainConfig:
    update: dict[str, str] = {}
    registry = cfg.init_models or models_url
    if registry and not cfg.init_models:
        update["init_models"] = registry
    value = cfg.init_from
    if value == PRODUCTION:
        if not registry:
            raise WarmStartError(_needs_registry(value))
        target = read_aliases(registry, cfg.storage).get(PRODUCTION)
        update["init_from"] = target or NONE
        log.info("warm start: production is %s", target or "not set; a cold start this time")
    return cfg.model_copy(update=update) if update else cfg


def init_source(cfg: TrainConfig) -> InitSource | None:
    """The run folder of ``cfg.init_from`` (pinned or not), or None for a cold start."""
    value = _pin(cfg).init_from
    if value == NONE:
        return None
    if is_url(value):
        run = Store(value, cfg.storage)
        name = run.url
    else:
        if not cfg.init_models:
            raise WarmStartError(_needs_registry(value))
        try:
            version = resolve_version(cfg.init_models, value, cfg.storage)
        except VersionNotFound as e:
            raise WarmStartError(f"train.init_from: {e}") from None
        run, name = Store(version.models, cfg.storage), version.id
    markers = run.fs.glob(run.path("fold-*/fold.complete.json"))
    folds = sorted(int(m.rstrip("/").split("/")[-2].split("-", 1)[1]) for m in markers)
    folds = [k for k in folds if run.exists(f"fold-{k}/best.pt")]
    if not folds:
        raise WarmStartError(
            f"train.init_from {value!r}: no finished fold (fold-k/best.pt and "
            f"fold.complete.json) at {run.url}; train it first or set init_from: none"
        )
    return InitSource(name, run, tuple(folds))


def init_hash(cfg: TrainConfig) -> str | None:
    """Hash of every checkpoint a warm start may read (None for a cold start): part of the
    run key, so new weights behind the same name never reuse an old run."""
    source = init_source(cfg)
    if source is None:
        return None
    return sha256_json([(k, sha256_object(source.run, f"fold-{k}/best.pt")) for k in source.folds])


def source_fold(source: InitSource, models: Store, fold: int) -> int:
    """Fold ``fold`` of the source when both runs share the split, else its first fold."""
    same = (
        fold in source.folds
        and models.exists("splits.json")
        and source.run.exists("splits.json")
        and _split_of(models) == _split_of(source.run)
    )
    return fold if same else source.folds[0]


def check_compatible(source_spec: ModelSpec, spec: ModelSpec, source: str) -> None:
    theirs = {k: getattr(source_spec, k) for k in _SHAPE_FIELDS}
    ours = {k: getattr(spec, k) for k in _SHAPE_FIELDS}
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in _SHAPE_FIELDS if theirs[k] != ours[k]}
        raise WarmStartError(
            f"train.init_from {source} is a {_describe(theirs)} model; this run trains a "
            f"{_describe(ours)} (differs in {', '.join(diff)}). A warm start needs the same "
            "architecture and encoder: train with those, or set train.init_from: none"
        )


def load_init(model: torch.nn.Module, cfg: TrainConfig, fold: int, spec: ModelSpec) -> str | None:
    """Copy the initial weights for ``fold`` into ``model``; returns where they came from."""
    source = init_source(cfg)
    if source is None:
        return None
    k = source_fold(source, Store(cfg.models, cfg.storage), fold)
    folder = source.run.child(f"fold-{k}")
    check_compatible(load_spec(folder), spec, source.name)
    state = load_checkpoint(folder, "best.pt")
    model.load_state_dict(state.get("model", state))
    where = f"{source.name} fold {k}"
    log.info("fold %d: warm start from %s", fold, where)
    return where


def _split_of(store: Store) -> list[list[str]]:
    return [sorted(f["val"]) for f in store.read_json("splits.json")["folds"]]


def _describe(fields: dict) -> str:
    extra = f", depth {fields['encoder_depth']}" if fields["encoder_depth"] != 5 else ""
    return f"{fields['arch']}/{fields['encoder']}{extra}"


def _needs_registry(value: str) -> str:
    return (
        f"train.init_from {value!r} names a version, but no models URL says where versions "
        "live: set train.init_models (`segflow train --init-models URL`; train_flow sets it to "
        "its models_url), or give a run folder URL"
    )
