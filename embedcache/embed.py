"""From window outputs to what a store holds: stitched per-token rows and a pooled vector.

Shared by `embedcache build` (which batches windows across many sequences and writes numpy)
and by the end-to-end finetune mode (which embeds a training batch live, gradients flowing),
so both modes compute features the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from embedcache.config import BuildConfig
from embedcache.encoders import Encoder, WindowOutput
from embedcache.errors import InputError
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
    """The pooled vector of one sequence from its stitched (n, d) output."""
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
        # A windowed sequence has one CLS per window: average them, weighted by the tokens each saw.
        weights = torch.tensor([float(e - s) for s, e in plan.windows], device=hidden.device)
        return (torch.stack(cls).float() * weights[:, None]).sum(0) / weights.sum()
    raise AssertionError(config.pooling)


def assemble(plan: SequencePlan, outs: list[WindowOutput], config: BuildConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token rows (L, d) as stored: central token_bins only, pooled (d,) or None) of one sequence."""
    hidden = stitch(plan.windows, [o.hidden for o in outs])  # (n, d)
    pooled = pool(hidden, [o.cls for o in outs], plan, config)
    return central(hidden, config.token_bins), pooled


def embed_sequences(encoder: Encoder, sequences: list[str], config: BuildConfig) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Embed `sequences` live: every window of every sequence in one model call, outputs on the device.

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
    windows, owner = [], []
    for i, (ids, p) in enumerate(zip(token_ids, plans)):
        for s, e in p.windows:
            windows.append(ids[p.keep_start + s : p.keep_start + e])
            owner.append(i)
    outs = encoder.encode_windows(windows)
    per_seq: list[list[WindowOutput]] = [[] for _ in sequences]
    for i, o in zip(owner, outs):
        per_seq[i].append(o)
    return [assemble(p, o, config) for p, o in zip(plans, per_seq)]


def to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(dtype)
