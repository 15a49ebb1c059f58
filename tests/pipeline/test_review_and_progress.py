"""A review larger than a run keeps is refused; progress ETA counts only images run now."""

from __future__ import annotations

import re

import pytest

from segflow.errors import ConfigError
from segflow.pipeline.stages import check_review_k


def test_review_k_above_what_a_run_keeps_is_refused():
    assert check_review_k(16) == 16
    for k in (17, 0):
        with pytest.raises(ConfigError, match=f"review_k={k}: a run keeps its 16"):
            check_review_k(k)


def test_progress_rate_counts_only_images_run_now():
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from segflow.pipeline.artifacts import Progress

    with prefect_test_harness(server_startup_timeout=180):
        progress = Progress(1000, "images")
        progress.t0 -= 10.0  # 10 s in: 900 images resumed from cache, 10 run now
        progress.update(910, 10)
        with get_client(sync_client=True) as client:
            art = client.read_artifacts()[0]
    # ~1/s over the 90 left: ETA ~1.5 min, not the 1 s that 910 images in 10 s would say
    assert re.search(r"910/1,000 images, \d\.\d/s, ETA 0:0[12]:\d\d$", art.description)
