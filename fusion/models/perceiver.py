"""Perceiver Resampler aggregation (Flamingo-style): learned latents attend to every modality's tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import repeat
from torch import nn

from fusion.models.cross_attention import FeedForward, MaskedAttention
from fusion.models.pooling import Aggregator

if TYPE_CHECKING:
    from fusion.models.config import FusionModelConfig


class PerceiverResampler(Aggregator):
    """n_latents learned latents (n_latents, d) cross-attend to the tokens of all modalities
    (which already carry their modality embedding), masked by padding and absence, over
    n_layers of pre-norm (attention + feed-forward); then the mean over latents -> (b, d_model).

    As in Flamingo, the latents are appended to the keys/values, so every latent always has
    a real key, even for a sample with every modality absent.
    """

    def __init__(self, *, modalities: tuple[str, ...], d_model: int, n_layers: int, n_heads: int, n_latents: int, dropout: float) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"the perceiver needs n_layers >= 1 (got {n_layers}): without a layer the latents never see the inputs")
        self.modalities = tuple(modalities)
        self.out_dim = d_model
        self.latents = nn.Parameter(torch.randn(n_latents, d_model) * 0.02)  # (q, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm_latents": nn.LayerNorm(d_model),
                    "norm_context": nn.LayerNorm(d_model),
                    "attn": MaskedAttention(d_model=d_model, n_heads=n_heads),
                    "norm_ff": nn.LayerNorm(d_model),
                    "ffn": FeedForward(d_model=d_model, dropout=dropout),
                }
            )
            for _ in range(n_layers)
        )
        self.norm_out = nn.LayerNorm(d_model)

    @classmethod
    def from_config(cls, config: "FusionModelConfig") -> "PerceiverResampler":
        return cls(
            modalities=config.modalities,
            d_model=config.d_model,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            n_latents=config.n_latents,
            dropout=config.dropout,
        )

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([tokens[m] for m in self.modalities], dim=1)  # (b, N, d), N = sum of n_m
        x_mask = torch.cat([masks[m] for m in self.modalities], dim=1)  # (b, N)
        b = x.shape[0]
        latents = repeat(self.latents, "q d -> b q d", b=b)  # (b, q, d)
        latent_mask = x_mask.new_ones(b, latents.shape[1])  # (b, q)
        for layer in self.layers:
            lat = layer["norm_latents"](latents)  # (b, q, d)
            context = torch.cat([layer["norm_context"](x), lat], dim=1)  # (b, N + q, d)
            context_mask = torch.cat([x_mask, latent_mask], dim=1)  # (b, N + q)
            latents = latents + layer["attn"](lat, context, context_mask)  # (b, q, d)
            latents = latents + layer["ffn"](layer["norm_ff"](latents))  # (b, q, d)
        return self.norm_out(latents).mean(dim=1)  # (b, d)
