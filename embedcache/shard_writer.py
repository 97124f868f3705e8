"""Stored token rows in, whole shards out: a unit's rows written as they are made, each shard once.

A unit owns whole shards of `tokens` (plan.cut_units), so writing each shard as soon as it fills is
safe and never a partial-shard write (slow, and unsafe under concurrency). The crc32 of the rows is
chained shard by shard as they are written, on the writer threads: the digests
`embedcache.commits.shard_digests` would compute over the whole block, without holding the block.

A filled shard goes to a writer thread, so its encoding (chunk checksums, laying out the shard:
embedcache.shard_image, or zarr for layouts it does not cover) and its write overlap the filling of
the next: at most IN_FLIGHT shards are being written, each from a buffer of its own, so memory is
(IN_FLIGHT + 1) shards of rows plus one encoded shard per writer thread.
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from embedcache.shard_image import ShardImage, ShardLayout

IN_FLIGHT = 2


class ShardBuffers:
    """Whole-shard buffers (rows being filled; their encoded images) handed from one unit's ShardWriter to the
    next within a build: a fresh 32 MiB buffer faults its pages in at ~0.7 GB/s, slower than the work that
    fills it. It keeps only what writers gave back, at most (IN_FLIGHT + 1) row buffers and IN_FLIGHT images
    for each of the two units that may write at once (one finishing, the next one running)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: dict[tuple, list[np.ndarray]] = {}
        self.images: dict[ShardLayout, list[ShardImage]] = {}

    def take_rows(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        with self.lock:
            free = self.rows.get((shape, np.dtype(dtype)), [])
            return free.pop() if free else np.empty(shape, dtype)

    def give_rows(self, buffer: np.ndarray) -> None:
        with self.lock:
            self.rows.setdefault((buffer.shape, buffer.dtype), []).append(buffer)

    def take_image(self, layout: ShardLayout) -> ShardImage:
        with self.lock:
            free = self.images.get(layout, [])
            return free.pop() if free else ShardImage(layout)

    def give_image(self, image: ShardImage) -> None:
        with self.lock:
            self.images.setdefault(image.layout, []).append(image)


class ShardWriter:
    """Rows (n, k, d) appended in order from `start`; `finish` writes the last, possibly short, shard,
    waits for every write and returns the digests of every shard written. `close` after an error.
    `buffers`: a build's ShardBuffers, shared by its units' writers (else this writer's own)."""

    def __init__(self, array, start: int, shard_rows: int, row_shape: tuple[int, ...], dtype: str,
                 buffers: ShardBuffers | None = None):  # fmt: skip
        self.array, self.start, self.shard_rows = array, start, shard_rows
        first_end = (start // shard_rows + 1) * shard_rows  # a unit starts on a boundary; stay correct if not
        self.buffers = buffers or ShardBuffers()
        self.buffer = self.buffers.take_rows((shard_rows, *row_shape), dtype)
        self.in_flight: deque[tuple[Future, np.ndarray]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="embedcache-shard-write")
        layout = ShardLayout.of(array)
        self.layout = layout if layout is not None and layout.shard_rows == shard_rows else None
        self.room, self.filled, self.written = first_end - start, 0, 0
        self.digests: list[Future] = []  # each written shard's chained crc32 (embedcache.commits.shard_digests)

    def add(self, rows: np.ndarray | torch.Tensor) -> None:
        """Append rows (n, k, d): a numpy array in the stored dtype, or a torch tensor of any dtype on any
        device, cast (as `embedcache.embed.to_numpy` does) straight into the shard's buffer: no array of its
        own per sequence, whose fresh pages cost more than the cast."""
        while len(rows):
            take = min(len(rows), self.room - self.filled)
            into = self.buffer[self.filled : self.filled + take]
            if isinstance(rows, torch.Tensor):
                torch.from_numpy(into).copy_(rows[:take])
            else:
                into[...] = rows[:take]
            self.filled += take
            rows = rows[take:]
            if self.filled == self.room:
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            block = self.buffer[: self.filled]
            at = self.start + self.written
            digest: Future = Future()  # this shard's chained crc32, computed on the writer thread
            previous, self.digests = (self.digests[-1] if self.digests else None), [*self.digests, digest]
            self.written += self.filled
            self.in_flight.append((self.pool.submit(self._write, at, block, previous, digest), self.buffer))
            while len(self.in_flight) > IN_FLIGHT:  # wait for the oldest write; its buffer is free again
                done, buffer = self.in_flight.popleft()
                done.result()
                self.buffers.give_rows(buffer)
            self.buffer = self.buffers.take_rows(self.buffer.shape, self.buffer.dtype)
        self.room, self.filled = self.shard_rows, 0

    def _write(self, at: int, block: np.ndarray, previous: Future | None, digest: Future) -> None:
        # The digests chain shard to shard: this one's starts from the last one's, which the writer thread
        # before it (started first: the pool runs in order) computes before its own write.
        try:
            digest.set_result(zlib.crc32(block.reshape(-1).view(np.uint8), previous.result() if previous is not None else 0))
        except BaseException as e:
            digest.set_exception(e)
            raise
        if self.layout is not None and at % self.shard_rows == 0:  # a whole shard: laid out here, one store call
            image = self.buffers.take_image(self.layout)
            try:
                image.write(self.array, at // self.shard_rows, block)
            finally:
                self.buffers.give_image(image)
        else:
            self.array[at : at + len(block)] = block

    def finish(self) -> np.ndarray:
        try:
            self._flush()
            while self.in_flight:
                done, buffer = self.in_flight.popleft()
                done.result()  # a write's error (a full disk) surfaces here
                self.buffers.give_rows(buffer)
        finally:
            self.close()
        return np.asarray([d.result() for d in self.digests], np.int64)

    def close(self) -> None:
        """Wait for the writes under way and stop the writer threads (after an error, nothing is kept)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.in_flight.clear()
        if self.buffer is not None:
            self.buffers.give_rows(self.buffer)
            self.buffer = None
