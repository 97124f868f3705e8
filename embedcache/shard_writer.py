"""Stored token rows in, whole shards out: a unit's rows written as they are made, each shard once.

A unit owns whole shards of `tokens` (plan.cut_units), so writing each shard as soon as it fills is
safe and never a partial-shard write (slow, and unsafe under concurrency). The crc32 of the rows is
chained shard by shard as they are written: the digests `embedcache.commits.shard_digests` would
compute over the whole block, without holding the block.
"""

from __future__ import annotations

import zlib

import numpy as np


class ShardWriter:
    """Rows (n, k, d) in the stored dtype, appended in order from `start`; `finish` writes the last,
    possibly short, shard and returns the digests of every shard written."""

    def __init__(self, array, start: int, shard_rows: int, row_shape: tuple[int, ...], dtype: str):
        self.array, self.start, self.shard_rows = array, start, shard_rows
        first_end = (start // shard_rows + 1) * shard_rows  # a unit starts on a boundary; stay correct if not
        self.buffer = np.empty((shard_rows, *row_shape), dtype)
        self.room, self.filled, self.crc, self.digests, self.written = first_end - start, 0, 0, [], 0

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), self.room - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]
            if self.filled == self.room:
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            block = self.buffer[: self.filled]
            at = self.start + self.written
            self.array[at : at + self.filled] = block
            self.crc = zlib.crc32(block.reshape(-1).view(np.uint8), self.crc)
            self.digests.append(self.crc)
            self.written += self.filled
        self.room, self.filled = self.shard_rows, 0

    def finish(self) -> np.ndarray:
        self._flush()
        return np.asarray(self.digests, np.int64)
