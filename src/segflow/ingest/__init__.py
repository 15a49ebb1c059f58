"""Ingest stage: raw archives (isic, nerve, luna, folder layouts) -> a Zarr dataset.

Public API: :func:`ingest`, :class:`IngestConfig`, :class:`IngestResult`, :class:`Dataset`.
The dataset format is the contract in :mod:`segflow.dataset` and docs/dataset.md.
"""

from segflow.dataset import Dataset
from segflow.ingest.config import LAYOUTS, IngestConfig
from segflow.ingest.run import IngestResult, ingest

__all__ = ["LAYOUTS", "Dataset", "IngestConfig", "IngestResult", "ingest"]
