"""Aliases, their history and the ``segflow models`` commands, locally and on moto S3. The
versions here are records over fold folders with markers: no model is trained."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from typer.testing import CliRunner

from segflow.cli import app
from segflow.registry import IncompleteVersion, promote, rollback
from segflow.storage import Store
from segflow.versions import (
    PREVIOUS,
    PRODUCTION,
    VersionNotFound,
    derive_aliases,
    move_production,
    read_aliases,
    read_history,
    resolve_version,
    write_version,
)


def fake_version(models: Store, vid: str, created: str, folds=(0, 1), done=(0, 1)) -> None:
    for k in folds:
        if k in done:
            models.write_bytes(f"runs/{vid}/fold-{k}/best.pt", b"weights")
            models.write_json(f"runs/{vid}/fold-{k}/fold.complete.json", {"fold": k})
    write_version(
        models.url,
        {
            "version": vid,
            "run": f"runs/{vid}",
            "created_at": created,
            "dataset": {"url": "d", "hash": "ab" * 32, "n_images": 12},
            "config": {"folds": len(folds), "fold_ids": None},
            "folds": list(folds),
            "scores": {"oof": {"thresholded_jaccard": 0.5, "dice": 0.7}},
            "choice": {"threshold": 0.5, "postprocess": "none"},
        },
        models.options,
    )


@pytest.fixture
def models(location):
    m = location.store("models")
    fake_version(m, "v1", "2026-01-01T00:00:00+00:00")
    fake_version(m, "v2", "2026-01-02T00:00:00+00:00")
    fake_version(m, "v3", "2026-01-03T00:00:00+00:00", done=(0,))  # fold 1 never finished
    return m


def test_promote_rollback_and_history(models):
    url, st = models.url, models.options
    assert read_aliases(url, st) == {}
    promote(url, "v1", "first model", actor="alice", storage=st)
    promote(url, "v2", "better", actor="bob", storage=st)
    aliases = read_aliases(url, st)
    assert (aliases[PRODUCTION], aliases[PREVIOUS]) == ("v2", "v1")
    back = rollback(url, "v2 misbehaves", actor="carol", storage=st)
    assert (back[PRODUCTION], back[PREVIOUS]) == ("v1", "v2")
    history = read_history(url, st)
    assert [(e.version, e.action, e.actor, e.reason) for e in history] == [
        ("v1", "promote", "alice", "first model"),
        ("v2", "promote", "bob", "better"),
        ("v1", "rollback", "carol", "v2 misbehaves"),
    ]
    assert all(e.at and e.event for e in history) and history[2].seen_production == "v2"
    # the history is append-only: one object per event, none rewritten
    assert len(models.list("versions/history")) == 3
    assert read_aliases(url, st) == derive_aliases(history)


def test_concurrent_promotions_end_consistent(models):
    url, st = models.url, models.options
    n = 8
    start = threading.Barrier(n)
    errors = []

    def go(i: int) -> None:
        try:
            start.wait()
            move_production(url, ("v1", "v2")[i % 2], "promote", f"writer {i}", f"w{i}", st)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    history = read_history(url, st)
    assert len(history) == n  # complete: no event lost
    assert sorted(e.reason for e in history) == sorted(f"writer {i}" for i in range(n))
    aliases = read_aliases(url, st)
    assert aliases == derive_aliases(history)  # one consistent view of the whole history
    assert aliases[PRODUCTION] == history[-1].version


def test_default_resolution_prefers_production_and_logs(models, caplog):
    url, st = models.url, models.options
    with caplog.at_level(logging.INFO, logger="segflow.versions"):
        assert resolve_version(url, None, st).id == "v3"  # latest: nothing promoted yet
    assert "no production alias" in caplog.text and "using latest" in caplog.text
    promote(url, "v1", "pin", storage=st)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segflow.versions"):
        assert resolve_version(url, None, st).id == "v1"
        assert resolve_version(url, "latest", st).id == "v3"  # --version still selects any
    assert "production -> v1" in caplog.text


def test_promote_refuses_incomplete_and_unknown(models):
    url, st = models.url, models.options
    with pytest.raises(IncompleteVersion, match=r"v3 has incomplete folds \[1\]"):
        promote(url, "v3", "why not", storage=st)
    with pytest.raises(VersionNotFound, match=r"'v9' not found.*v1"):
        promote(url, "v9", "typo", storage=st)
    with pytest.raises(VersionNotFound, match="nothing to roll back"):
        rollback(url, storage=st)


def _cli(*args: str, endpoint: str | None) -> tuple[int, str]:
    extra = ["--endpoint-url", endpoint] if endpoint else []
    res = CliRunner().invoke(app, [*args, *extra])
    code = res.exit_code
    if isinstance(res.exception, Exception) and not isinstance(res.exception, SystemExit):
        from segflow.errors import SegflowError

        assert isinstance(res.exception, SegflowError), res.exception
        code = 2  # main() turns a SegflowError into exit code 2
        return code, str(res.exception)
    return code, res.output


def test_models_cli(models, location):
    ep = location.storage.endpoint_url
    url = models.url
    code, out = _cli(
        "models", "promote", "v1", "--models", url, "--reason", "ok", "--json", endpoint=ep
    )
    assert code == 0 and json.loads(out.splitlines()[-1])[PRODUCTION] == "v1"
    _cli("models", "promote", "v2", "--models", url, "--reason", "newer", endpoint=ep)
    code, out = _cli("models", "list", "--models", url, "--json", endpoint=ep)
    rows = json.loads(out.splitlines()[-1])["versions"]
    assert [r["id"] for r in rows] == ["v1", "v2", "v3"]
    assert rows[0]["aliases"] == [PREVIOUS] and rows[1]["aliases"] == [PRODUCTION]
    assert rows[0]["n_images"] == 12 and rows[0]["oof_tj"] == 0.5
    code, out = _cli("models", "show", "v2", "--models", url, "--json", endpoint=ep)
    assert code == 0 and json.loads(out.splitlines()[-1])["choice"]["threshold"] == 0.5
    code, out = _cli("models", "rollback", "--models", url, "--reason", "bad", endpoint=ep)
    assert code == 0 and "production: v1" in out
    # bad input: a clear error and a non-zero exit
    for args, message in [
        (("show", "nope"), "'nope' not found"),
        (("promote", "v3", "--reason", "x"), "incomplete folds"),
        (("list",), "no model versions"),
    ]:
        target = url if args != ("list",) else location.url("empty")
        code, out = _cli("models", *args, "--models", target, endpoint=ep)
        assert code == 2 and message in out, (args, out)
