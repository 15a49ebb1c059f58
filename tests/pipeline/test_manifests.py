"""The manifests built from a stage's result dict (``stages._manifest``) take their fields by
name: a field renamed on the stage's side must fail here, not in a flow run."""

from __future__ import annotations

import dataclasses

import pytest

from segflow.crops import CropsResult
from segflow.evaluate import EvaluationResult
from segflow.pipeline.manifests import (
    ChoiceManifest,
    CropsManifest,
    EvaluationManifest,
    Manifest,
    ReviewManifest,
)
from segflow.predict.postprocess import Choice
from segflow.predict.review import Gallery


@pytest.mark.parametrize(
    ("manifest", "result"),
    [
        (EvaluationManifest, EvaluationResult),
        (CropsManifest, CropsResult),
        (ChoiceManifest, Choice),
        (ReviewManifest, Gallery),
    ],
)
def test_manifest_fields_come_from_the_stage_result(manifest: type[Manifest], result: type) -> None:
    wanted = set(manifest.model_fields) - {"hash"}
    given = {f.name for f in dataclasses.fields(result)}
    given |= {n for n, v in vars(result).items() if isinstance(v, property)}  # in to_dict too
    assert wanted <= given, f"{manifest.__name__} needs {sorted(wanted - given)}"
