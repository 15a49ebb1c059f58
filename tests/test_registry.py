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
    # nothing below v1: a second rollback must not put the bad v2 back
    assert (back[PRODUCTION], back[PREVIOUS]) == ("v1", None)
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


def _gate_record(champion: str | None) -> dict:
    return {"promote": True, "decision": "promoted", "reason": "benchmark ok", "champion": champion}


def test_gate_never_undoes_a_rollback(models):
    """A retrain after a rollback rebuilds the same version id; its gate decision must not make
    the rolled-back version production again."""
    from segflow.gate import apply_gate

    url, st = models.url, models.options
    promote(url, "v1", "first", storage=st)
    promote(url, "v2", "newer", storage=st)
    rollback(url, "v2 misbehaves", storage=st)
    applied = apply_gate(url, "v2", _gate_record("v1"), st)
    assert read_aliases(url, st)[PRODUCTION] == "v1"
    assert applied.aliases[PRODUCTION] == "v1" and not applied.record["promote"]
    assert applied.record["decision"] == "not promoted"
    assert "v2 was rolled back on" in applied.record["reason"]
    assert "segflow models promote" in applied.record["reason"]
    saved = models.read_json("versions/v2.json")["gate"]
    assert not saved["promote"] and "rolled back" in saved["reason"]
    # promoted by hand, the block is lifted
    promote(url, "v2", "fixed", storage=st)
    assert read_aliases(url, st)[PRODUCTION] == "v2"


def test_gate_promotion_is_compare_and_swap(models):
    """Two gate decisions taken against the same champion: only the first in history order
    moves production; both writers see the same aliases."""
    from segflow.gate import apply_gate

    url, st = models.url, models.options
    promote(url, "v1", "first", storage=st)
    first = apply_gate(url, "v2", _gate_record("v1"), st)
    second = apply_gate(url, "v3", _gate_record("v1"), st)
    assert read_aliases(url, st)[PRODUCTION] == "v2"
    assert first.record["promote"] and first.aliases[PRODUCTION] == "v2"
    assert not second.record["promote"]
    assert "production moved to v2 during evaluation" in second.record["reason"]
    aliases = read_aliases(url, st)
    assert (aliases[PRODUCTION], aliases[PREVIOUS]) == ("v2", "v1")
    assert aliases == derive_aliases(read_history(url, st))
    for applied in (first, second):  # each writer's view is the same production/previous
        assert (applied.aliases[PRODUCTION], applied.aliases[PREVIOUS]) == ("v2", "v1")


def test_rollback_pops_and_a_retried_rollback_is_a_no_op(models):
    url, st = models.url, models.options
    for vid in ("v1", "v2"):
        promote(url, vid, vid, storage=st)
    move_production(url, "v3", "promote", "v3", "t", st)  # v3 is incomplete: by the library
    back = rollback(url, "v3 bad", storage=st)
    assert (back[PRODUCTION], back[PREVIOUS]) == ("v2", "v1")
    back = rollback(url, "v2 bad too", storage=st)
    assert (back[PRODUCTION], back[PREVIOUS]) == ("v1", None)
    # a retried rollback of v3 (its writer timed out and tried again) changes nothing
    move_production(url, "v2", "rollback", "retry", "t", st, seen="v3", demotes="v3")
    aliases = read_aliases(url, st)
    assert (aliases[PRODUCTION], aliases[PREVIOUS]) == ("v1", None)


def test_read_aliases_rebuilds_a_stale_view(models):
    """A writer that died between its event and the view leaves aliases.json behind."""
    url, st = models.url, models.options
    promote(url, "v1", "first", storage=st)
    stale = models.read_json("versions/aliases.json")
    promote(url, "v2", "newer", storage=st)
    models.write_json("versions/aliases.json", stale)
    assert read_aliases(url, st)[PRODUCTION] == "v2"


def test_gate_cache_key_changes_when_aliases_moved(models):
    """promote v1, v2, roll back: production is v1 again with the same record, but a gate
    decision cached before the rollback must not be replayed after it."""
    from segflow.gate import GateConfig
    from segflow.pipeline.manifests import BenchmarkManifest, VersionManifest
    from segflow.tasks.gate import _eval_key

    url, st = models.url, models.options
    version = VersionManifest(hash="h", version="v2", url=url, run="runs/v2", record={})
    bench = BenchmarkManifest(hash="b", url="bench", content_hash="b", n_images=1)

    def key() -> str:
        return _eval_key(GateConfig(), url, version, bench, "none", st)

    promote(url, "v1", "first", storage=st)
    before = key()
    promote(url, "v2", "newer", storage=st)
    rollback(url, "v2 misbehaves", storage=st)
    assert read_aliases(url, st)[PRODUCTION] == "v1"
    assert key() != before


def test_regating_production_keeps_its_gate_section_and_segment_key(models):
    """v2 is promoted by the gate; a rerun evaluates v2 again (now the champion itself): its
    version record keeps the gate section that promoted it, so the segment stage's version
    hash and cache key do not move (gating never changes what a version predicts). A rewrite
    of the record (the same run key trained again) keeps the section too."""
    from segflow.gate import apply_gate
    from segflow.pipeline.stages import resolve, resolve_key

    url, st = models.url, models.options
    promote(url, "v1", "first", storage=st)
    ungated = resolve(url, "v2", st).hash
    apply_gate(url, "v2", _gate_record("v1"), st)
    assert read_aliases(url, st)[PRODUCTION] == "v2"
    section = models.read_json("versions/v2.json")["gate"]
    before = (resolve(url, None, st).hash, resolve_key(url, None, st))
    assert before[0] == ungated  # the gate section is history, not identity
    again = {
        "promote": False,
        "decision": "not promoted",
        "reason": "v2 is already production",
        "champion": "v2",
    }
    applied = apply_gate(url, "v2", again, st)
    assert applied.record["reason"] == "v2 is already production"  # what this run reports
    assert models.read_json("versions/v2.json")["gate"] == section  # what the record keeps
    assert (resolve(url, None, st).hash, resolve_key(url, None, st)) == before
    record = {k: v for k, v in models.read_json("versions/v2.json").items() if k != "gate"}
    write_version(url, record, st)  # record_version rewriting the same version id
    assert models.read_json("versions/v2.json")["gate"] == section
    assert resolve(url, None, st).hash == before[0]
