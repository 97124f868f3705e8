"""Out-of-memory resilience of the build: `MemoryGuard` runs the encoder on a batch of windows and,
when the device runs out of memory, splits the batch, retries, and lowers the token budget for the
rest of the run (saying so once). A single window that cannot fit is an error naming its record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

from embedcache.encoders import Encoder, WindowOutput
from embedcache.errors import EncoderError


class MemoryGuard:
    """`guard(windows, records)` = `encoder.forward(windows)`, surviving torch.OutOfMemoryError.

    `max_tokens` starts at the build's budget (padded positions per call) and only goes down: after an
    out-of-memory error it becomes half of what failed, and later batches are split to it before
    they run, so one failure does not repeat at every batch.
    """

    def __init__(self, encoder: Encoder, max_tokens: int, log: Callable[[str], None]):
        self.encoder = encoder
        self.max_tokens = max_tokens
        self.log = log
        self.lowered = False  # whether the budget was lowered (and said so)

    def __call__(self, windows: list[np.ndarray], records: list[str], to_host: bool = True,
                 packed: object | None = None) -> Sequence[WindowOutput]:  # fmt: skip
        """Outputs in the order of `windows` (`Encoder.forward`'s, `to_host` and `packed` as there); `records[i]`
        names the record window i belongs to. A batch split to the budget is packed again, part by part."""
        parts = self._split_to_budget(windows)
        if len(parts) == 1:  # the outputs as the encoder gave them (a packed forward's are sliced when read)
            return self._run(windows, records, to_host, packed)
        out: list[WindowOutput] = []
        for part in parts:
            out += self._run([windows[i] for i in part], [records[i] for i in part], to_host)
        return out

    def _padded(self, windows: list[np.ndarray]) -> int:
        return len(windows) * max(self.encoder.cost(len(w)) for w in windows)

    def _split_to_budget(self, windows: list[np.ndarray]) -> list[list[int]]:
        """Consecutive runs of window indices, each within the budget (padded: count x the widest)."""
        parts, current, widest = [], [], 0
        for i, w in enumerate(windows):
            cost = self.encoder.cost(len(w))
            if current and (len(current) + 1) * max(widest, cost) > self.max_tokens:
                parts.append(current)
                current, widest = [], 0
            current.append(i)
            widest = max(widest, cost)
        return parts + [current] if current else parts

    def _run(self, windows: list[np.ndarray], records: list[str], to_host: bool, packed: object | None = None) -> Sequence[WindowOutput]:
        try:
            return self.encoder.forward(windows, to_host, packed)
        except torch.OutOfMemoryError as e:
            message = str(e).splitlines()[0] if str(e) else "out of memory"
        # Retry outside the except block, so the failed call's frames (and their tensors) are freed first.
        if self.encoder.device.type == "cuda":
            torch.cuda.empty_cache()
        padded = self._padded(windows)
        if len(windows) == 1:
            raise EncoderError(
                f"record {records[0]!r}: one window of {len(windows[0])} tokens ({padded} positions) does not fit in "
                f"{self.encoder.device} memory even alone ({message}); use a smaller --window, or --precision bf16"
            )
        budget = max(1, padded // 2)
        if budget < self.max_tokens:
            if not self.lowered:
                self.log(
                    f"out of {self.encoder.device} memory at a batch of {len(windows)} windows ({padded} padded tokens): "
                    f"splitting it, and lowering --max-tokens from {self.max_tokens} to {budget} for the rest of this run"
                )
            self.lowered, self.max_tokens = True, budget
        half = len(windows) // 2
        return [*self._run(windows[:half], records[:half], to_host), *self._run(windows[half:], records[half:], to_host)]
