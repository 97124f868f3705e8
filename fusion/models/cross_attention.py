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

    attend=False builds the feed-forward half only (x <- x + FFN(LN(x)); context is not read): the layer of
    a single-modality model, which has no other modality to attend to.
    """

    def __init__(self, *, d_model: int, n_heads: int, dropout: float, attend: bool = True) -> None:
        super().__init__()
        self.attend = attend
        if attend:
            self.norm1 = nn.LayerNorm(d_model)
            self.norm_context = nn.LayerNorm(d_model)
            self.attn = MaskedAttention(d_model=d_model, n_heads=n_heads)
            self.attn_dropout = nn.Dropout(dropout)
            nn.init.zeros_(self.attn.to_out.weight)
            nn.init.zeros_(self.attn.to_out.bias)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model=d_model, dropout=dropout)
        nn.init.zeros_(self.ffn[3].weight)  # the branch's output layer
        nn.init.zeros_(self.ffn[3].bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        if self.attend:
            x = x + self.attn_dropout(self.attn(self.norm1(x), self.norm_context(context), context_mask))  # (b, n, d)
        return x + self.ffn(self.norm2(x))  # (b, n, d)


class CrossAttentionAggregator(Aggregator):
    """IsoFormer: per layer, every modality's tokens (queries) attend to the concatenated
    tokens of the OTHER modalities (keys/values, padded and absent ones masked); then a
    masked mean per modality, concatenated: h_multi (b, M * d_model).

    All modalities are updated from the previous layer's tokens, so the modality order does
    not matter. A sample for which no other modality is present gets a zero attention
    update (its tokens still pass the norms and feed-forward blocks). With a single
    configured modality there is nothing to attend to, and the layers are their feed-forward
    halves only: the model is what a multi-modality one is for a sample whose other
    modalities are absent. They must not be dropped: without a per-row nonlinearity before
    the mean, a signal in how rows differ within a sequence (and not in their mean) never
    reaches h_multi; with no layers, protein-only per-token cross-attention could not read the
    planted serine-clustering term that every model with another modality recovered
    (benchmarks/bench_token_signal.py).
    """

    def __init__(self, *, modalities: tuple[str, ...], d_model: int, n_layers: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.out_dim = len(self.modalities) * d_model
        attend = len(self.modalities) > 1
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: CrossAttentionLayer(d_model=d_model, n_heads=n_heads, dropout=dropout, attend=attend) for m in self.modalities})
            for _ in range(n_layers)
        )
        self.register_load_state_dict_pre_hook(_identity_layers_for_layerless_checkpoints)

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
                # One modality: its layers (attend=False) do not read the context; its own tokens fill the argument.
                others = [o for o in self.modalities if o != m] or [m]
                context = torch.cat([h[o] for o in others], dim=1)  # (b, sum n_o, d)
                context_mask = torch.cat([masks[o] for o in others], dim=1)  # (b, sum n_o)
                x = layer[m](h[m], context, context_mask)  # (b, n_m, d)
                # Keep padded positions at zero, as on input; they are masked everywhere anyway.
                updated[m] = torch.where(rearrange(masks[m], "b n -> b n 1"), x, 0.0)
            h = updated
        pooled = [masked_mean(h[m], masks[m]) for m in self.modalities]  # M x (b, d)
        return torch.cat(pooled, dim=-1)  # (b, M * d)


def _identity_layers_for_layerless_checkpoints(module: CrossAttentionAggregator, state_dict: dict, prefix: str, *_) -> None:
    """Load hook: a single-modality checkpoint saved before its feed-forward layers existed loads as it ran.

    Such a model had no layers (plain masked-mean pooling). Filling the missing layer entries with the
    module's current weights, and zeros for each feed-forward block's output layer, makes every layer the
    identity (x + 0), so the old checkpoint predicts exactly as before.
    """
    if len(module.modalities) > 1 or not len(module.layers) or any(k.startswith(f"{prefix}layers.") for k in state_dict):
        return
    for name, value in module.layers.state_dict().items():
        output_layer = name.endswith(("ffn.3.weight", "ffn.3.bias"))
        state_dict[f"{prefix}layers.{name}"] = torch.zeros_like(value) if output_layer else value.clone()
