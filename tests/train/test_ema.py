"""train.ema_decay: the weight average that validation scores and best.pt keeps."""

from __future__ import annotations

import pytest
import torch

from segflow.storage import Store
from segflow.train import fit_fold
from segflow.train.ema import Ema, decay_at
from segflow.train.model import load_checkpoint
from tests.train.conftest import small_config


def test_decay_warms_up_then_holds():
    assert decay_at(0.99, 0) == pytest.approx(0.1)
    assert decay_at(0.99, 10) == pytest.approx(11 / 20)
    assert decay_at(0.99, 10_000) == 0.99


def test_update_is_the_exponential_average_and_counters_follow():
    net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = Ema(net, decay=0.5)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 7
    for _ in range(200):  # past the warm-up, the decay is 0.5
        ema.update(net)
    assert torch.allclose(ema.module[0].weight, start + 1.0, atol=1e-6)  # converged on it
    fresh = Ema(net, decay=0.5)
    fresh.steps = 100
    with torch.no_grad():
        net[0].weight.add_(2.0)
    fresh.update(net)  # one step at decay 0.5: halfway to the new weights
    assert torch.allclose(fresh.module[0].weight, start + 2.0, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == 7
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_best_checkpoint_holds_the_average(tiny_dataset, local):
    cfg = small_config(tiny_dataset, local.url("models"), epochs=1, ema_decay=0.9)
    res = fit_fold(cfg, 0)
    assert res.status == "done" and res.best_epoch == 1
    fold = Store(local.url("models")).child("fold-0")
    best, last = load_checkpoint(fold, "best.pt"), load_checkpoint(fold, "last.pt")
    assert last["ema"]["steps"] > 0
    for k, v in best["model"].items():
        assert torch.equal(v, last["ema"]["model"][k]), k
    moved = [k for k, v in best["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in moved)
