"""Windows, their length-sorted batches, and from window outputs to what a store holds: stitched
per-token rows and a pooled vector.

Shared by `embedcache build` (which batches windows across many sequences and writes numpy)
and by the end-to-end finetune mode (which embeds a training batch live, gradients flowing),
so both modes compute features the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import einsum

from embedcache.config import BuildConfig
from embedcache.encoders import Encoder, WindowOutput
from embedcache.errors import InputError
from embedcache.reduce import pool_rows
from embedcache.windows import SequencePlan, central, plan_sequence, stitch


def resolve_overlap(config: BuildConfig, encoder: Encoder) -> int:
    return config.overlap if config.overlap is not None else encoder.window // 4


def plan_windows(encoder: Encoder, n_tokens: int, config: BuildConfig) -> SequencePlan:
    """Crop (only when asked) and windows of one tokenised sequence; ValueError when it cannot fit."""
    return plan_sequence(
        n_tokens,
        window=encoder.window,
        overlap=resolve_overlap(config, encoder),
        crop=config.crop,
        max_length=config.max_length,
        fixed_window=encoder.fixed_window,
    )


def pool(hidden: torch.Tensor, cls: list[torch.Tensor | None], plan: SequencePlan, config: BuildConfig) -> torch.Tensor | None:
    """The pooled vectors (k, d) of one sequence from its stitched (n, k, d) output: one per layer."""
    if config.pooling == "none":
        return None
    if config.pooling == "mean":
        return hidden.mean(0)  # special tokens were stripped in the encoder; no padding is left
    if config.pooling == "center":
        return central(hidden, config.pool_bins).mean(0)
    if config.pooling == "cls":
        if any(c is None for c in cls):
            raise InputError(
                f"--pooling cls needs a tokenizer that adds a leading special token (CLS/BOS); "
                f"model {config.model!r} adds none. Use --pooling mean."
            )
        if len(cls) == 1:  # one window: its CLS (no weights to make on the device for every sequence)
            return cls[0].float()
        # A windowed sequence has one CLS per window: average them, weighted by the tokens each saw.
        weights = torch.tensor([float(e - s) for s, e in plan.windows], device=hidden.device)  # (w,)
        return einsum(torch.stack(cls).float(), weights, "w k d, w -> k d") / weights.sum()
    raise AssertionError(config.pooling)


def assemble(plan: SequencePlan, outs: list[WindowOutput], config: BuildConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token rows (L, k, d) as stored: central token_bins only, mean of every token_pool rows; pooled (k, d)
    or None) of one sequence. The pooled vector is taken from every row, before either reduction."""
    hidden = stitch(plan.windows, [o.hidden for o in outs])  # (n, k, d)
    pooled = pool(hidden, [o.cls for o in outs], plan, config)
    return pool_rows(central(hidden, config.token_bins), config.token_pool), pooled


def make_batches(
    items: list[tuple[int, int, object]], max_tokens: int, equal_lengths: bool
) -> list[list[object]]:
    """Length-sorted batches under a token budget: (cost, length, payload) -> lists of payloads.

    Sorting by length makes padding small; a batch holds as many windows as fit in
    `max_tokens` padded positions (a window larger than the budget runs alone). Models without an
    attention mask get batches of one length only, so no padding ever reaches them.
    """
    batches: list[list[object]] = []
    current: list[object] = []
    width = length0 = 0
    for cost, length, payload in sorted(items, key=lambda t: (-t[0], -t[1])):
        fits = (len(current) + 1) * max(width, cost) <= max_tokens
        same = not equal_lengths or length == length0
        if current and fits and same:
            current.append(payload)
            width = max(width, cost)
        else:
            if current:
                batches.append(current)
            current, width, length0 = [payload], cost, length
    if current:
        batches.append(current)
    return batches


def embed_sequences(encoder: Encoder, sequences: list[str], config: BuildConfig) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Embed `sequences` live, outputs on the device: their windows in length-sorted model calls under
    the store's token budget (`config.max_tokens`), by the build's batching rule (`make_batches`).

    Gradients flow when enabled (finetune mode); the result equals what `embedcache build` stores
    for the same sequences and config, up to the store's float16 rounding.
    """
    token_ids = [encoder.tokenize(s) for s in sequences]
    plans = []
    for seq, ids in zip(sequences, token_ids):
        try:
            plans.append(plan_windows(encoder, len(ids), config))
        except ValueError as e:
            raise InputError(f"sequence {seq[:20]!r}... ({len(seq)} letters): {e}") from e
    items = [(encoder.cost(e - s), e - s, (i, w)) for i, p in enumerate(plans) for w, (s, e) in enumerate(p.windows)]
    outs: list[list[WindowOutput | None]] = [[None] * len(p.windows) for p in plans]
    for batch in make_batches(items, config.max_tokens, encoder.equal_length_batches):
        windows = []
        for i, w in batch:
            s, e = plans[i].windows[w]
            windows.append(token_ids[i][plans[i].keep_start + s : plans[i].keep_start + e])
        for (i, w), out in zip(batch, encoder.encode_windows(windows)):
            outs[i][w] = out
    return [assemble(p, o, config) for p, o in zip(plans, outs)]  # type: ignore[arg-type]


# Stored dtypes by name, converted by torch: vectorised and multithreaded, unlike numpy's float16 cast.
STORED_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU numpy array of `x` in the stored dtype (a view when `x` already is one)."""
    return x.detach().to(device="cpu", dtype=STORED_DTYPES[dtype]).numpy()
