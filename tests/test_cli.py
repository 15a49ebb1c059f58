"""The CLI surface: one subcommand per stage, each with --help, --json and --config."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from segflow.cli import app
from tests.makers import png_bytes


def _segflow(*args: str) -> subprocess.CompletedProcess:
    """``segflow ARGS`` in a fresh interpreter: the real exit code and stderr."""
    cmd = [sys.executable, "-m", "segflow.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


COMMANDS = ["ingest", "train", "predict", "evaluate", "export-rle", "demo-data"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_stage_has_help_json_and_config(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "--json" in res.output and "--config" in res.output


def test_evaluate_and_export_rle_from_a_config_file(local, tmp_path):
    pred, truth = local.store("pred"), local.store("truth")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    for store in (pred, truth):
        store.write_bytes("7.png", png_bytes(mask))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"predictions: {pred.url}\ntruth: {truth.url}\nlayout: folder\n")
    res = _segflow("evaluate", "--config", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["mean_dice"] == 1.0
    out = tmp_path / "sub.csv"
    res = _segflow("export-rle", "--predictions", pred.url, "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_text().splitlines() == ["img,pixels", "7,19 4 27 4 35 4 43 4"]


def test_missing_required_option_is_a_clear_error():
    res = _segflow("evaluate", "--truth", "x")
    assert res.returncode == 2 and "evaluate needs --predictions" in res.stderr


def test_evaluate_exits_2_when_no_name_matches_and_mask_template_fixes_it(local):
    pred, truth = local.store("pred"), local.store("truth")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    pred.write_bytes("masks/IMD002.png", png_bytes(mask))  # a `segflow predict` output
    pred.write_json("predictions.json", {"layout": "folder"})
    truth.write_bytes("IMD002_lesion.png", png_bytes(mask))  # PH2-style truth names
    run = ["evaluate", "--predictions", pred.url, "--truth", truth.url]
    res = _segflow(*run)
    assert res.returncode == 2, res.stdout
    assert "IMD002_lesion.png" in res.stderr and "IMD002.png" in res.stderr
    res = _segflow(*run, "--mask-template", "{stem}_lesion.png", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["mean_dice"] == 1.0
    assert pred.exists("evaluation.csv") and not pred.exists("masks/evaluation.csv")


def _generated_commands():
    """(name, callback) of every command whose options come from a config model."""
    for info in app.registered_commands:
        if hasattr(info.callback, "config_model"):
            yield info.name or info.callback.__name__.replace("_", "-"), info.callback


def test_stage_options_come_from_the_config_models():
    """One source per option: a stage command's flag for a config field is generated from that
    field, its help is the field's description, and `--help` lists it."""
    import typer.main

    group = typer.main.get_command(app)
    generated = dict(_generated_commands())
    assert {"ingest", "train", "predict", "crops", "serve"} <= set(generated)
    for name, callback in generated.items():
        model, fields = callback.config_model, callback.config_fields
        params = {p.name: p for p in group.commands[name].params}
        for field in fields:
            assert params[field].help == model.model_fields[field].description, (name, field)
        # no hand-written twin: every option named after a model field is a generated one
        assert {p for p in params if p in model.model_fields} == set(fields), name
        res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "250"})
        assert res.exit_code == 0, res.output
        for field in fields:
            assert f"--{field.replace('_', '-')}" in res.output, (name, field)


def test_generated_flags_keep_their_spelling_and_types():
    import typer.main

    group = typer.main.get_command(app)
    opts = {p.name: p for p in group.commands["ingest"].params}
    assert opts["require_masks"].opts == ["--require-masks"]
    assert opts["require_masks"].secondary_opts == ["--allow-unlabeled"]
    assert opts["strict"].is_flag and opts["strict"].secondary_opts == []
    assert opts["size"].nargs == 2 and opts["size"].default is None


def test_an_option_without_a_description_is_refused():
    from pydantic import BaseModel

    from segflow.cli_options import config_options

    class Bare(BaseModel):
        x: int = 1

    with pytest.raises(TypeError, match=r"Bare\.x needs a description"):
        config_options(Bare, "x")(lambda **opts: None)
