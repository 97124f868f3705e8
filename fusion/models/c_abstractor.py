"""C-Abstractor aggregation (Honeybee-style): conv blocks, mask-aware adaptive pooling to a
fixed number of queries, more conv blocks, then a mean per modality."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn

from fusion.models.pooling import Aggregator, masked_mean

if TYPE_CHECKING:
    from fusion.models.config import FusionModelConfig

KERNEL_SIZE = 3  # conv width over neighbouring tokens; odd so that 'same' padding is symmetric


def masked_adaptive_avg_pool(x: torch.Tensor, mask: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling over the real tokens only: x (b, n, d), mask (b, n) -> (b, n_out, d), (b, n_out).

    For a sample with L real tokens, the token of rank r (its position among the real
    tokens) belongs to bin q when floor(q L / n_out) <= r < ceil((q + 1) L / n_out), the bins
    of torch's adaptive_avg_pool1d. Every bin is non-empty when L >= 1 (bins repeat tokens
    when L < n_out), and padding never enters any bin. A sample with L = 0 gets zeros and an
    all-False output mask.
    """
    rank = mask.long().cumsum(dim=1) - 1  # (b, n): rank among real tokens
    length = mask.sum(dim=1, keepdim=True)  # (b, 1)
    q = torch.arange(n_out, device=x.device)  # (q,)
    start = rearrange(q * length // n_out, "b q -> b q 1")  # (b, q, 1) floor
    end = rearrange(((q + 1) * length + n_out - 1) // n_out, "b q -> b q 1")  # (b, q, 1) ceil
    rank = rearrange(rank, "b n -> b 1 n")  # (b, 1, n)
    in_bin = (rank >= start) & (rank < end) & rearrange(mask, "b n -> b 1 n")  # (b, q, n)
    weights = in_bin.to(x.dtype) / in_bin.sum(dim=-1, keepdim=True).clamp(min=1).to(x.dtype)  # (b, q, n)
    pooled = torch.einsum("bqn,bnd->bqd", weights, torch.where(rearrange(mask, "b n -> b n 1"), x, 0.0))  # (b, q, d)
    return pooled, (length > 0).expand(-1, n_out)  # (b, q, d), (b, q)


class ConvBlock(nn.Module):
    """Pre-norm residual block of two 1D convolutions over tokens: (b, n, d) -> (b, n, d).

    Padded positions are re-zeroed before every convolution, so a real token's neighbours
    beyond the sequence end look exactly like the convolution's own zero padding: adding
    more padding cannot change the result.
    """

    def __init__(self, *, d_model: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.conv1 = nn.Conv1d(d_model, d_model, KERNEL_SIZE, padding=KERNEL_SIZE // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv1d(d_model, d_model, KERNEL_SIZE, padding=KERNEL_SIZE // 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = rearrange(mask, "b n -> b 1 n")  # (b, 1, n)
        h = torch.where(keep, rearrange(self.norm(x), "b n d -> b d n"), 0.0)  # (b, d, n)
        h = torch.where(keep, self.act(self.conv1(h)), 0.0)  # (b, d, n)
        h = self.dropout(self.conv2(h))  # (b, d, n)
        return torch.where(rearrange(mask, "b n -> b n 1"), x + rearrange(h, "b d n -> b n d"), 0.0)  # (b, n, d)


class CAbstractor(Aggregator):
    """Per modality (own weights): n_layers ConvBlocks over its tokens, mask-aware adaptive
    pooling to n_latents queries, n_layers more ConvBlocks, mean over queries; the modality
    vectors are concatenated: h_multi (b, M * d_model). An absent modality gives zeros.
    """

    def __init__(self, *, modalities: tuple[str, ...], d_model: int, n_layers: int, n_latents: int, dropout: float) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.n_latents = n_latents
        self.out_dim = len(self.modalities) * d_model

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(ConvBlock(d_model=d_model, dropout=dropout) for _ in range(n_layers))

        self.before = nn.ModuleDict({m: blocks() for m in self.modalities})
        self.after = nn.ModuleDict({m: blocks() for m in self.modalities})

    @classmethod
    def from_config(cls, config: "FusionModelConfig") -> "CAbstractor":
        return cls(
            modalities=config.modalities,
            d_model=config.d_model,
            n_layers=config.n_layers,
            n_latents=config.n_latents,
            dropout=config.dropout,
        )

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for m in self.modalities:
            x, mask = tokens[m], masks[m]  # (b, n, d), (b, n)
            for block in self.before[m]:
                x = block(x, mask)  # (b, n, d)
            x, mask = masked_adaptive_avg_pool(x, mask, self.n_latents)  # (b, q, d), (b, q)
            for block in self.after[m]:
                x = block(x, mask)  # (b, q, d)
            pooled.append(masked_mean(x, mask))  # (b, d)
        return torch.cat(pooled, dim=-1)  # (b, M * d)
