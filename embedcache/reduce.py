"""Build-time reduction of per-token rows: `embedcache build --token-pool K`.

Per-token data at IsoFormer scale is hundreds of gigabytes (docs/sizes.md), and a training loader
that streams it from disk delivers far fewer samples than the fusion model consumes on a GPU
(benchmarks/README.md, bench_fusion_data.py). Averaging every K consecutive rows at build time
stores, and streams, K-fold fewer bytes.

The reduction is part of the store's identity: `token_pool` is a BuildConfig field, written into
the store's config and, when set, into its fingerprint. Readers see ordinary rows (fewer of them),
so fusion reads a pooled store unchanged; live encoders (fusion finetune) pool the same way because
they go through the same `embedcache.embed.assemble`.
"""

from __future__ import annotations

import torch
from einops import reduce


def pooled_rows(n_rows: int, k: int | None) -> int:
    """Rows left from n_rows after `pool_rows` (the last group may be shorter than k)."""
    return n_rows if not k else -(-n_rows // k)


def pool_rows(x: torch.Tensor, k: int | None) -> torch.Tensor:
    """(L, ...) -> (ceil(L / k), ...): the mean of each run of k consecutive rows; the last run holds
    the L % k rows left over (a mean of fewer rows, never padding). None or 1 keeps x as it is.

    Averaged in float32 whatever the model's dtype, then cast back, so bf16 outputs lose nothing more
    than their own rounding.
    """
    if not k or k == 1 or len(x) <= 1:
        return x
    full = len(x) // k * k
    parts = [reduce(x[:full].float(), "(g k) ... -> g ...", "mean", k=k)] if full else []  # (L // k, ...)
    if full < len(x):
        parts.append(x[full:].float().mean(0, keepdim=True))  # (1, ...): the shorter last run
    return torch.cat(parts).to(x.dtype)


def fingerprint_part(token_pool: int | None) -> dict:
    """What token_pool adds to a store's fingerprint fields: nothing when off, so stores built before
    the option existed keep their fingerprints (and can be resumed)."""
    return {"token_pool": token_pool} if token_pool and token_pool > 1 else {}
