"""The explicit registry of encoders. `load_encoder(name, settings)` is the only way in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from embedcache.encoders.base import Encoder, EncoderSettings, LoraTargets, WindowOutput
from embedcache.encoders.enformer import load_enformer
from embedcache.encoders.hf import load_esm2, load_hf, load_nucleotide_transformer
from embedcache.errors import EncoderError


@dataclass(frozen=True)
class EncoderEntry:
    load: Callable[..., Encoder]  # (settings, *, weights=True) -> Encoder
    modality: str  # what it reads: "protein", "dna" (DNA or RNA as cDNA), "any"
    default_model: str | None  # used when --model is not given; None: --model is required
    description: str


ENCODERS: dict[str, EncoderEntry] = {
    "esm2": EncoderEntry(
        load_esm2, "protein", "facebook/esm2_t30_150M_UR50D", "ESM2 protein language model (HF EsmModel)"
    ),
    "nucleotide-transformer": EncoderEntry(
        load_nucleotide_transformer,
        "dna",
        "InstaDeepAI/nucleotide-transformer-v2-250m-multi-species",
        "Nucleotide Transformer, DNA or RNA as cDNA, 6-mer tokens (v2 needs --trust-remote-code)",
    ),
    "enformer": EncoderEntry(
        load_enformer,
        "dna",
        "EleutherAI/enformer-official-rough",
        "Enformer trunk (enformer-pytorch, extra: pip install 'embedcache[enformer]'), fixed window",
    ),
    "hf": EncoderEntry(load_hf, "any", None, "any transformers AutoModel + AutoTokenizer (hub id or directory)"),
}


def encoder_entry(name: str) -> EncoderEntry:
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; valid encoders are: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def load_encoder(name: str, settings: EncoderSettings, *, weights: bool = True) -> Encoder:
    """The encoder `name` loaded as `settings` say. weights=False: tokenizer and config only, for planning
    (`--dry-run`): the encoder tokenizes, plans windows and describes itself, but cannot embed."""
    return encoder_entry(name).load(settings, weights=weights)


__all__ = ["ENCODERS", "Encoder", "EncoderEntry", "EncoderSettings", "LoraTargets", "WindowOutput", "encoder_entry", "load_encoder"]
