"""The fusion model: project each modality, aggregate into h_multi, predict every target."""

from __future__ import annotations

from typing import Iterable

import torch
from einops import rearrange
from torch import nn

from fusion.batch import Batch, ModalityBatch
from fusion.models import get_aggregator
from fusion.models.config import HEADS, FusionModelConfig
from fusion.models.pooling import masked_mean


PROBE_BOUND = 10.0  # the pooled probe's standardised inputs are clipped to +-this
MAX_MEAN_GAIN = 100.0  # the pooled probe's standardiser divides by at least the token standardiser's spread / this


class FeatureStandardizer(nn.Module):
    """(x - mean) / std per feature, with statistics fitted on the training split (buffers, not learned).

    Pooled embeddings of different sequences share a large common component (mean pooling over
    hundreds of tokens averages the differences down); without centring, Linear + LayerNorm sees a
    near-constant input and the between-sequence signal is lost. Fitted statistics live in the
    state dict, so a checkpoint standardises new data exactly as it did its training data.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (b, n, d)


class TargetStandardizer(nn.Module):
    """Per-target (y - mean) / std with statistics fitted on the training split (buffers, not learned).

    The model predicts standardised targets and `decode` maps them back, so predictions and metrics
    stay in the manifest's units while the head starts at the training mean with unit-scale outputs
    (log1p TPM sits around 2-4: unstandardised, the head's bias spends the first epochs walking there,
    and tissues with wide spread dominate the loss). The training loss is taken in standardised units
    (`encode` both sides), so every target weighs the same. The statistics live in the state dict, so
    a checkpoint carries them; unfitted they are the identity.
    """

    def __init__(self, n_targets: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_targets))
        self.register_buffer("std", torch.ones(n_targets))

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std  # (b, t)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean  # (b, t)


def mlp_head(h: int, hidden: int, n_targets: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> Dropout -> Linear: (b, h) -> (b, n_targets)."""
    return nn.Sequential(nn.Linear(h, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_targets))


class ResidualHead(nn.Module):
    """The MLP head plus a Linear straight from h_multi: (b, h) -> (b, n_targets).

    The linear path alone is a ridge-like probe on h_multi, so the model contains what a probe
    learns and the MLP (under dropout) adds to it. The default: with dropout 0.5 and real weight decay
    it matched or beat the ridge probe where the plain MLP head fell short, on gene-level DNA most
    (sweep in benchmarks/README.md).
    """

    def __init__(self, h: int, hidden: int, n_targets: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(h, n_targets)
        self.mlp = mlp_head(h, hidden, n_targets, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h) + self.mlp(h)  # (b, t)


def make_head(kind: str, h: int, hidden: int, n_targets: int, dropout: float) -> nn.Module:
    """The regression head named `kind` (one of HEADS): mlp, residual (mlp + linear skip) or linear."""
    if kind == "mlp":
        return mlp_head(h, hidden, n_targets, dropout)
    if kind == "residual":
        return ResidualHead(h, hidden, n_targets, dropout)
    if kind == "linear":
        return nn.Linear(h, n_targets)
    raise ValueError(f"unknown head {kind!r}; valid heads are {list(HEADS)}")


class FusionModel(nn.Module):
    """features {modality: ModalityBatch (x (b, n_m, d_m), mask (b, n_m), present (b,))} -> (b, n_targets).

    Per modality: standardisation (fitted on the training split by `fit_feature_stats_`), then
    Linear(d_m -> d_model) (+ LayerNorm with config.input_norm), plus a learned modality embedding;
    then the configured aggregator -> h_multi (b, out_dim); then the head: an MLP
    (Linear -> GELU -> Dropout -> Linear; config.head: or that plus a linear skip, or one Linear), a
    single Linear for the 'linear' aggregator; the head predicts standardised targets, which
    `target_norm` maps back to the targets' units.

    With config.pooled_probe (per-token inputs), a linear map of each modality's mean token, standardised
    by how such means spread between samples (`standardize_mean`), is added to the head's output: the
    between-sample part of the rows, which standardising over all rows can shrink below use, reaches the
    predictions at full scale (docs/fusion.md).

    A token counts only where `mask & present`; values of x elsewhere never enter (they
    may be anything, NaN included). An absent modality contributes zeros to h_multi.
    """

    def __init__(self, config: FusionModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.standardize = nn.ModuleDict({m: FeatureStandardizer(d_in) for m, d_in in config.input_dims})
        self.target_norm = TargetStandardizer(config.n_targets)
        self.input_proj = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d_in, d), nn.LayerNorm(d) if config.input_norm else nn.Identity()) for m, d_in in config.input_dims}
        )
        self.modality_embedding = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in config.modalities})
        self.aggregator = get_aggregator(config.aggregator).from_config(config)
        h = self.aggregator.out_dim
        head = config.head if self.aggregator.mlp_head else "linear"
        self.head = make_head(head, h, config.head_hidden, config.n_targets, config.dropout)
        if config.pooled_probe:
            self.standardize_mean = nn.ModuleDict({m: FeatureStandardizer(d_in) for m, d_in in config.input_dims})
            self.pooled_probe = nn.Linear(sum(d for _, d in config.input_dims), config.n_targets)
            nn.init.zeros_(self.pooled_probe.weight)  # at initialisation the model is what it is without it
            nn.init.zeros_(self.pooled_probe.bias)

    def forward(self, features: dict[str, ModalityBatch]) -> torch.Tensor:
        """features keyed by exactly the configured modalities -> predictions (b, n_targets)."""
        self._check_features(features)
        tokens: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for m in self.config.modalities:
            f = features[m]
            mask = f.mask & rearrange(f.present, "b -> b 1")  # (b, n): absent means no real token
            keep = rearrange(mask, "b n -> b n 1")  # (b, n, 1)
            x = torch.where(keep, f.x, 0.0)  # (b, n, d_m): garbage under the mask (even NaN) never enters
            h = self.input_proj[m](self.standardize[m](x)) + self.modality_embedding[m]  # (b, n, d)
            tokens[m] = torch.where(keep, h, 0.0)  # (b, n, d): zero where masked, as ModalityBatch promises
            masks[m] = mask
        h_multi = self.aggregator(tokens, masks)  # (b, out_dim)
        out = self.head(h_multi)  # (b, n_targets), standardised
        if self.config.pooled_probe:
            out = out + self.pooled_probe(torch.cat([self._standard_mean(m, features[m], masks[m]) for m in self.config.modalities], dim=-1))
        return self.target_norm.decode(out)  # (b, n_targets), in the targets' units

    def _standard_mean(self, m: str, f: ModalityBatch, mask: torch.Tensor) -> torch.Tensor:
        """Modality m's mean token (b, d_m), standardised by the spread of such means between samples (zero where absent)."""
        # Detached: through live encoders, a gradient scaled up by that (small) spread would be scaled up as much.
        mean = masked_mean(f.x.detach().float(), mask)  # (b, d_m)
        # Bounded: a trainable encoder's drift reaches it scaled up too; beyond PROBE_BOUND spreads it is no sample seen in training.
        standard = self.standardize_mean[m](mean).clamp(-PROBE_BOUND, PROBE_BOUND)  # (b, d_m)
        return torch.where(rearrange(mask.any(-1), "b -> b 1"), standard, 0.0)

    def _check_features(self, features: dict[str, ModalityBatch]) -> None:
        expected = set(self.config.modalities)
        unknown = sorted(set(features) - expected)
        if unknown:
            raise ValueError(f"features for modalities {unknown} that the model does not use; configured: {list(self.config.modalities)}")
        missing = [m for m in self.config.modalities if m not in features]
        if missing:
            raise ValueError(
                f"features are missing modalities {missing} (got {sorted(features)}); "
                "pass an absent modality as a ModalityBatch with present=False and an all-False mask"
            )
        sizes = {m: f.x.shape[0] for m, f in features.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch sizes differ between modalities: {sizes}")
        for m, d_in in self.config.input_dims:
            got = features[m].x.shape[-1]
            if got != d_in:
                raise ValueError(f"modality {m!r}: features have width {got} but the model was configured with input dim {d_in}")


@torch.no_grad()
def fit_feature_stats_(model: FusionModel, batches: Iterable[Batch]) -> dict[str, int]:
    """Set each modality's standardisation from the real tokens of `batches` (pass the training split),
    and the target standardisation from their valid target values.

    Returns the number of tokens each modality's statistics were computed from.
    """
    total: dict[str, torch.Tensor] = {}
    total_sq: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    means: dict[str, _Moments] = {}  # per modality: its present samples' mean tokens
    y_sum = y_sq = y_n = 0
    for batch in batches:
        valid = batch.target_mask.bool()  # (b, t)
        y = torch.where(valid, batch.targets, 0.0).double()  # (b, t)
        y_sum, y_sq, y_n = y_sum + y.sum(0), y_sq + (y * y).sum(0), y_n + valid.sum(0)
        for m, f in batch.features.items():
            if m not in model.standardize:
                continue
            keep = f.mask & rearrange(f.present, "b -> b 1")  # (b, n)
            x = f.x[keep].double()  # (k, d): real tokens only
            if model.config.pooled_probe:
                sample_means = masked_mean(f.x.float(), keep)[keep.any(-1)].double()  # (present, d)
                if len(sample_means):
                    means.setdefault(m, _Moments(sample_means[0])).add(sample_means)
            total[m] = total.get(m, 0) + x.sum(0)
            total_sq[m] = total_sq.get(m, 0) + (x * x).sum(0)
            count[m] = count.get(m, 0) + len(x)
    for m, n in count.items():
        if n < 2:
            continue
        mean = total[m] / n
        var = (total_sq[m] / n - mean * mean).clamp_min(0)
        norm = model.standardize[m]
        norm.mean.copy_(mean.float())
        # A feature that barely varies (std far below the others') carries no signal but would turn
        # float16 rounding of stored features into visible noise once divided by its std: floor it.
        std = var.sqrt().float()
        norm.std.copy_(std.clamp_min(max(1e-6, 1e-2 * float(std.median()))))
    for m, moments in means.items():
        if moments.n < 2:
            continue
        norm = model.standardize_mean[m]
        norm.mean.copy_(moments.mean.float())
        std = moments.std.float()  # between samples
        # Floored, as the token standardiser is, and at most MAX_MEAN_GAIN times finer than it: below that, float16
        # rounding of the stored rows (and a live encoder's drift) would be scaled up into the probe's input.
        floor = torch.maximum(torch.full_like(std, 1e-2 * float(std.median())), model.standardize[m].std / MAX_MEAN_GAIN)
        norm.std.copy_(torch.maximum(std, floor.clamp_min(1e-12)))
    _fit_target_stats_(model.target_norm, y_sum, y_sq, y_n)
    return count


class _Moments:
    """Mean and sample std per feature of rows added batch by batch, as float64 sums shifted by a first row
    (no cancellation when the rows' spread is far below their mean), holding no row."""

    def __init__(self, shift: torch.Tensor) -> None:
        self.shift, self.n, self.s1, self.s2 = shift, 0, torch.zeros_like(shift), torch.zeros_like(shift)

    def add(self, rows: torch.Tensor) -> None:
        d = rows - self.shift  # (k, d)
        self.n, self.s1, self.s2 = self.n + len(rows), self.s1 + d.sum(0), self.s2 + (d * d).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    @property
    def std(self) -> torch.Tensor:
        return ((self.s2 - self.s1 * self.s1 / self.n) / (self.n - 1)).clamp_min(0).sqrt()


def _fit_target_stats_(norm: TargetStandardizer, y_sum, y_sq, y_n) -> None:
    """Mean and std per target from sums over valid values; a target seen < 2 times or constant keeps std 1."""
    if not torch.is_tensor(y_n):
        return  # no batches
    n = y_n.double().clamp_min(1)
    mean = y_sum / n
    std = (y_sq / n - mean * mean).clamp_min(0).sqrt()
    usable = (y_n >= 2) & (std > 1e-8)
    norm.mean.copy_(torch.where(y_n > 0, mean, 0.0).float())
    norm.std.copy_(torch.where(usable, std, 1.0).float())
