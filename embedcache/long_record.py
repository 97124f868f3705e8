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

import numpy as np
import torch

from embedcache.config import BuildConfig
from embedcache.encoders import Encoder
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
    when the build stores them); returns its pooled vector and the digests of the shards written."""
    windows = plan.windows
    n = windows[-1][1]
    keep = _central_range(n, config.token_bins)
    pool_at = _central_range(n, config.pool_bins) if config.pooling == "center" else (0, n)
    writer = ShardWriter(array, token_start, shard_rows, (len(encoder.layer_indices), encoder.embed_dim), config.dtype) \
        if config.tokens else None  # fmt: skip
    row_pool = _RowPool(config.token_pool)
    total = cls_total = None
    cls_weight, n_rows = 0.0, 0

    def put(rows: torch.Tensor | None) -> None:
        nonlocal n_rows
        if writer is not None and rows is not None and len(rows):
            writer.add(rows if rows.ndim == 3 else rows[:, None, :])  # cast into the shard
            n_rows += len(rows)

    try:
        for group in _window_groups(encoder, windows, guard.max_tokens):
            inputs = [token_ids[plan.keep_start + windows[w][0] : plan.keep_start + windows[w][1]] for w in group]
            for w, out in zip(group, guard(inputs, [record_id] * len(group))):
                s, e = windows[w]
                a = 0 if w == 0 else (s + windows[w - 1][1]) // 2  # stitch's cut between this window and its neighbours
                b = e if w == len(windows) - 1 else (windows[w + 1][0] + e) // 2
                piece = out.hidden[a - s : b - s]  # rows a..b of the stitched sequence
                lo, hi = max(a, pool_at[0]), min(b, pool_at[1])
                if hi > lo and config.pooling in ("mean", "center"):
                    part = piece[lo - a : hi - a].double().sum(0)
                    total = part if total is None else total + part
                if config.pooling == "cls":
                    if out.cls is None:
                        raise InputError(f"--pooling cls needs a tokenizer that adds a leading special token (CLS/BOS); "
                                         f"model {config.model!r} adds none. Use --pooling mean.")
                    part = out.cls.double() * (e - s)
                    cls_total, cls_weight = part if cls_total is None else cls_total + part, cls_weight + (e - s)
                lo, hi = max(a, keep[0]), min(b, keep[1])
                if hi > lo:
                    put(row_pool.add(piece[lo - a : hi - a]))
        put(row_pool.finish())
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    pooled = None
    if config.pooling in ("mean", "center"):
        pooled = (total / (pool_at[1] - pool_at[0])).float()
    elif config.pooling == "cls":
        pooled = (cls_total / cls_weight).float()
    shard_crc = writer.finish() if writer is not None else np.zeros(0, np.int64)
    return StreamedRecord(None if pooled is None else pooled.cpu().numpy(), n_rows, shard_crc)


def _window_groups(encoder: Encoder, windows: tuple[tuple[int, int], ...], max_tokens: int) -> list[list[int]]:
    """Consecutive windows whose padded cost fits one batch (the guard splits further if it must)."""
    groups: list[list[int]] = [[]]
    for w, (s, e) in enumerate(windows):
        cost = encoder.cost(e - s)
        if groups[-1] and (len(groups[-1]) + 1) * cost > max_tokens:
            groups.append([])
        groups[-1].append(w)
    return groups
