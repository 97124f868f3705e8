"""What every encoder provides to the build: tokenize, forward a batch of windows, describe itself."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator, Sequence

import numpy as np
import torch

from embedcache.alphabets import Alphabet
from embedcache.errors import EncoderError


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """The user's choices that decide how an encoder is loaded and run."""

    model: str  # hub id or local directory
    revision: str | None = None  # hub revision (branch, tag or commit); None = the default branch
    trust_remote_code: bool = False  # allow the checkpoint's own Python code (NT v2 needs it)
    layers: tuple[int, ...] = (-1,)  # hidden states to output, one forward pass: 0 = embeddings, i = after block i, -1 = last
    window: int | None = None  # tokens (bp for Enformer) per model call; None = the model's maximum
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    alphabet: str | None = None  # hf encoder only: validate against "dna" | "rna" | "protein"; None = any text
    attn_implementation: str | None = None  # transformers models: sdpa | eager | flash_attention_2; None = sdpa where supported


@dataclass(frozen=True, slots=True)
class LoraTargets:
    """What LoRA adapts in an encoder's model: peft `target_modules` and whether their weights are (in, out)."""

    modules: tuple[str, ...] | str  # module names, or peft's "all-linear"
    fan_in_fan_out: bool = False  # GPT-2-style Conv1D projections store their weight transposed


@dataclass
class WindowOutput:
    hidden: torch.Tensor  # (n, k, d): one row per content token (Enformer: per output bin) for each of k layers
    cls: torch.Tensor | None  # (k, d) the leading special token's states, when the tokenizer adds one


class Encoder(ABC):
    """A loaded model, ready to embed windows of tokens, and what fine-tuning may change in it.

    Fine-tuning (fusion.finetune) knows encoders only through this interface: `blocks_feeding_output`
    and `modules_after_blocks` (last-n), `lora_targets` (lora), `set_gradient_checkpointing_`,
    `set_precision_` and `to_` (the device is where `model` is).
    """

    name: str  # registry name
    alphabet: Alphabet | None  # residues accepted (upper case); None = any text, case kept
    embed_dim: int  # width of one output row
    window: int  # content tokens per model call (Enformer: the fixed input window in bp)
    fixed_window: bool = False  # True: one window per sequence; longer sequences need an explicit crop
    equal_length_batches: bool = False  # True when the model takes no attention mask
    has_cls: bool = False  # the tokenizer adds a leading special token
    layer_indices: tuple[int, ...]  # resolved hidden-state indices, ascending: the k layers of every output
    precision: str  # what the store records: fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None
    planning_only: bool = False  # loaded without weights (`load_encoder(..., weights=False)`): plans, never embeds

    @abstractmethod
    def tokenize(self, seq: str) -> np.ndarray:
        """Content token ids of the whole sequence, no special tokens: (n,) int."""

    def count_tokens(self, seq: str) -> int:
        """len(self.tokenize(seq)): what planning needs. Encoders that can count without making the
        ids override it, so planning a chromosome-long record stays small."""
        return len(self.tokenize(seq))

    model: torch.nn.Module

    @abstractmethod
    def encode_windows(self, windows: list[np.ndarray]) -> Sequence[WindowOutput]:
        """Run the model on a batch of windows (each a slice of `tokenize` output), under autocast.

        Outputs stay on the device in the compute dtype, and gradients flow when enabled: the
        end-to-end finetune mode trains through this exact function.
        """

    def pack(self, windows: list[np.ndarray]) -> object | None:
        """The model's inputs for a batch of `windows`, made before its forward: a build makes them on the
        thread that prepares a unit, beside the previous unit's forward, so the forward thread only calls the
        model. None: this encoder makes its inputs in `encode_windows`."""
        return None

    def encode_packed(self, packed: object) -> Sequence[WindowOutput]:
        """`encode_windows` of the windows that `pack` made `packed` of."""
        raise NotImplementedError(f"the {self.name} encoder packs no batch ahead (its `pack` gives None)")

    def forward(self, windows: list[np.ndarray], to_host: bool = True, packed: object | None = None) -> Sequence[WindowOutput]:
        """`encode_windows` for building stores: no autograd; float32 outputs on the CPU, or (`to_host=False`)
        left on the device for `embedcache.device_stage` to reduce there. `packed`: `pack(windows)`, made ahead."""
        with torch.inference_mode():
            outs = self.encode_windows(windows) if packed is None else self.encode_packed(packed)
            return windows_to_host(outs) if to_host else outs

    @property
    def layer_index(self) -> int:
        """The one hidden state this encoder outputs (fine-tuning trains towards a single layer)."""
        if len(self.layer_indices) != 1:
            raise EncoderError(
                f"the {self.name} encoder outputs layers {list(self.layer_indices)}; fine-tuning needs exactly one"
            )
        return self.layer_indices[0]

    @abstractmethod
    def cost(self, n_tokens: int) -> int:
        """Positions one window of `n_tokens` content tokens occupies in a batch (for the token budget)."""

    def n_output_rows(self, n_tokens: int) -> int:
        """Rows one sequence of `n_tokens` content tokens yields (one per token; Enformer: per output bin)."""
        return n_tokens

    @abstractmethod
    def provenance(self) -> dict:
        """What identifies the computation: model id, weights identity, layer, window, ... (JSON-safe)."""

    # -- device and precision

    @property
    def device(self) -> torch.device:
        """Where the model is (it follows the module when a caller moves it)."""
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    def to_(self, device: str | torch.device) -> "Encoder":
        """Move the model to `device` ("auto", "cpu", "cuda:1", ...); the precision is checked again there."""
        dev = resolve_device(str(device))
        self.model.to(dev)
        self.set_precision_(self.precision)
        return self

    def set_precision_(self, precision: str) -> None:
        """Compute precision of `encode_windows` (autocast dtype) on the model's device."""
        self.precision, self.autocast_dtype = resolve_precision(precision, self.device)

    # -- what fine-tuning needs (fusion.finetune)

    def blocks_feeding_output(self) -> list[str]:
        """Names (in `model`) of the blocks whose outputs lead to the stored output, first to last."""
        raise EncoderError(f"the {self.name} encoder does not expose its blocks; use full or frozen training")

    def modules_after_blocks(self) -> list[str]:
        """Names of the modules between the last block and the output (a final norm), trained with the
        last block by last-n; empty when the output is an inner layer's."""
        return []

    def lora_targets(self) -> LoraTargets:
        """The modules LoRA adapts in `model`."""
        raise EncoderError(f"the {self.name} encoder names no modules for LoRA; use full, last-n or frozen training")

    def set_gradient_checkpointing_(self, enabled: bool) -> None:
        """Recompute activations in backward (on) or keep them (off)."""
        raise EncoderError(f"the {self.name} encoder ({type(self.model).__name__}) supports no gradient checkpointing")

    def autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def windows_to_host(outs: Sequence[WindowOutput]) -> Sequence[WindowOutput]:
    """Window outputs as float32 CPU tensors: as they are when they already are, else in one transfer.

    The outputs of one batch are views of one tensor; a GPU batch comes back in one copy, not one per window.
    """
    tensors = [o.hidden for o in outs] + [o.cls[None] for o in outs if o.cls is not None]
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return outs  # CPU fp32 inference: no copy at all
    host = torch.cat(tensors).float().cpu()  # (sum of rows, d): one device-to-host copy
    rows = host.split([len(t) for t in tensors])
    cls = iter(rows[len(outs) :])
    return [WindowOutput(hidden=h, cls=next(cls)[0] if o.cls is not None else None) for h, o in zip(rows, outs)]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"--device {device!r} asked for CUDA, but torch sees no CUDA device")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """Return (name recorded in the store, autocast dtype or None for fp32)."""
    if precision not in PRECISIONS:
        raise EncoderError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise EncoderError(f"precision {precision!r} needs a CUDA device; running on {device}")
    return precision, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_layers(layers: tuple[int, ...], n_layers: int, model: str) -> tuple[int, ...]:
    """Map python-style hidden-state indices to 0..n_layers (0 = embedding output), ascending.

    Ascending and without repeats, so `--layer 12 -1` and `--layer -1 12` build the same store.
    """
    if not layers:
        raise EncoderError(f"--layer needs at least one hidden-state index for {model!r}")
    resolved: dict[int, int] = {}
    for layer in layers:
        if not -(n_layers + 1) <= layer <= n_layers:
            raise EncoderError(
                f"--layer {layer} is out of range for {model!r}, which has {n_layers} layers: "
                f"use 0..{n_layers} (0 = embeddings) or -1..-{n_layers + 1}"
            )
        index = layer % (n_layers + 1)
        if index in resolved:
            raise EncoderError(
                f"--layer {resolved[index]} and {layer} are the same hidden state ({index} of 0..{n_layers}) of {model!r}; "
                f"name each layer once"
            )
        resolved[index] = layer
    return tuple(sorted(resolved))


def layer_provenance(layer_indices: tuple[int, ...]) -> dict:
    """How the provenance names the layers: `layer` for one (as before several could be built, so the
    fingerprints of single-layer stores did not change), `layers` for several."""
    if len(layer_indices) == 1:
        return {"layer": layer_indices[0]}
    return {"layers": list(layer_indices)}


def stack_layers(states: list[torch.Tensor], dim: int) -> torch.Tensor:
    """k hidden states (each (..., d)) as one tensor with a layer axis at `dim`; a view when k = 1."""
    return states[0].unsqueeze(dim) if len(states) == 1 else torch.stack(states, dim=dim)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_identity(model: str, revision: str | None, commit_hash: str | None) -> dict:
    """A stable identity of the weights: a content hash for a local directory, the commit for a hub id.

    The path of a local directory is NOT part of the identity, so moving it keeps the fingerprint.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise EncoderError(f"model directory {str(path)!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
        return {"source": "local", "weights_sha256": _weights_sha256(path, files)}
    return {"source": "hub", "hub_id": model, "revision": commit_hash or cached_commit(model, revision) or revision or "unknown"}


def weights_changed(encoder: "Encoder") -> bool:
    """Whether the weights `encoder`'s model names now are not those it was loaded with (a local directory
    rewritten in place, a hub revision that now resolves to another cached commit), so that a process
    keeping an encoder between builds loads it again. An encoder naming no weights identity (a registered
    encoder without weights files) never changes."""
    kept = encoder.provenance().get("weights")
    if kept is None:
        return False
    return kept != weights_identity(encoder.settings.model, encoder.settings.revision, None)


# A build loads its encoder twice (to plan, without weights; to embed): hashing a 650M model's 2.6 GB
# once per process is enough while its files are unchanged (the same path, files, sizes, times, inodes).
_HASHED: dict[tuple, str] = {}


def _weights_sha256(path: Path, files: list[Path]) -> str:
    # ctime and inode too: no tool sets them, so a rewrite within a coarse mtime's tick still shows
    stats = [(p, p.stat()) for p in files]
    stamp = (str(path.resolve()), tuple((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for p, st in stats))
    if stamp not in _HASHED:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(path).as_posix().encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        _HASHED[stamp] = h.hexdigest()
    return _HASHED[stamp]


def cached_commit(model: str, revision: str | None) -> str | None:
    """The commit a hub id's files were loaded from, read off the local cache's snapshot folder.

    transformers 5 no longer sets `config._commit_hash`; without this, every revision of a hub id
    would share one fingerprint. The loader has just put config.json in the cache, online or not.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(found).parent.name if isinstance(found, str) else None


def check_model_location(model: str) -> None:
    """Fail early, with the path, when `model` is clearly meant as a directory and is not there."""
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith("/")
    if looks_like_path and not path.is_dir():
        raise EncoderError(f"model directory {model!r} does not exist")


@contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") off for the duration when `enabled` is False.

    Its switch is process-wide, so it is put back as it was afterwards: a caller's setting is never
    changed behind its back. With `enabled` True nothing is touched (nor transformers imported).
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
