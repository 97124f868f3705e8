"""Token models through Hugging Face transformers: ESM2, Nucleotide Transformer, and any AutoModel.

Windows are cut in TOKEN space from one tokenisation of the whole sequence, so a windowed
sequence sees exactly the tokens a single pass would (6-mer frames of NT never shift).
Special tokens are added around each window by the tokenizer's own
`build_inputs_with_special_tokens` and stripped in one place, `SpecialTokenLayout`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedcache.alphabets import ALPHABETS, DNA, PROTEIN, Alphabet
from embedcache.encoders.base import (
    Encoder,
    EncoderSettings,
    LoraTargets,
    WindowOutput,
    check_model_location,
    layer_provenance,
    resolve_device,
    resolve_layers,
    resolve_precision,
    stack_layers,
    weights_identity,
)
from embedcache.encoders.lookup import VocabLookup
from embedcache.encoders.unpadded import UnpaddedEsm, use_unpadded
from embedcache.errors import EncoderError

_HUGE = 10**8  # tokenizers without a limit report model_max_length ~1e30


class PackedOutputs(Sequence[WindowOutput]):
    """The WindowOutputs of one packed forward ((T, k, d) rows of windows back to back, `cu_seqlens` their
    bounds, special tokens included), each sliced when it is read."""

    def __init__(self, hidden: torch.Tensor, cu_seqlens: np.ndarray, prefix: int, suffix: int, has_cls: bool):
        self.hidden, self.cu_seqlens, self.prefix, self.suffix, self.has_cls = hidden, cu_seqlens, prefix, suffix, has_cls

    def __len__(self) -> int:
        return len(self.cu_seqlens) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        i %= len(self)
        s, e = int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1])
        return WindowOutput(hidden=self.hidden[s + self.prefix : e - self.suffix], cls=self.hidden[s] if self.has_cls else None)


@dataclass(frozen=True, slots=True)
class PackedWindows:
    """A batch's windows back to back with their special tokens, on the CPU: `input_ids` (T,), `cu_seqlens`
    (b + 1,) each window's bounds, `max_len` the longest (`HFTokenEncoder.pack`)."""

    input_ids: torch.Tensor
    cu_seqlens: np.ndarray
    max_len: int


@dataclass(frozen=True, slots=True)
class SpecialTokenLayout:
    """Where the tokenizer puts special tokens around content: `prefix` ids before, `suffix` ids after."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokenLayout":
        # Compare what the tokenizer's own call gives with and without special tokens, the way a user
        # calls it (`tokenizer(seq)`): robust to CLS-only (NT), CLS+EOS (ESM), SEP-only (HyenaDNA),
        # BOS-only (Llama), no specials (GPT-2), and to fast tokenizers whose specials come from a
        # post-processor template (transformers 5 has no build_inputs_with_special_tokens for them).
        for probe in _PROBE_TEXTS:
            plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
            full = list(tokenizer(probe)["input_ids"])
            if len(plain) < 2:
                continue
            for p in range(len(full) - len(plain) + 1):
                if full[p : p + len(plain)] == plain:
                    return cls(tuple(full[:p]), tuple(full[p + len(plain) :]))
        raise EncoderError(
            f"cannot locate content tokens among the special tokens {type(tokenizer).__name__} adds "
            f"(probes {list(_PROBE_TEXTS)})"
        )

    def wrap(self, ids: np.ndarray) -> list[int]:
        return [*self.prefix, *ids.tolist(), *self.suffix]

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.suffix)


_PROBE_TEXTS = ("ACGTACGTACGT", "MKTAYIAKQR", "hello world")
_AUTO_CLASSES = ("AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def _attn_error(settings: EncoderSettings, e: Exception) -> EncoderError | None:
    """The user's --attn-implementation refused by transformers (unsupported by the model, or not installed)."""
    if settings.attn_implementation and ("attn_implementation" in str(e) or "Attention" in str(e)):
        return EncoderError(
            f"--attn-implementation {settings.attn_implementation}: model {settings.model!r} cannot use it: "
            f"{str(e).splitlines()[0]}. Choose another of {list(ATTN_IMPLEMENTATIONS)} or leave the default"
        )
    return None


def _load_auto_model(settings: EncoderSettings, extra: dict, *, weights: bool = True):
    """AutoModel first; checkpoints whose (remote) code maps only a task head load with that head.

    weights=False: the model's modules from its config alone, on the meta device (no memory, no
    weight files), for planning.
    """
    import transformers

    kwargs = dict(trust_remote_code=settings.trust_remote_code, **extra)
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    config = None
    if not weights:
        try:
            config = transformers.AutoConfig.from_pretrained(
                settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code
            )
        except ValueError as e:  # the remote-code refusal, before any weights (a plan, a dry run)
            raise (_remote_code_error(settings, e) or e) from e
    errors = []
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name)
        try:
            if weights:
                return _from_pretrained(auto, settings, kwargs)
            with torch.device("meta"):
                return auto.from_config(config, **kwargs)
        except ImportError as e:  # flash_attention_2 without the flash-attn package
            raise _attn_error(settings, e) or e
        except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel", remote-code refusal
            if (remote := _remote_code_error(settings, e)) is not None:
                raise remote from e
            if (attn := _attn_error(settings, e)) is not None:
                raise attn from e
            errors.append(f"{name}: {e}")
    raise EncoderError(f"cannot load model {settings.model!r} with transformers: " + " | ".join(errors))


def _from_pretrained(auto, settings: EncoderSettings, kwargs: dict):
    """`auto.from_pretrained`, saying in one line what matters about the weights and nothing else.

    Checkpoints carry heads the encoder does not use (ESM's and NT's MLM head): transformers reports
    them as UNEXPECTED in a table on every load (5.x) or a long warning (4.x), which reads as a
    problem to users. Weights the model needs but the checkpoint lacks are randomly initialised:
    that one is a problem, so it is named.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(settings.model, revision=settings.revision, output_loading_info=True, **kwargs)
    except RuntimeError:  # weights that do not fit the config: load again with transformers' report shown
        hf_logging.set_verbosity(verbosity)
        try:
            auto.from_pretrained(settings.model, revision=settings.revision, **kwargs)
        except RuntimeError as e:
            raise EncoderError(f"cannot load model {settings.model!r}: its weights do not fit its config: {str(e).strip()}") from e
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys") or [])
    if missing:
        warnings.warn(
            f"model {settings.model!r}: {len(missing)} weight{'s' * (len(missing) > 1)} of {type(model).__name__} {'are' if len(missing) > 1 else 'is'} not in the checkpoint and were "
            f"randomly initialised (e.g. {', '.join(sorted(missing)[:3])}); embeddings depending on them are not the released "
            f"model's",
            stacklevel=2,
        )
    return model


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_cached_weights(settings: EncoderSettings) -> None:
    """Offline, a hub id whose weights were never downloaded: say so (some transformers versions crash with an
    AttributeError there instead of an OSError)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE or Path(settings.model).expanduser().is_dir():
        return
    found = [try_to_load_from_cache(settings.model, f, revision=settings.revision) for f in _WEIGHT_FILES]
    if not any(isinstance(f, str) for f in found):
        raise EncoderError(
            f"the weights of {settings.model!r} are not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1): download them first (none of {', '.join(_WEIGHT_FILES)} is cached); "
            f"--dry-run plans without them"
        )


def _remote_code_error(settings: EncoderSettings, e: ValueError) -> EncoderError | None:
    if "trust_remote_code" not in str(e):
        return None
    return EncoderError(f"model {settings.model!r} ships its own code; pass --trust-remote-code to allow it "
                        f"(Nucleotide Transformer v2 checkpoints need this)")


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
        raise EncoderError(f"model {getattr(config, 'name_or_path', '')!r} declares no maximum length; pass --window")
    return min(limits) - n_special


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """(name, modules) of the model's stack of repeated blocks: the ModuleList of same-class modules that
    holds the most parameters. Found from the modules themselves, whatever the config calls its depth."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    return best


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or type(module).__name__.endswith(("Norm", "RMSNorm"))


# LoRA targets of the families this project registers; other families use peft's own table, then peft's
# "all-linear" (every linear layer but the output head).
LORA_TARGETS: dict[str, tuple[str, ...]] = {"esm": ("query", "key", "value")}


class HFTokenEncoder(Encoder):
    """Any transformers token model; the registry entries below differ only in checks and defaults.

    Nothing is read from config field names that differ between families: the depth (number of
    hidden states) and width come from the model's own output on a probe, the blocks from its modules.
    """

    def __init__(
        self,
        name: str,
        settings: EncoderSettings,
        alphabet: Alphabet | None,
        expect_model_type: str | None,
        model_kwargs: dict | None = None,
        *,
        weights: bool = True,
    ):
        check_model_location(settings.model)
        if settings.attn_implementation is not None and settings.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise EncoderError(
                f"unknown --attn-implementation {settings.attn_implementation!r}; expected one of {list(ATTN_IMPLEMENTATIONS)}"
            )
        try:
            tokenizer = _load_tokenizer(settings)
            if weights:
                _check_cached_weights(settings)
            model = _load_auto_model(settings, model_kwargs or {}, weights=weights)
        except OSError as e:
            raise _wrap_os_error(settings, e) from e
        if expect_model_type and model.config.model_type != expect_model_type:
            raise EncoderError(
                f"encoder {name!r} expects a {expect_model_type!r} model, but {settings.model!r} is a "
                f"{model.config.model_type!r} model; use --encoder hf for other architectures"
            )
        self.name, self.settings, self.alphabet = name, settings, alphabet
        self.planning_only = not weights
        self.tokenizer = tokenizer
        self.layout = SpecialTokenLayout.of(tokenizer)
        self.lookup = VocabLookup.of(tokenizer)  # numpy tokenisation where it provably equals the tokenizer's
        self.has_cls = len(self.layout.prefix) > 0
        device = resolve_device(settings.device)
        self.precision, self.autocast_dtype = resolve_precision(settings.precision, device)
        params = inspect.signature(model.forward).parameters
        self.takes_mask = "attention_mask" in params
        # Feed what `model(**tokenizer(seq))` feeds: some tokenizers also return token_type_ids, and
        # some models (GPT-2) add an embedding for them, so leaving them out would change the output.
        self.takes_token_types = "token_type_ids" in params and "token_type_ids" in tokenizer.model_input_names
        self.equal_length_batches = not self.takes_mask
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.blocks = find_blocks(model)
        self._after_blocks: list[str] = []
        if weights:
            self.model = model.to(device).eval().requires_grad_(False)
            n_layers, self.embed_dim, self._has_last = self._probe()
        else:
            self.model = model  # on the meta device: modules and shapes only
            n_layers, self.embed_dim, self._has_last = self._plan_shapes()
        self.layer_indices = resolve_layers(settings.layers, n_layers, settings.model)
        self.n_layers = n_layers
        self.max_window = _model_max_positions(model, tokenizer, self.layout.n_special)
        self.window = settings.window or self.max_window
        if not 1 <= self.window <= self.max_window:
            raise EncoderError(
                f"--window {self.window} is outside 1..{self.max_window}, the content tokens "
                f"{settings.model!r} takes in one call"
            )
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        # Inference without padding for transformers' EsmModel (embedcache.encoders.unpadded), unless
        # another attention backend than the default sdpa was asked for.
        use = weights and self.attn_implementation in (None, "sdpa") and use_unpadded(model, device, self.autocast_dtype)
        self.unpadded = UnpaddedEsm(self.model) if use else None
        self._weights = weights_identity(settings.model, settings.revision, getattr(model.config, "_commit_hash", None))

    def _plan_shapes(self) -> tuple[int, int, bool]:
        """`_probe` without weights: the forward on the meta device (shapes only) where the model's code
        allows it; else the depth from its stack of blocks and the width of its input embeddings."""
        try:
            return self._probe()
        except (RuntimeError, NotImplementedError, TypeError, ValueError):  # e.g. .item() on a meta tensor
            pass
        try:
            width = int(self.model.get_input_embeddings().embedding_dim)
        except (AttributeError, NotImplementedError):
            width = None
        if self.blocks is None or width is None:
            raise EncoderError(
                f"cannot tell the depth and width of {self.settings.model!r} without its weights (its forward does not run "
                f"on the meta device and {type(self.model).__name__} has no stack of repeated blocks or no input "
                f"embeddings); plan with the weights present"
            )
        return len(self.blocks[1]), width, True  # hidden states: the embeddings, then one per block

    def _probe(self) -> tuple[int, int, bool]:
        """(layers, width, whether the output has last_hidden_state) from one forward on a few tokens.

        Also records the modules that run after the last block (a final norm), which last-n trains.
        """
        special = set(self.tokenizer.all_special_ids)
        content = np.asarray([i for i in range(len(self.tokenizer)) if i not in special][:4], dtype=np.int64)
        order: list[str] = []
        names = {id(m): n for n, m in self.model.named_modules()}
        hooks = [
            m.register_forward_hook(lambda mod, _i, _o: order.append(names[id(mod)]))
            for m in self.model.modules()
            if _is_norm(m) or (self.blocks is not None and m is self.blocks[1][-1])
        ]
        try:
            with torch.inference_mode():
                out = self._call(self._inputs([content]), output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        states = getattr(out, "hidden_states", None)
        if not states:
            raise EncoderError(
                f"model {self.settings.model!r} ({type(self.model).__name__}) returns no hidden_states when asked "
                f"(output_hidden_states=True); embedcache needs them to select a layer"
            )
        if self.blocks is not None and len(self.blocks[1]) == len(states) - 1:
            last = f"{self.blocks[0]}.{len(self.blocks[1]) - 1}"
            after = order[order.index(last) + 1 :] if last in order else []
            # Only what leads to the hidden states: inside the base model, outside the blocks (not a task head's norm).
            base = self.model.base_model
            prefix = "" if base is self.model else names[id(base)] + "."
            self._after_blocks = [n for n in after if n.startswith(prefix) and not n.startswith(self.blocks[0] + ".")]
        else:
            self.blocks = None  # the repeated modules found are not what the hidden states count
        has_last = getattr(out, "last_hidden_state", None) is not None
        return len(states) - 1, int(states[-1].shape[-1]), has_last

    def tokenize(self, seq: str) -> np.ndarray:
        if self.lookup is not None and (ids := self.lookup(seq)) is not None:
            return ids
        # verbose=False: a sequence longer than the model's context is expected here; it gets windows.
        ids = self.tokenizer(seq, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def count_tokens(self, seq: str) -> int:
        if self.lookup is not None and (n := self.lookup.count(seq)) is not None:
            return n
        return len(self.tokenize(seq))

    def cost(self, n_tokens: int) -> int:
        return n_tokens + self.layout.n_special

    def _inputs(self, windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch of windows, on the device."""
        # Always pad on the right, whatever the tokenizer's padding_side: with an attention mask the
        # padding is invisible to real tokens, and for causal models right padding never reaches real
        # tokens at all, so positions stay 0..n-1 without passing position_ids.
        rows = [self.layout.wrap(w) for w in windows]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (b, n)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (b, n)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        if not self.takes_mask and not bool(mask.all()):
            raise AssertionError("a model without attention mask got a padded batch")  # batching guarantees this
        device = self.device
        kwargs = {"input_ids": input_ids.to(device)}
        if self.takes_mask:
            kwargs["attention_mask"] = mask.to(device)
        if self.takes_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])  # one segment
        return kwargs

    def _call(self, inputs: dict[str, torch.Tensor], *, output_hidden_states: bool):
        with self.autocast():
            return self.model(**inputs, output_hidden_states=output_hidden_states, return_dict=True)

    def encode_windows(self, windows: list[np.ndarray]) -> Sequence[WindowOutput]:
        if self.planning_only:
            raise EncoderError(f"encoder {self.name} for {self.settings.model!r} was loaded without weights (planning only)")
        if self.unpadded is not None and not torch.is_grad_enabled():
            return self.encode_packed(self.pack(windows))
        # The last layer is last_hidden_state where the output has it (some models apply a final norm
        # to it but not to hidden_states[-1], e.g. HyenaDNA); task-head models (MaskedLM / CausalLM,
        # which some remote-code checkpoints map exclusively) give the states only through hidden_states.
        from_last = {i: i == self.n_layers and self._has_last for i in self.layer_indices}
        out = self._call(self._inputs(windows), output_hidden_states=not all(from_last.values()))
        hidden = stack_layers(
            [out.last_hidden_state if last else out.hidden_states[i] for i, last in from_last.items()], dim=2
        )  # (b, n, k, d)
        p = len(self.layout.prefix)
        return [
            WindowOutput(hidden=hidden[i, p : p + len(w)], cls=hidden[i, 0] if self.has_cls else None)
            for i, w in enumerate(windows)
        ]

    def pack(self, windows: list[np.ndarray]) -> "PackedWindows | None":
        """The windows back to back with their special tokens: `UnpaddedEsm`'s inputs (None: padded batches)."""
        if self.unpadded is None:
            return None
        layout = self.layout
        prefix, suffix = np.array(layout.prefix, np.int64), np.array(layout.suffix, np.int64)
        input_ids = np.concatenate([piece for w in windows for piece in (prefix, w, suffix)])  # (T,)
        lengths = np.fromiter(map(len, windows), np.int64, len(windows)) + layout.n_special  # (b,)
        cu_seqlens = np.zeros(len(windows) + 1, np.int32)  # (b + 1,)
        np.cumsum(lengths, out=cu_seqlens[1:])
        return PackedWindows(torch.from_numpy(input_ids), cu_seqlens, int(lengths.max()))

    def encode_packed(self, packed: "PackedWindows") -> Sequence[WindowOutput]:
        """The same outputs as the padded path, computed on the packed windows only (`UnpaddedEsm`). The build's
        forward thread runs this between model calls, so it does as little as it can: each window's output is
        sliced when read (`PackedOutputs`, on the host stage's thread)."""
        ids, cu = packed.input_ids, torch.from_numpy(packed.cu_seqlens)
        if self.device.type != "cpu":  # queued behind the work already on the device, not waited for
            ids, cu = ids.to(self.device, non_blocking=True), cu.to(self.device, non_blocking=True)
        with self.autocast():
            last, states = self.unpadded(ids, cu, packed.max_len, output_hidden_states=self.layer_indices != (self.n_layers,))
        hidden = stack_layers([last if i == self.n_layers else states[i] for i in self.layer_indices], dim=1)  # (T, k, d)
        return PackedOutputs(hidden, packed.cu_seqlens, len(self.layout.prefix), len(self.layout.suffix), self.has_cls)

    # -- what fine-tuning needs

    def blocks_feeding_output(self) -> list[str]:
        if self.blocks is None:
            raise EncoderError(
                f"found no stack of {self.n_layers} repeated blocks in {type(self.model).__name__} ({self.settings.model!r}) "
                f"matching its {self.n_layers + 1} hidden states; use full or frozen training"
            )
        name, blocks = self.blocks
        return [f"{name}.{i}" for i in range(self.layer_index)]  # hidden state i is the output of block i

    def modules_after_blocks(self) -> list[str]:
        return list(self._after_blocks) if self.layer_index == self.n_layers else []

    def lora_targets(self) -> LoraTargets:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        from transformers.pytorch_utils import Conv1D

        kind = getattr(self.model.config, "model_type", None)
        modules = LORA_TARGETS.get(kind) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind) or "all-linear"
        targeted = [
            m for n, m in self.model.named_modules() if modules != "all-linear" and n.rsplit(".", 1)[-1] in modules
        ]
        return LoraTargets(tuple(modules) if modules != "all-linear" else modules, fan_in_fan_out=any(isinstance(m, Conv1D) for m in targeted))

    def set_gradient_checkpointing_(self, enabled: bool) -> None:
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            super().set_gradient_checkpointing_(enabled)
        # Non-reentrant: gradients reach trained blocks even when the embeddings are frozen. transformers 5
        # renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn until v6).
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            if enabled:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.activation_checkpointing_disable()
        elif enabled:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_disable()

    def provenance(self) -> dict:
        return {
            "encoder": self.name,
            "model": self.settings.model,
            "weights": self._weights,
            "architecture": type(self.model).__name__,
            **layer_provenance(self.layer_indices),
            "n_layers": self.n_layers,
            "window": self.window,
            "special_tokens": {"prefix": len(self.layout.prefix), "suffix": len(self.layout.suffix)},
            "precision": self.precision,
            "attn_implementation": self.attn_implementation,
            "alphabet": self.alphabet.name if self.alphabet else None,
            "trust_remote_code": self.settings.trust_remote_code,
        }


# ESM checkpoints are saved with an MLM head and no pooler; the pooler is unused here, so skip it
# (loading it would only initialise random weights and warn).
_NO_POOLER = {"add_pooling_layer": False}


def load_esm2(settings: EncoderSettings, *, weights: bool = True) -> HFTokenEncoder:
    return HFTokenEncoder("esm2", settings, PROTEIN, expect_model_type="esm", model_kwargs=_NO_POOLER, weights=weights)


def load_nucleotide_transformer(settings: EncoderSettings, *, weights: bool = True) -> HFTokenEncoder:
    # v1 checkpoints are ESM models; v2 ship their own "esm" code (trust_remote_code). Both have type "esm".
    return HFTokenEncoder(
        "nucleotide-transformer", settings, DNA, expect_model_type="esm", model_kwargs=_NO_POOLER, weights=weights
    )


def load_hf(settings: EncoderSettings, *, weights: bool = True) -> HFTokenEncoder:
    alphabet = None
    if settings.alphabet is not None:
        if settings.alphabet not in ALPHABETS:
            raise EncoderError(f"unknown --alphabet {settings.alphabet!r}; expected one of {sorted(ALPHABETS)}")
        alphabet = ALPHABETS[settings.alphabet]
    return HFTokenEncoder("hf", settings, alphabet, expect_model_type=None, weights=weights)
