"""A test hook for the resume guarantees: ``SEGFLOW_CRASH_AT=<point>`` kills the process with
SIGKILL when ingest reaches that point, so no ``finally`` or exit handler runs, as with a real
kill. The points are the boundaries between the steps that write state (see :data:`POINTS`)."""

from __future__ import annotations

import os
import signal

ENV = "SEGFLOW_CRASH_AT"
#: in the order a run reaches them
POINTS = (
    "planned",  # _staging/plan.json written
    "decoded",  # every planned row decoded, its pixels and record written
    "journal",  # _staging/commit.json written: from here the commit is rolled forward
    "updates_copied",  # updated rows copied from their scratch rows onto their own
    "new_moved",  # new rows moved into place below the new n
    "columns",  # every index column but fingerprints written
    "fingerprints",  # fingerprints written
    "attrs",  # attrs["n"] and the content hash written
    "report",  # report.json and config.json written
    "marker",  # ingest.complete.json written, _staging not yet removed
    "journal_removed",  # _staging/commit.json removed, the rest of _staging (markers) not yet
)


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        _kill()


def _kill() -> None:
    """SIGKILL this process. Tests that run ingest in their own process replace it with a
    raise of a BaseException (nothing in ingest catches those), which stops the run at the
    same point without taking the test runner down."""
    os.kill(os.getpid(), signal.SIGKILL)
