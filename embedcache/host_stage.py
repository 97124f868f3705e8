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
from typing import Callable

import numpy as np

from embedcache.config import BuildConfig
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
        self.outs: list[list[WindowOutput | None] | None] = [[None] * len(p.windows) for p in plans]
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

    def put(self, batch: list[tuple[int, int]], outs: list[WindowOutput]) -> None:
        self._raise()
        self.queue.put((batch, outs))

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
                batch, outs = item
                for (i, w), out in zip(batch, outs):
                    self.outs[i][w] = out
                    self.missing[i] -= 1
                self._write_finished()
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
                tokens, pooled = assemble(self.plans[i], self.outs[i], self.config)
                if self.writer is not None:
                    self.writer.add(tokens if tokens.ndim == 3 else tokens[:, None, :])  # cast into the shard
                    self.lengths[i] = len(tokens)
                self.pooled[i] = None if pooled is None else to_numpy(pooled, "float32")
            self.outs[i] = None  # its window outputs are no longer needed
            self.next += 1
        if self.on_sequences is not None and self.next > start:
            self.on_sequences(self.next - start)
