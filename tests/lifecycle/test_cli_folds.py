"""Bad fold lists on the command line are a typed error that says what was received and the
form allowed (`segflow` prints it and exits 2), never a raw ValueError traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from segflow.cli import app
from segflow.errors import ConfigError

TRAIN = ["train", "--dataset", "/nowhere/d.zarr", "--models", "/nowhere/m"]
PREDICT = ["predict", "--models", "/nowhere/m", "--out", "/nowhere/o", "--source", "/nowhere/s"]


@pytest.mark.parametrize(
    ("given", "says"),
    [("0,x", "'x' is not a fold number"), ("", "it is empty"), ("1,-2", "'-2' is not")],
)
def test_train_fold_ids_bad_list_is_a_config_error(given, says):
    res = CliRunner().invoke(app, [*TRAIN, "--fold-ids", given])
    assert isinstance(res.exception, ConfigError), res.exception
    text = str(res.exception)
    assert f"--fold-ids {given!r}" in text and says in text and "e.g. --fold-ids 0,3" in text


def test_train_fold_ids_good_list():
    from segflow.cli import fold_list

    assert fold_list("0, 3,1", "--fold-ids") == [0, 3, 1]


@pytest.mark.parametrize("given", ["0,x", "1,,2", "-1"])
def test_predict_folds_bad_list_is_a_config_error(given):
    res = CliRunner().invoke(app, [*PREDICT, "--folds", given])
    assert isinstance(res.exception, ConfigError), res.exception
    assert "folds must be 'all' or comma-separated fold numbers" in str(res.exception)
    assert repr(given) in str(res.exception)
