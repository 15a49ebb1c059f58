"""A predict worker keeps its loaded ensemble only while the folds' weights are unchanged:
after a retrain into the same models URL (`segflow train --overwrite`) the next shard on the
same long-lived worker process uses the new weights, locally and on moto S3."""

from __future__ import annotations

import torch

from segflow.predict import workers
from segflow.storage import Store
from segflow.train.model import ModelSpec, build_model, save_spec, save_weights

SPEC = ModelSpec(
    arch="Unet",
    encoder="resnet18",
    encoder_depth=3,
    decoder_channels=[16, 8, 4],
    input_size=(32, 32),
    dataset_size=(32, 32),
    resize="stretch",
)


def write_fold(models: Store, k: int, seed: int) -> torch.Tensor:
    """A finished fold-k of freshly seeded weights; returns its first parameter."""
    torch.manual_seed(seed)
    net = build_model(SPEC)
    fold = models.child(f"fold-{k}")
    save_spec(fold, SPEC)
    save_weights(fold, "best.pt", {"model": net.state_dict()})
    fold.mark_complete("fold", {"fold": k, "seed": seed})
    return next(net.parameters()).detach().clone()


def _first_param(ensemble) -> torch.Tensor:
    return next(ensemble.models[0].parameters()).detach().cpu()


def test_a_retrain_into_the_same_url_is_reloaded(location):
    models = location.store("models")
    old = write_fold(models, 0, seed=1)
    first = workers._cached_ensemble(models.url, location.storage, None)
    assert torch.equal(_first_param(first), old)
    # the next shard on the same worker: no reload while nothing changed
    assert workers._cached_ensemble(models.url, location.storage, None) is first
    assert workers._cached_ensemble(models.url, location.storage, (0,)) is not None

    new = write_fold(models, 0, seed=2)  # `segflow train --overwrite` into the same URL
    assert not torch.equal(old, new)
    again = workers._cached_ensemble(models.url, location.storage, None)
    assert again is not first and torch.equal(_first_param(again), new)
    assert workers._cached_ensemble(models.url, location.storage, None) is again


def test_a_retrain_during_a_run_is_refused_not_mixed_in(location):
    import pytest

    from segflow.errors import ModelChangedError

    models = location.store("models")
    write_fold(models, 0, seed=1)
    planned = workers.weights_fingerprint(models, None)
    assert workers._cached_ensemble(models.url, location.storage, None, planned) is not None
    write_fold(models, 0, seed=2)  # retrained into the same URL while the run goes on
    with pytest.raises(ModelChangedError, match="changed while this prediction ran"):
        workers._cached_ensemble(models.url, location.storage, None, planned)
