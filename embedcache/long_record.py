"""One sequence too long to hold in memory: its windows in order, a batch at a time, each window's
share of the stitched rows reduced and written to the store shard by shard as it arrives.

A unit whose single sequence stores more than `--unit-mb` (a chromosome given as one record) would
otherwise hold every window's output, their stitched copy and its stored-dtype copy at once: 52 M
residues at width 1,280 is hundreds of GB. Here a unit holds the record's residues and token ids
(about 9 bytes a token), one batch of window outputs (`--max-tokens` rows) and one shard of stored
rows (`--shard-mb`), however long the record. Rows equal what `embedcache.embed.assemble` stores
(tested); the pooled vector is summed in float64, so it equals assemble's within float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from embedcache.config import BuildConfig
from embedcache.encoders import Encoder, WindowOutput
from embedcache.errors import InputError
from embedcache.memory import MemoryGuard
from embedcache.reduce import pool_rows
from embedcache.shard_writer import ShardWriter
from embedcache.windows import SequencePlan


def stored_bytes(n_rows: int, n_layers: int, embed_dim: int) -> int:
    """Bytes of one sequence's rows as a unit holds them before the store: float32 model outputs."""
    return n_rows * n_layers * embed_dim * 4


@dataclass
class StreamedRecord:
    pooled: np.ndarray | None  # (k, d) float32
    n_rows: int
    shard_crc: np.ndarray  # embedcache.commits.shard_digests of the rows written


class _RowPool:
    """`pool_rows` over rows that arrive in pieces: full groups of k as they fill, the rest at the end."""

    def __init__(self, k: int | None):
        self.k = k if k and k > 1 else 1
        self.carry: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            return rows
        rows = rows if self.carry is None else torch.cat([self.carry, rows])
        full = len(rows) // self.k * self.k
        self.carry = rows[full:]
        return pool_rows(rows[:full], self.k)

    def finish(self) -> torch.Tensor | None:
        return None if self.carry is None or not len(self.carry) else pool_rows(self.carry, len(self.carry))


def _central_range(n: int, k: int | None) -> tuple[int, int]:
    """[start, end) of `embedcache.windows.central`'s rows of n."""
    if k is None or k >= n:
        return 0, n
    start = (n - k) // 2
    return start, start + k


def embed_long_record(encoder: Encoder, guard: MemoryGuard, token_ids: np.ndarray, plan: SequencePlan, config: BuildConfig,
                      array, token_start: int, shard_rows: int, record_id: str) -> StreamedRecord:
    """Embed one windowed sequence and write its stored rows to `array` from `token_start` (tokens only
    when the build stores them); returns its pooled vector and the digests of the shards written.

    window batches -> each window's piece of the stitched rows -> the pooled sum, and the stored rows."""
    n = plan.windows[-1][1]
    pooled = _PooledSum(config, n)
    rows = _StoredRows(ShardWriter(array, token_start, shard_rows, (len(encoder.layer_indices), encoder.embed_dim), config.dtype),
                       _central_range(n, config.token_bins), config.token_pool) if config.tokens else None  # fmt: skip
    try:
        for (s, e), (a, b), piece, out in _pieces(encoder, guard, token_ids, plan, record_id):
            pooled.add(a, b, piece, out.cls, e - s)
            if rows is not None:
                rows.add(a, b, piece)
        n_rows, shard_crc = rows.finish() if rows is not None else (0, np.zeros(0, np.int64))
    except BaseException:
        if rows is not None:
            rows.writer.close()
        raise
    return StreamedRecord(pooled.result(), n_rows, shard_crc)


def _pieces(encoder: Encoder, guard: MemoryGuard, token_ids: np.ndarray, plan: SequencePlan,
            record_id: str) -> Iterator[tuple[tuple[int, int], tuple[int, int], torch.Tensor, WindowOutput]]:  # fmt: skip
    """((s, e) the window, (a, b), rows a..b of the stitched sequence, the window's output) of each window in order, computed
    window batch by window batch: each window's share of the rows, cut where `windows.stitch` cuts."""
    windows = plan.windows
    for group in _window_groups(encoder, windows, guard.max_tokens):
        inputs = [token_ids[plan.keep_start + windows[w][0] : plan.keep_start + windows[w][1]] for w in group]
        for w, out in zip(group, guard(inputs, [record_id] * len(group))):
            s, e = windows[w]
            a = 0 if w == 0 else (s + windows[w - 1][1]) // 2
            b = e if w == len(windows) - 1 else (windows[w + 1][0] + e) // 2
            yield (s, e), (a, b), out.hidden[a - s : b - s], out


class _PooledSum:
    """The pooled vector (`embed.pool`) of a stitched sequence from its pieces as they arrive, summed in float64."""

    def __init__(self, config: BuildConfig, n: int):
        self.config = config
        self.span = _central_range(n, config.pool_bins) if config.pooling == "center" else (0, n)
        self.total: torch.Tensor | None = None
        self.weight = 0.0

    def add(self, a: int, b: int, piece: torch.Tensor, cls: torch.Tensor | None, window_tokens: int) -> None:
        if self.config.pooling in ("mean", "center"):
            lo, hi = max(a, self.span[0]), min(b, self.span[1])
            if hi > lo:
                self._add(piece[lo - a : hi - a].double().sum(0), 0.0)
        elif self.config.pooling == "cls":
            if cls is None:
                raise InputError(f"--pooling cls needs a tokenizer that adds a leading special token (CLS/BOS); "
                                 f"model {self.config.model!r} adds none. Use --pooling mean.")  # fmt: skip
            self._add(cls.double() * window_tokens, float(window_tokens))  # weighted by the tokens the window saw, as pool() does

    def _add(self, part: torch.Tensor, weight: float) -> None:
        self.total = part if self.total is None else self.total + part
        self.weight += weight

    def result(self) -> np.ndarray | None:
        if self.total is None:
            return None
        count = self.weight if self.config.pooling == "cls" else self.span[1] - self.span[0]
        return (self.total / count).float().cpu().numpy()


class _StoredRows:
    """The stored rows of a stitched sequence from its pieces: the central `keep` rows, `token_pool` means,
    written shard by shard."""

    def __init__(self, writer: ShardWriter, keep: tuple[int, int], token_pool: int | None):
        self.writer, self.keep, self.row_pool = writer, keep, _RowPool(token_pool)
        self.n_rows = 0

    def add(self, a: int, b: int, piece: torch.Tensor) -> None:
        lo, hi = max(a, self.keep[0]), min(b, self.keep[1])
        if hi > lo:
            self._put(self.row_pool.add(piece[lo - a : hi - a]))

    def _put(self, rows: torch.Tensor | None) -> None:
        if rows is not None and len(rows):
            self.writer.add(rows if rows.ndim == 3 else rows[:, None, :])  # cast into the shard
            self.n_rows += len(rows)

    def finish(self) -> tuple[int, np.ndarray]:
        self._put(self.row_pool.finish())
        return self.n_rows, self.writer.finish()


def _window_groups(encoder: Encoder, windows: tuple[tuple[int, int], ...], max_tokens: int) -> list[list[int]]:
    """Consecutive windows whose padded cost fits one batch (the guard splits further if it must)."""
    groups: list[list[int]] = [[]]
    for w, (s, e) in enumerate(windows):
        cost = encoder.cost(e - s)
        if groups[-1] and (len(groups[-1]) + 1) * cost > max_tokens:
            groups.append([])
        groups[-1].append(w)
    return groups
