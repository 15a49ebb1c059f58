"""The ingest task lives with train_flow's tasks; this module keeps its import path."""

from segflow.tasks.train import ingest_dataset

__all__ = ["ingest_dataset"]
