"""The fusion model's one flat, frozen config; it is written into every checkpoint.

Defaults for sizes (d_model, n_layers, ...) are choices of this project, not facts from
the IsoFormer paper (arXiv 2406.14150), which does not report them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


def input_dims_from_dict(dims: Mapping[str, int], modalities: tuple[str, ...] | list[str]) -> tuple[tuple[str, int], ...]:
    """Build `FusionModelConfig.input_dims` from `{modality: dim}` (e.g. read from embedding stores' attrs).

    Keeps exactly `modalities`, in that order; a store the model does not use is left out
    on purpose here, so the config itself can stay strict.
    """
    missing = [m for m in modalities if m not in dims]
    if missing:
        raise ValueError(f"no input dim for modalities {missing}; dims are known for {sorted(dims)}")
    return tuple((m, int(dims[m])) for m in modalities)


HEADS = ("mlp", "residual", "linear")  # see fusion.models.fusion_model.RegressionHead


@dataclass(frozen=True, slots=True)
class FusionModelConfig:
    """Everything needed to rebuild a `FusionModel`; `to_dict()` / `from_dict()` round-trip it through JSON."""

    modalities: tuple[str, ...]  # modality names in h_multi order, e.g. ("dna", "rna", "protein")
    input_dims: tuple[tuple[str, int], ...]  # (modality, per-token width) pairs, read from the stores' attrs, never from flags
    n_targets: int  # number of regression outputs (30 GTEx tissues in IsoFormer)
    target_names: tuple[str, ...]  # one name per output, in output order (tissue names)
    aggregator: str  # key of fusion.models.AGGREGATORS: how modality tokens become one vector
    d_model: int = 128  # common width every modality is projected to
    n_layers: int = 2  # attention layers (cross-attention, perceiver) or conv blocks per stage (c-abstractor)
    n_heads: int = 4  # attention heads; must divide d_model
    n_latents: int = 16  # perceiver latents / c-abstractor queries per modality
    dropout: float = 0.5  # dropout in attention, feed-forward and conv blocks, and the MLP head (0.5: benchmarks/bench_fusion_sweep.py)
    head_hidden: int = 256  # hidden width of the MLP head (unused by the 'linear' aggregator)
    input_norm: bool = False  # LayerNorm after each modality's input projection (off: it rescales each pooled vector by its own norm and cost the sweep 0.02-0.03 R^2)
    head: str = "residual"  # residual (mlp + a linear skip from h_multi: contains a linear probe on h_multi) | mlp | linear; the 'linear' aggregator always uses linear
    pooled_probe: bool = False  # add a linear map of each modality's token mean, standardised between samples, to the predictions (FusionModel)

    def __post_init__(self) -> None:
        # Normalise lists (e.g. straight from JSON) to tuples so the frozen config stays hashable.
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "input_dims", tuple((str(m), int(d)) for m, d in self.input_dims))
        object.__setattr__(self, "target_names", tuple(self.target_names))
        if not self.modalities:
            raise ValueError("modalities is empty; expected at least one, e.g. ('dna', 'rna', 'protein')")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {self.modalities} contain duplicates")
        bad = [m for m in self.modalities if not m or "." in m]
        if bad:
            raise ValueError(f"modality names {bad} are invalid: must be non-empty and contain no '.'")
        dim_names = [m for m, _ in self.input_dims]
        if dim_names != list(self.modalities):
            raise ValueError(
                f"input_dims are for {dim_names} but modalities are {list(self.modalities)}; "
                "build them with input_dims_from_dict(dims, modalities)"
            )
        nonpositive = {m: d for m, d in self.input_dims if d <= 0}
        if nonpositive:
            raise ValueError(f"input_dims must be positive, got {nonpositive}")
        if self.n_targets <= 0:
            raise ValueError(f"n_targets must be positive, got {self.n_targets}")
        if len(self.target_names) != self.n_targets:
            raise ValueError(f"target_names has {len(self.target_names)} names but n_targets is {self.n_targets}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) is not a multiple of n_heads ({self.n_heads})")
        for name in ("d_model", "n_heads", "n_latents", "head_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {self.n_layers}")
        if not isinstance(self.pooled_probe, bool):
            raise ValueError(f"pooled_probe must be true or false, got {self.pooled_probe!r}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; valid heads are {list(HEADS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # Imported here, not at module top, because fusion.models (the registry) imports this module.
        from fusion.models import get_aggregator

        get_aggregator(self.aggregator)  # raises, listing the valid names

    def input_dim(self, modality: str) -> int:
        """Per-token input width of `modality`."""
        return dict(self.input_dims)[modality]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists and a {modality: dim} mapping) for checkpoints."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["modalities"] = list(self.modalities)
        out["input_dims"] = dict(self.input_dims)
        out["target_names"] = list(self.target_names)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FusionModelConfig":
        """Inverse of `to_dict`; unknown or missing keys are errors that name them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FusionModelConfig keys {unknown}; known keys are {sorted(known)}")
        kwargs = dict(d)
        dims = kwargs.get("input_dims")
        modalities = list(kwargs.get("modalities", ()))
        if isinstance(dims, Mapping):
            # Put the dims in modality order; a set mismatch is left for __post_init__ to report.
            same = set(dims) == set(modalities)
            kwargs["input_dims"] = input_dims_from_dict(dims, modalities) if same else tuple(dims.items())
        try:
            return cls(**kwargs)
        except TypeError as e:  # missing required fields
            raise ValueError(f"cannot build FusionModelConfig from keys {sorted(d)}: {e}") from e
