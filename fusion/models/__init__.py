"""IsoFormer fusion models: per-modality features (ModalityBatch) -> one prediction per target.

AGGREGATORS is the explicit registry of ways to turn modality tokens into h_multi; a
config names one of its keys.
"""

from fusion.models.c_abstractor import CAbstractor
from fusion.models.cross_attention import CrossAttentionAggregator
from fusion.models.perceiver import PerceiverResampler
from fusion.models.pooling import Aggregator, LinearProjection, MeanConcat, masked_mean

AGGREGATORS: dict[str, type[Aggregator]] = {
    "cross-attention": CrossAttentionAggregator,  # IsoFormer: each modality attends to the others
    "perceiver": PerceiverResampler,  # learned latents attend to all tokens
    "c-abstractor": CAbstractor,  # conv blocks + mask-aware adaptive pooling (Honeybee)
    "mean-concat": MeanConcat,  # masked mean per modality, concatenated, MLP head
    "linear": LinearProjection,  # masked mean per modality, concatenated, single Linear head
}


def get_aggregator(name: str) -> type[Aggregator]:
    """The aggregator class registered as `name`; an unknown name is an error listing the valid ones."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; valid names are {sorted(AGGREGATORS)}") from None


# Imported after the registry on purpose: both modules look it up from this package.
from fusion.models.config import FusionModelConfig, input_dims_from_dict  # noqa: E402
from fusion.models.fusion_model import FusionModel  # noqa: E402

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "CAbstractor",
    "CrossAttentionAggregator",
    "FusionModel",
    "FusionModelConfig",
    "LinearProjection",
    "MeanConcat",
    "PerceiverResampler",
    "get_aggregator",
    "input_dims_from_dict",
    "masked_mean",
]
