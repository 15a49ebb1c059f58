"""Batches of one fold's rows, read from the Zarr dataset with read-ahead.

Small folds (below ``cache_mb``) are read once into RAM, with one concurrent multi-chunk
read; larger ones are streamed, a background thread keeping ``prefetch`` batches ready so the
model never waits on storage. Batches are uint8 numpy; the device does the float conversion.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from segflow.dataset import open_group
from segflow.storage import Store

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # images (B,H,W,3), masks (B,H,W), rows (B,)


class FoldData:
    def __init__(self, dataset: Store, rows: list[int], cache_mb: int = 2048, prefetch: int = 4):
        group = open_group(dataset)
        self.images, self.masks = group["images"], group["masks"]
        self.rows = np.asarray(sorted(rows), dtype=np.int64)
        self.prefetch = prefetch
        h, w = self.images.shape[1:3]
        self.cached: tuple[np.ndarray, np.ndarray] | None = None
        if len(self.rows) * h * w * 4 <= cache_mb * 2**20:
            self.cached = self._read(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # oindex reads the chunks of all requested rows concurrently; zarr wants them sorted
        order = np.argsort(rows)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sel = rows[order]
        return self.images.oindex[sel][inverse], self.masks.oindex[sel][inverse]

    def batches(
        self, batch_size: int, shuffle_seed: int | None = None, drop_last: bool = False
    ) -> Iterator[Batch]:
        positions = np.arange(len(self.rows))
        if shuffle_seed is not None:
            positions = np.random.default_rng(shuffle_seed).permutation(len(self.rows))
        chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        if drop_last and chunks and len(chunks[-1]) < batch_size and len(chunks) > 1:
            chunks.pop()
        if self.cached is not None:
            images, masks = self.cached
            for pos in chunks:
                yield images[pos], masks[pos], self.rows[pos]
            return
        yield from self._streamed(chunks)

    def _streamed(self, chunks: list[np.ndarray]) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for pos in chunks:
                    if stop.is_set():
                        return
                    rows = self.rows[pos]
                    q.put((*self._read(rows), rows))
                q.put(None)
            except BaseException as e:  # surface reader errors in the training loop
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True, name="segflow-prefetch")
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)
