"""Enformer trunk embeddings through enformer-pytorch.

Enformer takes a FIXED input window (196,608 bp for the official model) and returns one row per
128-bp bin of its central `target_length` bins (896 x 3072 for the official model). A shorter
sequence is padded with N (all-zero one-hot, as enformer-pytorch encodes N) equally on both sides
so it stays centred, which is how a TSS-centred window is meant to be read. A longer one is an
error unless the user asked for a crop.

enformer-pytorch is an optional extra (`pip install 'embedcache[enformer]'`, exactly 0.8.11: 0.8.12
pins transformers 4.56.2). Its own `from_pretrained` fails on transformers 5, so the model loads
through `load_enformer_model` below.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import torch
from einops import rearrange

from embedcache.alphabets import DNA
from embedcache.encoders.base import (
    Encoder,
    EncoderSettings,
    LoraTargets,
    WindowOutput,
    check_model_location,
    resolve_device,
    resolve_precision,
    weights_identity,
)
from embedcache.errors import EncoderError

OFFICIAL_WINDOW = 196_608
OFFICIAL_MODEL = "EleutherAI/enformer-official-rough"  # the TF port, whose attention needs use_tf_gamma
EXTRA = "enformer"  # the pyproject extra that installs enformer-pytorch


def enformer_available() -> bool:
    return importlib.util.find_spec("enformer_pytorch") is not None


def require_enformer() -> None:
    """Fail with the install command when the optional enformer-pytorch package is missing."""
    if not enformer_available():
        raise EncoderError(
            f"the enformer encoder needs the optional package enformer-pytorch, which is not installed: "
            f"pip install 'embedcache[{EXTRA}]'"
        )


def load_enformer_model(model: str, revision: str | None = None) -> torch.nn.Module:
    """enformer-pytorch's Enformer from a hub id or a save_pretrained directory, on transformers 5.

    transformers 5's from_pretrained reads attributes that `PreTrainedModel.post_init` sets, which
    Enformer's constructor (written for 4.x) never calls; the subclass only adds that call. The
    official port also gets use_tf_gamma, as enformer-pytorch's own `from_pretrained` gives it.
    """
    from enformer_pytorch import Enformer
    from enformer_pytorch.modeling_enformer import Attention

    class LoadableEnformer(Enformer):
        def __init__(self, config):
            super().__init__(config)
            self.post_init()

    enformer = LoadableEnformer.from_pretrained(model, revision=revision)
    if model == OFFICIAL_MODEL:
        for module in enformer.modules():
            if isinstance(module, Attention):
                module.use_tf_gamma = True
    return enformer


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

    def __init__(self, settings: EncoderSettings, *, weights: bool = True):
        require_enformer()
        from enformer_pytorch import EnformerConfig

        check_model_location(settings.model)
        if tuple(settings.layers) != (-1,):
            raise EncoderError(
                f"--layer {' '.join(map(str, settings.layers))}: the enformer encoder returns the trunk output only, "
                f"one layer; use --layer -1"
            )
        if settings.attn_implementation is not None:
            raise EncoderError(
                f"--attn-implementation {settings.attn_implementation}: the enformer encoder has its own attention "
                f"(relative positions, enformer-pytorch); the option is for transformers models"
            )
        try:
            if weights:
                model = load_enformer_model(settings.model, settings.revision)
                config = model.config
            else:
                config = EnformerConfig.from_pretrained(settings.model, revision=settings.revision)
        except OSError as e:
            raise EncoderError(
                f"cannot load Enformer {settings.model!r}: {e}. A hub id must be in the local Hugging Face "
                f"cache when offline (HF_HUB_OFFLINE=1); a local directory must come from save_pretrained."
            ) from e
        self.settings = settings
        self.planning_only = not weights
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
        self.layer_indices = (0,)
        device = resolve_device(settings.device)
        self.precision, self.autocast_dtype = resolve_precision(settings.precision, device)
        if weights:
            self.model = model.to(device).eval().requires_grad_(False)
        else:
            self.model = torch.nn.Module()  # planning only: nothing to run
        self._checkpoint_hook = None
        self._weights = weights_identity(settings.model, settings.revision, getattr(config, "_commit_hash", None))

    def tokenize(self, seq: str) -> np.ndarray:
        return np.frombuffer(seq.encode("ascii"), dtype=np.uint8)

    def count_tokens(self, seq: str) -> int:
        return len(seq)  # one token per base (the alphabet check has made it ASCII)

    def cost(self, n_tokens: int) -> int:
        # Every window is padded to the full input; count its 128-bp bins, the transformer's tokens.
        return self.window // self.bin_size

    def encode_windows(self, windows: list[np.ndarray]) -> list[WindowOutput]:
        from enformer_pytorch import str_to_one_hot

        if self.planning_only:
            raise EncoderError(f"encoder enformer for {self.settings.model!r} was loaded without weights (planning only)")
        padded = [centre_pad(w.tobytes().decode("ascii"), self.window) for w in windows]
        one_hot = str_to_one_hot(padded).to(self.device)  # (b, window, 4)
        with self.autocast():
            emb = self.model(one_hot, return_only_embeddings=True)  # (b, target_length, 2 * dim)
        emb = rearrange(emb, "b n d -> b n 1 d")  # the trunk is the one layer
        return [WindowOutput(hidden=emb[i], cls=None) for i in range(len(windows))]

    def n_output_rows(self, n_tokens: int) -> int:
        return self.target_length  # one row per output bin, whatever the sequence length

    # -- what fine-tuning needs: the trunk output follows every transformer block and the final pointwise block

    def blocks_feeding_output(self) -> list[str]:
        return [f"transformer.{i}" for i in range(len(self.model.transformer))]

    def modules_after_blocks(self) -> list[str]:
        return ["final_pointwise"]

    def lora_targets(self) -> LoraTargets:
        return LoraTargets(("to_q", "to_k", "to_v"))

    def set_gradient_checkpointing_(self, enabled: bool) -> None:
        # enformer-pytorch checkpoints (checkpoint_sequential over the transformer blocks) whenever asked,
        # in eval too, so this is switched with the training mode.
        self.model.use_checkpointing = enabled
        if enabled and self._checkpoint_hook is None:
            # Its checkpoint is the reentrant kind, which gives no gradient to blocks whose input does not
            # require one (a frozen conv tower under lora / last-n): make the blocks' input require grad.
            self._checkpoint_hook = self.model.conv_tower.register_forward_hook(
                lambda _m, _i, out: out.requires_grad_() if torch.is_grad_enabled() and not out.requires_grad else out
            )
            warnings.filterwarnings("ignore", message=".*use_reentrant parameter should be passed explicitly.*")

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


def load_enformer(settings: EncoderSettings, *, weights: bool = True) -> EnformerEncoder:
    return EnformerEncoder(settings, weights=weights)
