"""The tensors a fusion model sees: per-modality features with explicit masks.

This is the only thing that crosses from data loading into models and training.
Models never see files, stores or ids; loaders never see models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModalityBatch:
    """Features of one modality for a batch of samples.

    Pooled features are the special case n = 1 with `mask` all True for present samples.
    """

    x: torch.Tensor  # (b, n, d) float: per-token (or pooled, n = 1) embeddings, zero where masked
    mask: torch.Tensor  # (b, n) bool: True at real tokens; all False for an absent modality
    present: torch.Tensor  # (b,) bool: False when the sample has no input of this modality (non-coding: no protein)

    def __post_init__(self) -> None:
        b, n, _ = self.x.shape
        if tuple(self.mask.shape) != (b, n):
            raise ValueError(f"mask shape {tuple(self.mask.shape)} does not match x shape {tuple(self.x.shape)}")
        if tuple(self.present.shape) != (b,):
            raise ValueError(f"present shape {tuple(self.present.shape)} does not match batch size {b}")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModalityBatch":
        x = self.x.to(device=device, dtype=dtype or self.x.dtype, non_blocking=True)
        return ModalityBatch(x=x, mask=self.mask.to(device, non_blocking=True), present=self.present.to(device, non_blocking=True))


@dataclass
class Batch:
    """One minibatch: features by modality name ('dna', 'rna', 'protein', ...) and targets."""

    features: dict[str, ModalityBatch]
    targets: torch.Tensor  # (b, t) float; 0.0 where target_mask is False
    target_mask: torch.Tensor  # (b, t) bool: False for a missing target value (masked out of the loss)
    sample_ids: list[str]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        return Batch(
            features={m: f.to(device, dtype) for m, f in self.features.items()},
            targets=self.targets.to(device, non_blocking=True),
            target_mask=self.target_mask.to(device, non_blocking=True),
            sample_ids=self.sample_ids,
        )

    def __len__(self) -> int:
        return len(self.sample_ids)
