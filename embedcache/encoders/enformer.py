"""Enformer trunk embeddings through enformer-pytorch.

Enformer takes a FIXED input window (196,608 bp for the official model) and returns one row per
128-bp bin of its central `target_length` bins (896 x 3072 for the official model). A shorter
sequence is padded with N (all-zero one-hot, as enformer-pytorch encodes N) equally on both sides
so it stays centred, which is how a TSS-centred window is meant to be read. A longer one is an
error unless the user asked for a crop.
"""

from __future__ import annotations

import numpy as np

from embedcache.alphabets import DNA
from embedcache.encoders.base import (
    Encoder,
    EncoderSettings,
    WindowOutput,
    check_model_location,
    resolve_device,
    resolve_precision,
    weights_identity,
)
from embedcache.errors import EncoderError

OFFICIAL_WINDOW = 196_608


def centre_pad(seq: str, window: int) -> str:
    """Pad `seq` with N on both sides to `window` letters; the odd letter goes to the right."""
    if len(seq) > window:
        raise ValueError(f"sequence of {len(seq)} bp is longer than the window of {window} bp")
    left = (window - len(seq)) // 2
    return "N" * left + seq + "N" * (window - len(seq) - left)


class EnformerEncoder(Encoder):
    name = "enformer"
    alphabet = DNA
    fixed_window = True
    has_cls = False

    def __init__(self, settings: EncoderSettings):
        from enformer_pytorch import from_pretrained

        check_model_location(settings.model)
        if settings.layer not in (-1,):
            raise EncoderError(
                f"--layer {settings.layer}: the enformer encoder returns the trunk output only; use --layer -1"
            )
        try:
            # The library's own loader: it also sets use_tf_gamma for the official port.
            model = from_pretrained(settings.model, revision=settings.revision)
        except OSError as e:
            raise EncoderError(
                f"cannot load Enformer {settings.model!r}: {e}. A hub id must be in the local Hugging Face "
                f"cache when offline (HF_HUB_OFFLINE=1); a local directory must come from save_pretrained."
            ) from e
        config = model.config
        self.settings = settings
        self.bin_size = 2**config.num_downsamples
        self.target_length = config.target_length
        self.window = settings.window or OFFICIAL_WINDOW
        n_bins = self.window // self.bin_size
        if self.window % self.bin_size or n_bins < self.target_length:
            raise EncoderError(
                f"--window {self.window} bp does not fit {settings.model!r}: it must be a multiple of the "
                f"{self.bin_size}-bp bin and give at least target_length={self.target_length} bins "
                f"(at least {self.target_length * self.bin_size} bp)"
            )
        self.embed_dim = config.dim * 2
        self.layer_index = 0
        self.device = resolve_device(settings.device)
        self.precision, self.autocast_dtype = resolve_precision(settings.precision, self.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._weights = weights_identity(settings.model, settings.revision, getattr(config, "_commit_hash", None))

    def tokenize(self, seq: str) -> np.ndarray:
        return np.frombuffer(seq.encode("ascii"), dtype=np.uint8)

    def cost(self, n_tokens: int) -> int:
        # Every window is padded to the full input; count its 128-bp bins, the transformer's tokens.
        return self.window // self.bin_size

    def encode_windows(self, windows: list[np.ndarray]) -> list[WindowOutput]:
        from enformer_pytorch import str_to_one_hot

        padded = [centre_pad(w.tobytes().decode("ascii"), self.window) for w in windows]
        one_hot = str_to_one_hot(padded).to(self.device)  # (b, window, 4)
        with self.autocast():
            emb = self.model(one_hot, return_only_embeddings=True)  # (b, target_length, 2 * dim)
        return [WindowOutput(hidden=emb[i], cls=None) for i in range(len(windows))]

    def n_output_rows(self, n_tokens: int) -> int:
        return self.target_length  # one row per output bin, whatever the sequence length

    def provenance(self) -> dict:
        return {
            "encoder": self.name,
            "model": self.settings.model,
            "weights": self._weights,
            "architecture": "Enformer",
            "layer": "trunk",
            "window": self.window,
            "bin_size": self.bin_size,
            "target_length": self.target_length,
            "padding": "N around the centre",
            "precision": self.precision,
            "alphabet": "dna",
        }


def load_enformer(settings: EncoderSettings) -> EnformerEncoder:
    return EnformerEncoder(settings)
