"""The aggregator interface, the one shared `masked_mean`, and the pooling-only aggregators.

Every aggregator takes the projected tokens of each modality and returns one vector per
sample (h_multi). Tokens arrive zero where masked, with an explicit mask; absent
modalities have an all-False mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn

if TYPE_CHECKING:
    from fusion.models.config import FusionModelConfig


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` (b, n, d) over the positions where `mask` (b, n) is True -> (b, d).

    A sample with no True position gets zeros (not NaN): an absent modality contributes
    zeros. Values under the mask never enter, even if they are NaN or inf.
    """
    m = rearrange(mask, "b n -> b n 1")  # (b, n, 1)
    total = torch.where(m, x, 0.0).sum(dim=1)  # (b, d)
    count = m.sum(dim=1).clamp(min=1).to(x.dtype)  # (b, 1)
    return total / count  # (b, d)


class Aggregator(nn.Module):
    """Interface: `forward(tokens, masks) -> (b, out_dim)`.

    tokens: {modality: (b, n_m, d_model)}, zero where masked; masks: {modality: (b, n_m) bool}.
    Both are keyed by every configured modality, in config order.
    """

    out_dim: int  # width of h_multi
    mlp_head: bool = True  # False: the model's head is a single Linear (the 'linear' baseline)

    @classmethod
    def from_config(cls, config: "FusionModelConfig") -> "Aggregator":
        raise NotImplementedError

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class MeanConcat(Aggregator):
    """Masked mean of each modality's tokens, concatenated: h_multi (b, M * d_model)."""

    def __init__(self, *, modalities: tuple[str, ...], d_model: int) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.out_dim = len(self.modalities) * d_model

    @classmethod
    def from_config(cls, config: "FusionModelConfig") -> "MeanConcat":
        return cls(modalities=config.modalities, d_model=config.d_model)

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = [masked_mean(tokens[m], masks[m]) for m in self.modalities]  # M x (b, d)
        return torch.cat(pooled, dim=-1)  # (b, M * d)


class LinearProjection(MeanConcat):
    """The paper's 'linear projection' baseline: mean-concat pooling, and the head is one Linear."""

    mlp_head = False
