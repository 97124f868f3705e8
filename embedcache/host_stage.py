"""The host side of a unit, on its own thread beside the forward: window outputs in, stored rows out.

While the forward thread runs the next batch, this thread stitches and pools the sequences whose
windows are all done, converts their rows to the stored dtype and hands them to a `ShardWriter`,
which writes each shard as it fills. A unit's batches come longest first, as its rows are laid out
(plan.cut_units, embed.make_batches), so finished sequences form a prefix of the unit's rows; one
finishing early waits for those before it. At most QUEUE batches wait for this thread, so memory
stays bounded. An error here surfaces in the forward's thread at its next batch, or at `stop` (the
partition's stages then name the unit and its records, as for any error of the unit).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from embedcache.config import BuildConfig
from embedcache.device_stage import HostBatch, on_host
from embedcache.embed import assemble, to_numpy
from embedcache.encoders import WindowOutput
from embedcache.shard_writer import ShardWriter
from embedcache.windows import SequencePlan

QUEUE = 2  # batches of window outputs waiting for this thread: the forward runs at most this far ahead


class HostStage:
    """`start`, `put` each batch's (sequence, window) items and outputs, `stop`; then `lengths` and `pooled`
    hold each sequence's stored row count and pooled vector (None where `skip` names it)."""

    def __init__(self, plans: list[SequencePlan], config: BuildConfig, writer: ShardWriter | None, skip: set[int],
                 on_sequences: Callable[[int], None] | None = None):
        self.plans, self.config, self.writer, self.skip = plans, config, writer, skip
        self.on_sequences = on_sequences  # called with the number of sequences finished since the last call
        # (item in its batch, the batch) of each window that has run, per sequence
        self.parts: list[list[tuple[int, HostBatch] | None] | None] = [[None] * len(p.windows) for p in plans]
        self.missing = [0 if i in skip else len(p.windows) for i, p in enumerate(plans)]
        self.next = 0  # the first sequence not yet handed to the writer
        self.lengths = np.zeros(len(plans), np.int64)
        self.pooled: list[np.ndarray | None] = [None] * len(plans)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="embedcache-host-stage", daemon=True)

    def start(self) -> "HostStage":
        self.thread.start()
        return self

    def put(self, items: list[tuple[int, int]], batch: HostBatch | Sequence[WindowOutput]) -> None:
        """A batch's (sequence, window) items and their outputs: a HostBatch from the device stage, or the
        forward's outputs on the CPU as they are (reduced on this thread)."""
        self._raise()
        self.queue.put((items, batch))

    def stop(self, check: bool) -> None:
        """Finish what is queued (at most QUEUE batches) and stop the thread; with `check`, raise its error,
        or fail when a sequence never got all its windows. Stopping twice is stopping once."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if check:
            self._raise()
            if self.next < len(self.plans):
                raise AssertionError(f"{len(self.plans) - self.next} sequences of the unit never got all their windows")

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep taking batches so the forward never blocks on a dead stage
            try:
                items, batch = item
                if not isinstance(batch, HostBatch):  # outputs on the CPU: reduced here, beside the forward
                    batch = on_host(items, batch, self.plans, self.config)
                batch.wait()
                for at, (i, w) in enumerate(items):
                    self.parts[i][w] = at, batch
                    self.missing[i] -= 1
                self._write_finished()
                if batch.borrowed:  # its buffer is reused a few batches on: keep what is still waiting
                    for at, (i, w) in enumerate(items):
                        if i >= self.next:
                            self.parts[i][w] = 0, batch.keep(at)
            except BaseException as e:  # handed to the forward's thread
                self.error = e
        if self.error is None:  # sequences with no batch of their own (all skipped) pass too
            try:
                self._write_finished()
            except BaseException as e:
                self.error = e

    def _write_finished(self) -> None:
        start = self.next
        while self.next < len(self.plans) and self.missing[self.next] == 0:
            i = self.next
            if i not in self.skip:
                tokens, pooled = self._assemble(i)
                if self.writer is not None:
                    self.writer.add(tokens if tokens.ndim == 3 else tokens[:, None, :])  # cast into the shard
                    self.lengths[i] = len(tokens)
                self.pooled[i] = None if pooled is None else to_numpy(pooled, "float32").copy()  # not a view of a reused buffer
            self.parts[i] = None  # its outputs are no longer needed
            self.next += 1
        if self.on_sequences is not None and self.next > start:
            self.on_sequences(self.next - start)

    def _assemble(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stored rows, pooled) of sequence i: reduced already (one window), or stitched from its windows."""
        parts = self.parts[i]
        if len(parts) == 1 and parts[0][1].window[parts[0][0]] is None:
            at, batch = parts[0]
            return batch.rows[at], batch.pooled[at]
        return assemble(self.plans[i], [batch.window[at] for at, batch in parts], self.config)
