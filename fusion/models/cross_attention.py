"""IsoFormer aggregation: each modality's tokens cross-attend to the other modalities' tokens.

Also holds the NaN-free masked attention and the feed-forward block that the perceiver
reuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fusion.models.pooling import Aggregator, masked_mean

if TYPE_CHECKING:
    from fusion.models.config import FusionModelConfig

FF_MULT = 4  # feed-forward hidden width = FF_MULT * d_model (the usual transformer choice)


class MaskedAttention(nn.Module):
    """Multi-head attention of queries (b, nq, d) over keys/values (b, nk, d) with a key padding mask (b, nk).

    Softmax over a row with every key masked is 0/0 = NaN on some SDPA backends (others
    return zeros, which `to_out` would still turn into its bias). Such a sample (e.g. the
    other modalities are all absent) gets an update of exactly zero on every backend.

    Dropout is applied to the attention output by the caller, not to the (b, h, nq, nk)
    weights: with hundreds of tokens per modality, drawing that mask took a quarter of a CPU
    training step and forces SDPA off its fused kernels.
    """

    def __init__(self, *, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) is not a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.to_q = nn.Linear(d_model, d_model)
        self.to_kv = nn.Linear(d_model, 2 * d_model)
        self.to_out = nn.Linear(d_model, d_model)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """queries (b, nq, d), context (b, nk, d), context_mask (b, nk) bool -> (b, nq, d)."""
        if context.shape[1] == 0:
            return torch.zeros_like(queries)
        has_keys = context_mask.any(dim=-1)  # (b,)
        # Let a sample without real keys attend to all positions (finite), then drop its result.
        safe_mask = context_mask | ~rearrange(has_keys, "b -> b 1")  # (b, nk)
        q = rearrange(self.to_q(queries), "b n (h d) -> b h n d", h=self.n_heads)  # (b, h, nq, dh)
        k, v = rearrange(self.to_kv(context), "b n (two h d) -> two b h n d", two=2, h=self.n_heads)  # (b, h, nk, dh)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=rearrange(safe_mask, "b n -> b 1 1 n"),  # (b, 1, 1, nk): True = may attend
        )  # (b, h, nq, dh)
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (b, nq, d)
        return torch.where(rearrange(has_keys, "b -> b 1 1"), out, 0.0)  # (b, nq, d)


class FeedForward(nn.Sequential):
    """Position-wise Linear -> GELU -> Dropout -> Linear -> Dropout: (b, n, d) -> (b, n, d)."""

    def __init__(self, *, d_model: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d_model, FF_MULT * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(FF_MULT * d_model, d_model),
            nn.Dropout(dropout),
        )


class CrossAttentionLayer(nn.Module):
    """One layer for one query modality, pre-norm, its two residual branches zero-initialised:

    x <- x + CrossAttn(LN(x), LN_ctx(context)); x <- x + FFN(LN(x)); x (b, n, d), context (b, nk, d).

    Why not post-norm (x <- LN(x + ...)): LayerNorm divides each token by its own norm, so a signal
    carried by one direction of a pooled vector reaches the head through per-sample multiplicative
    noise, the loss that made the sweep drop the LayerNorm after the input projection; here the
    residual stream passes the projected tokens through unnormalised. Why zero-initialised output
    layers: at initialisation the layer is the identity and the aggregator IS mean-concat pooling,
    so training adds cross-modal terms to what mean-concat learns instead of starting from a random
    mixture (on the demo's pooled dna+rna: post-norm 0.442, pre-norm with zero init 0.453 test
    mean R^2, mean-concat 0.457, probe 0.454; benchmarks/README.md).
    """

    def __init__(self, *, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.norm_context = nn.LayerNorm(d_model)
        self.attn = MaskedAttention(d_model=d_model, n_heads=n_heads)
        self.attn_dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model=d_model, dropout=dropout)
        for last in (self.attn.to_out, self.ffn[3]):  # each branch's output layer
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.norm1(x), self.norm_context(context), context_mask))  # (b, n, d)
        return x + self.ffn(self.norm2(x))  # (b, n, d)


class CrossAttentionAggregator(Aggregator):
    """IsoFormer: per layer, every modality's tokens (queries) attend to the concatenated
    tokens of the OTHER modalities (keys/values, padded and absent ones masked); then a
    masked mean per modality, concatenated: h_multi (b, M * d_model).

    All modalities are updated from the previous layer's tokens, so the modality order does
    not matter. A sample for which no other modality is present gets a zero attention
    update (its tokens still pass the norms and feed-forward blocks). With a single
    configured modality there is nothing to attend to: no layers are built and this is
    exactly the masked-mean pooling of that modality.
    """

    def __init__(self, *, modalities: tuple[str, ...], d_model: int, n_layers: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.out_dim = len(self.modalities) * d_model
        n_built = n_layers if len(self.modalities) > 1 else 0
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: CrossAttentionLayer(d_model=d_model, n_heads=n_heads, dropout=dropout) for m in self.modalities})
            for _ in range(n_built)
        )

    @classmethod
    def from_config(cls, config: "FusionModelConfig") -> "CrossAttentionAggregator":
        return cls(
            modalities=config.modalities,
            d_model=config.d_model,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            dropout=config.dropout,
        )

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        h = dict(tokens)
        for layer in self.layers:
            updated = {}
            for m in self.modalities:
                others = [o for o in self.modalities if o != m]
                context = torch.cat([h[o] for o in others], dim=1)  # (b, sum n_o, d)
                context_mask = torch.cat([masks[o] for o in others], dim=1)  # (b, sum n_o)
                x = layer[m](h[m], context, context_mask)  # (b, n_m, d)
                # Keep padded positions at zero, as on input; they are masked everywhere anyway.
                updated[m] = torch.where(rearrange(masks[m], "b n -> b n 1"), x, 0.0)
            h = updated
        pooled = [masked_mean(h[m], masks[m]) for m in self.modalities]  # M x (b, d)
        return torch.cat(pooled, dim=-1)  # (b, M * d)
