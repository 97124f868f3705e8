"""The one frozen config of the embedding stage, and the fingerprint derived from it."""

from __future__ import annotations

import hashlib
import math
import json
from dataclasses import asdict, dataclass, fields

from embedcache.encoders import EncoderSettings, encoder_entry
from embedcache.errors import EncoderError
from embedcache.reduce import fingerprint_part
from embedcache.store import SCHEMA_VERSION, TOKEN_CODECS
from embedcache.windows import CROPS

POOLINGS = ("mean", "cls", "center", "none")
TOKEN_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class BuildConfig:
    """Everything `embedcache build` was asked to do. Written into every store it builds."""

    encoder: str  # registry name: esm2 | nucleotide-transformer | enformer | hf
    model: str  # hub id or local directory (default: the encoder's default model)
    revision: str | None = None  # hub revision; None = default branch
    trust_remote_code: bool = False  # allow the checkpoint's own code (NT v2)
    layers: tuple[int, ...] = (-1,)  # hidden-state indices, all from one forward pass; -1 = last layer, 0 = embedding output
    window: int | None = None  # content tokens per model call (Enformer: input bp); None = model maximum
    overlap: int | None = None  # tokens shared by consecutive windows of a long sequence; None = window // 4
    crop: str | None = None  # None = never crop (window long sequences); left | right | center = crop to max_length
    max_length: int | None = None  # tokens kept by --crop (default: the window)
    pooling: str = "mean"  # mean (real tokens only) | cls | center (mean of central pool_bins) | none
    pool_bins: int | None = None  # rows averaged by pooling=center (e.g. Enformer bins around the TSS)
    tokens: bool = True  # store per-token embeddings
    token_bins: int | None = None  # keep only the central K per-token rows (Enformer: 896 bins are 5.5 MB/gene in fp16)
    token_pool: int | None = None  # store the mean of every K consecutive per-token rows (embedcache.reduce): K-fold less to store and stream
    dtype: str = "float16"  # stored per-token dtype; pooled vectors are always float32
    precision: str = "auto"  # compute: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    alphabet: str | None = None  # hf encoder: validate residues as dna | rna | protein; None = any text
    attn_implementation: str | None = None  # transformers attention: sdpa | eager | flash_attention_2; None = sdpa where supported
    device: str = "auto"  # where the model runs (not part of the fingerprint)
    max_tokens: int = 8192  # token budget of one padded batch (not part of the fingerprint)
    shard_mb: float = 32.0  # target size of one per-token shard (layout only, not part of the fingerprint)
    token_codec: str = "none"  # per-token chunk compression: none | lz4 (blosc lz4 + bitshuffle); both keep a crc32c per chunk (layout only)
    unit_mb: float = 256.0  # per-token bytes of one work unit, in whole shards (scheduling only; resume is per unit)

    def __post_init__(self) -> None:
        encoder_entry(self.encoder)  # unknown name -> error listing the valid ones
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)  # JSON gives a list
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise EncoderError(f"--layer takes one or more integer hidden-state indices, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        if self.pooling not in POOLINGS:
            raise EncoderError(f"unknown --pooling {self.pooling!r}; expected one of {list(POOLINGS)}")
        if self.pooling == "center" and not self.pool_bins:
            raise EncoderError("--pooling center needs --pool-bins K (how many central rows to average)")
        if self.crop is not None and self.crop not in CROPS:
            raise EncoderError(f"unknown --crop {self.crop!r}; expected one of {list(CROPS)}")
        if self.max_length is not None and self.crop is None:
            raise EncoderError(
                f"--max-length {self.max_length} needs --crop left|right|center: nothing is cropped unless asked"
            )
        if self.token_codec not in TOKEN_CODECS:
            raise EncoderError(f"unknown --token-codec {self.token_codec!r}; expected one of {list(TOKEN_CODECS)}")
        if self.dtype not in TOKEN_DTYPES:
            raise EncoderError(f"unknown --dtype {self.dtype!r}; expected one of {list(TOKEN_DTYPES)}")
        if not self.tokens and self.pooling == "none":
            raise EncoderError("--no-tokens with --pooling none would store nothing")
        if self.max_tokens < 1:
            raise EncoderError(f"--max-tokens must be positive, got {self.max_tokens}")
        if not (isinstance(self.shard_mb, (int, float)) and math.isfinite(self.shard_mb) and self.shard_mb > 0):
            raise EncoderError(f"--shard-mb must be a positive number of megabytes, got {self.shard_mb!r}")
        for name in ("token_bins", "token_pool", "pool_bins", "window", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EncoderError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.overlap is not None and (not isinstance(self.overlap, int) or self.overlap < 0):
            raise EncoderError(f"--overlap must be a non-negative integer, got {self.overlap!r}")

    @classmethod
    def create(cls, encoder: str, model: str | None = None, **kwargs) -> "BuildConfig":
        """Fill in the encoder's default model when none is given."""
        entry = encoder_entry(encoder)
        model = model or entry.default_model
        if model is None:
            raise EncoderError(f"encoder {encoder!r} has no default model; pass --model (a hub id or a directory)")
        return cls(encoder=encoder, model=model, **kwargs)

    def encoder_settings(self) -> EncoderSettings:
        return EncoderSettings(
            model=self.model,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            layers=self.layers,
            window=self.window,
            device=self.device,
            precision=self.precision,
            alphabet=self.alphabet,
            attn_implementation=self.attn_implementation,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        names = {f.name for f in fields(cls)}
        if "layer" in d and "layers" not in d:  # stores built before several layers per build
            d = {**d, "layers": (d["layer"],)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Fields that change the numbers in a store. The rest (device, batch budget, shard size, model path)
# do not, so a store can be resumed on another machine or after moving the model directory.
_OUTPUT_FIELDS = ("crop", "max_length", "pooling", "pool_bins", "tokens", "token_bins", "dtype")
_PROVENANCE_NOT_IDENTITY = ("model",)


def fingerprint_fields(config: BuildConfig, provenance: dict, overlap: int) -> dict:
    """The JSON-safe dict the fingerprint hashes: the encoder's resolved provenance plus output settings."""
    d = {k: v for k, v in provenance.items() if k not in _PROVENANCE_NOT_IDENTITY}
    d.update({k: getattr(config, k) for k in _OUTPUT_FIELDS})
    d["overlap"] = overlap
    d.update(fingerprint_part(config.token_pool))
    d["schema_version"] = SCHEMA_VERSION
    return d


def fingerprint(fields_: dict) -> str:
    blob = json.dumps(fields_, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_key(sequence: str) -> str:
    """Content address of a (validated, upper-cased) sequence within a store's fingerprint."""
    return hashlib.sha256(sequence.encode()).hexdigest()
