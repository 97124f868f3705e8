"""Token models through Hugging Face transformers: ESM2, Nucleotide Transformer, and any AutoModel.

Windows are cut in TOKEN space from one tokenisation of the whole sequence, so a windowed
sequence sees exactly the tokens a single pass would (6-mer frames of NT never shift).
Special tokens are added around each window by the tokenizer's own
`build_inputs_with_special_tokens` and stripped in one place, `SpecialTokenLayout`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from embedcache.alphabets import ALPHABETS, DNA, PROTEIN, Alphabet
from embedcache.encoders.base import (
    Encoder,
    EncoderSettings,
    WindowOutput,
    check_model_location,
    resolve_device,
    resolve_layer,
    resolve_precision,
    weights_identity,
)
from embedcache.encoders.lookup import VocabLookup
from embedcache.encoders.unpadded import UnpaddedEsm, use_unpadded
from embedcache.errors import EncoderError

_HUGE = 10**8  # tokenizers without a limit report model_max_length ~1e30


@dataclass(frozen=True, slots=True)
class SpecialTokenLayout:
    """Where the tokenizer puts special tokens around content: `prefix` ids before, `suffix` ids after."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokenLayout":
        # Probe with real (non-special) ids and find them in the output: robust to CLS-only (NT),
        # CLS+EOS (ESM), BOS-only (Llama) and no specials at all (GPT-2).
        special = set(tokenizer.all_special_ids)
        probe = [i for i in range(len(tokenizer)) if i not in special][:3]
        if len(probe) < 3:
            raise EncoderError(f"tokenizer {type(tokenizer).__name__} has fewer than 3 non-special tokens")
        out = list(tokenizer.build_inputs_with_special_tokens(probe))
        for p in range(len(out) - 2):
            if out[p : p + 3] == probe:
                return cls(tuple(out[:p]), tuple(out[p + 3 :]))
        raise EncoderError(f"cannot locate content tokens in {out} built from {probe} by {type(tokenizer).__name__}")

    def wrap(self, ids: np.ndarray) -> list[int]:
        return [*self.prefix, *ids.tolist(), *self.suffix]

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.suffix)


def _load_auto_model(settings: EncoderSettings, extra: dict):
    """AutoModel first; checkpoints whose (remote) code maps only a task head load with that head."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    kwargs = dict(revision=settings.revision, trust_remote_code=settings.trust_remote_code, **extra)
    errors = []
    for auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
        try:
            return auto.from_pretrained(settings.model, **kwargs)
        except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel", remote-code refusal
            if "trust_remote_code" in str(e):
                raise EncoderError(
                    f"model {settings.model!r} ships its own code; pass --trust-remote-code to allow it "
                    f"(Nucleotide Transformer v2 checkpoints need this)"
                ) from e
            errors.append(f"{auto.__name__}: {e}")
    raise EncoderError(f"cannot load model {settings.model!r} with transformers: " + " | ".join(errors))


def _load_tokenizer(settings: EncoderSettings):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise EncoderError(f"tokenizer of {settings.model!r} ships its own code; pass --trust-remote-code") from e
        raise EncoderError(f"cannot load the tokenizer of {settings.model!r}: {e}") from e


def _wrap_os_error(settings: EncoderSettings, e: OSError) -> EncoderError:
    return EncoderError(
        f"cannot load model {settings.model!r}: {e}. A hub id must be in the local Hugging Face cache when "
        f"offline (HF_HUB_OFFLINE=1); a local directory must hold config.json and the weights."
    )


def _model_max_positions(model, tokenizer, n_special: int) -> int:
    """Content tokens the model takes in one call."""
    config = model.config
    limits = []
    if 0 < getattr(tokenizer, "model_max_length", _HUGE) < _HUGE:
        limits.append(tokenizer.model_max_length)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos:
        if getattr(config, "model_type", "") == "esm" and getattr(config, "position_embedding_type", "") == "absolute":
            # ESM-style learned positions start at padding_idx + 1 (NT v1), so fewer slots are usable.
            max_pos -= (config.pad_token_id or 0) + 1
        elif getattr(config, "model_type", "") == "esm":
            # ESM2 (rotary) was trained on crops of max_position_embeddings - 2 tokens including BOS/EOS.
            max_pos -= 2
        limits.append(max_pos)
    if not limits:
        raise EncoderError("the model declares no maximum length; pass --window")
    return min(limits) - n_special


class HFTokenEncoder(Encoder):
    """Any transformers token model; the registry entries below differ only in checks and defaults."""

    def __init__(
        self,
        name: str,
        settings: EncoderSettings,
        alphabet: Alphabet | None,
        expect_model_type: str | None,
        model_kwargs: dict | None = None,
    ):
        check_model_location(settings.model)
        try:
            tokenizer = _load_tokenizer(settings)
            model = _load_auto_model(settings, model_kwargs or {})
        except OSError as e:
            raise _wrap_os_error(settings, e) from e
        if expect_model_type and model.config.model_type != expect_model_type:
            raise EncoderError(
                f"encoder {name!r} expects a {expect_model_type!r} model, but {settings.model!r} is a "
                f"{model.config.model_type!r} model; use --encoder hf for other architectures"
            )
        self.name, self.settings, self.alphabet = name, settings, alphabet
        self.tokenizer = tokenizer
        self.layout = SpecialTokenLayout.of(tokenizer)
        self.lookup = VocabLookup.of(tokenizer)  # numpy tokenisation where it provably equals the tokenizer's
        self.has_cls = len(self.layout.prefix) > 0
        self.device = resolve_device(settings.device)
        self.precision, self.autocast_dtype = resolve_precision(settings.precision, self.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        n_layers = model.config.num_hidden_layers
        self.layer_index = resolve_layer(settings.layer, n_layers, settings.model)
        self.n_layers = n_layers
        self.embed_dim = model.config.hidden_size
        self.max_window = _model_max_positions(model, tokenizer, self.layout.n_special)
        self.window = settings.window or self.max_window
        if not 1 <= self.window <= self.max_window:
            raise EncoderError(
                f"--window {self.window} is outside 1..{self.max_window}, the content tokens "
                f"{settings.model!r} takes in one call"
            )
        params = inspect.signature(self.model.forward).parameters
        self.takes_mask = "attention_mask" in params
        # Feed what `model(**tokenizer(seq))` feeds: some tokenizers also return token_type_ids, and
        # some models (GPT-2) add an embedding for them, so leaving them out would change the output.
        self.takes_token_types = "token_type_ids" in params and "token_type_ids" in tokenizer.model_input_names
        self.equal_length_batches = not self.takes_mask
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Inference without padding for transformers' EsmModel on the devices where it pays (see UNPADDED_DEVICES).
        self.unpadded = UnpaddedEsm(self.model) if use_unpadded(self.model, self.device, self.autocast_dtype) else None
        self._weights = weights_identity(settings.model, settings.revision, getattr(model.config, "_commit_hash", None))

    def tokenize(self, seq: str) -> np.ndarray:
        if self.lookup is not None and (ids := self.lookup(seq)) is not None:
            return ids
        # verbose=False: a sequence longer than the model's context is expected here; it gets windows.
        ids = self.tokenizer(seq, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def cost(self, n_tokens: int) -> int:
        return n_tokens + self.layout.n_special

    def encode_windows(self, windows: list[np.ndarray]) -> list[WindowOutput]:
        if self.unpadded is not None and not torch.is_grad_enabled():
            return self._encode_unpadded(windows)
        # Always pad on the right, whatever the tokenizer's padding_side: with an attention mask the
        # padding is invisible to real tokens, and for causal models right padding never reaches real
        # tokens at all, so positions stay 0..n-1 without passing position_ids.
        input_ids, lengths = self._pack(windows)
        width = int(lengths.max())
        padded = np.full((len(windows), width), self.pad_id, dtype=np.int64)  # (b, n)
        mask = np.arange(width)[None, :] < lengths[:, None]  # (b, n)
        padded[mask] = input_ids  # row-major order of the mask = the windows one after another
        if not self.takes_mask and not bool(mask.all()):
            raise AssertionError("a model without attention mask got a padded batch")  # batching guarantees this
        kwargs = {"input_ids": torch.from_numpy(padded).to(self.device)}
        if self.takes_mask:
            kwargs["attention_mask"] = torch.from_numpy(mask.astype(np.int64)).to(self.device)
        if self.takes_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])  # one segment
        # Base models give last_hidden_state; task-head models (MaskedLM / CausalLM heads, which some
        # remote-code checkpoints map exclusively) give the same states only through hidden_states.
        use_last = self.layer_index == self.n_layers and self.model.base_model is self.model
        with self.autocast():
            out = self.model(**kwargs, output_hidden_states=not use_last, return_dict=True)
        hidden = out.last_hidden_state if use_last else out.hidden_states[self.layer_index]  # (b, n, d)
        p = len(self.layout.prefix)
        return [
            WindowOutput(hidden=hidden[i, p : p + len(w)], cls=hidden[i, 0] if self.has_cls else None)
            for i, w in enumerate(windows)
        ]

    def _pack(self, windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(every window wrapped in its special tokens, concatenated (T,), each one's length (b,))."""
        prefix = np.asarray(self.layout.prefix, dtype=np.int64)
        suffix = np.asarray(self.layout.suffix, dtype=np.int64)
        pieces = [piece for w in windows for piece in (prefix, w, suffix)]
        lengths = np.fromiter((len(w) for w in windows), dtype=np.int64, count=len(windows)) + self.layout.n_special
        return np.concatenate(pieces).astype(np.int64, copy=False), lengths

    def _encode_unpadded(self, windows: list[np.ndarray]) -> list[WindowOutput]:
        """The same outputs as the padded path, computed on the packed windows only (`UnpaddedEsm`)."""
        input_ids, lengths = self._pack(windows)
        cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])  # (b + 1,)
        with self.autocast():
            last, states = self.unpadded(
                torch.from_numpy(input_ids).to(self.device),
                torch.from_numpy(cu_seqlens.astype(np.int32)).to(self.device),
                int(lengths.max()),
                output_hidden_states=self.layer_index != self.n_layers,
            )
        hidden = last if states is None else states[self.layer_index]  # (T, d)
        p = len(self.layout.prefix)
        return [
            WindowOutput(hidden=hidden[s + p : s + p + len(w)], cls=hidden[s] if self.has_cls else None)
            for s, w in zip(cu_seqlens[:-1].tolist(), windows)
        ]

    def provenance(self) -> dict:
        return {
            "encoder": self.name,
            "model": self.settings.model,
            "weights": self._weights,
            "architecture": type(self.model).__name__,
            "layer": self.layer_index,
            "n_layers": self.n_layers,
            "window": self.window,
            "special_tokens": {"prefix": len(self.layout.prefix), "suffix": len(self.layout.suffix)},
            "precision": self.precision,
            "alphabet": self.alphabet.name if self.alphabet else None,
            "trust_remote_code": self.settings.trust_remote_code,
        }


# ESM checkpoints are saved with an MLM head and no pooler; the pooler is unused here, so skip it
# (loading it would only initialise random weights and warn).
_NO_POOLER = {"add_pooling_layer": False}


def load_esm2(settings: EncoderSettings) -> HFTokenEncoder:
    return HFTokenEncoder("esm2", settings, PROTEIN, expect_model_type="esm", model_kwargs=_NO_POOLER)


def load_nucleotide_transformer(settings: EncoderSettings) -> HFTokenEncoder:
    # v1 checkpoints are ESM models; v2 ship their own "esm" code (trust_remote_code). Both have type "esm".
    return HFTokenEncoder("nucleotide-transformer", settings, DNA, expect_model_type="esm", model_kwargs=_NO_POOLER)


def load_hf(settings: EncoderSettings) -> HFTokenEncoder:
    alphabet = None
    if settings.alphabet is not None:
        if settings.alphabet not in ALPHABETS:
            raise EncoderError(f"unknown --alphabet {settings.alphabet!r}; expected one of {sorted(ALPHABETS)}")
        alphabet = ALPHABETS[settings.alphabet]
    return HFTokenEncoder("hf", settings, alphabet, expect_model_type=None)
