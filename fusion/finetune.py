"""End-to-end mode: the fusion model of `fusion train`, fed by LIVE encoders that may train too.

Cached and end-to-end modes differ only in where features come from:

    cached:      store -> ModalityBatch ------------------------------------------> FusionModel
    end-to-end:  store residues -> SequenceBatch -> encoder (embed_sequences) -> ModalityBatch -> FusionModel

- Each modality's encoder is rebuilt from its store's provenance (`BuildConfig` in the store's
  attrs: same model, revision, layer, window, crop, pooling, token_bins) and must have the same
  weights identity as the one that built the store; it re-embeds the residues KEPT IN THE STORE,
  through `embedcache.embed.embed_sequences`, the code the store build uses. Per-token rows are
  rounded to the store's token dtype (float16) and padded / group-averaged by `fusion.data`'s own
  `_pad` / `group_mean`, so with frozen encoders the fusion model sees what cached mode sees, up to
  one float16 rounding step where compute noise crosses a rounding boundary.
- `open_sequence_batches` is a `StoreBatches` (same manifest, splits, shuffling, targets and
  masks) whose per-modality features are `SequenceFeatures`: batches carry `SequenceBatch`es.
- `EndToEndModel(features: {modality: SequenceBatch}) -> (b, n_targets)` holds the encoders'
  torch modules and the `FusionModel`, so `fusion.train.train`, `predict` and `evaluate_run` run it
  unchanged. Only the optimiser is built here (`make_finetune_optimizer`: encoder and fusion
  parameter groups with their own peak learning rates).

Encoder modes (per modality, `FinetuneConfig.encoder_modes`; default frozen):
    frozen   no parameter trains; the encoder runs in eval mode under torch.no_grad
    full     every parameter trains
    lora     LoRA adapters (peft) on the modules the encoder names (`Encoder.lora_targets`: the
             attention projections of known families); base weights frozen
    last-n   the last N blocks that feed the store's layer train (`Encoder.blocks_feeding_output`),
             plus the modules after them (final norm, Enformer's final pointwise block) when the
             store used the last layer (`Encoder.modules_after_blocks`)
What an encoder can do is its own business (embedcache.encoders.base.Encoder): this module knows
no architecture.
Whatever does not train runs in eval mode (no dropout; BatchNorm keeps its running statistics),
except the frozen base under LoRA, which keeps dropout on as in peft's usual training.

checkpoint.pt (fusion.checkpoint format): `model_state` is `EndToEndModel.state_dict()`, which
holds only what cannot be rebuilt from the stores' provenance:
    fusion.*              the whole fusion model, feature-standardisation buffers included
    encoders.<m>.*        full: every tensor of the encoder; last-n: the tensors (parameters and
                          buffers) of the trained blocks; lora: the adapters (`*.lora_A.*`, `*.lora_B.*`);
                          frozen: nothing
`model_config` is the fusion model's config, `fingerprints` the stores' (inputs, base encoder and
output settings); run.json (`fusion.run.RunManifest`) holds the modes and encoder provenance.
A finetune run is a `fusion.run` run with a `LiveFeed`: `fusion evaluate` / `predict` reopen it
with `LiveFeed.reopen`, which rebuilds the encoders from the stores, applies the recorded modes
and loads this state.

Remote code. A store records the model it was built with and whether that model's own code was
trusted; neither is a permission here. A model that ships code (`auto_map`) is loaded only with
the user's --trust-remote-code, and the refusal names the model and its code files.
"""

from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from embedcache import EmbeddingStore
from embedcache.config import BuildConfig
from embedcache.embed import embed_sequences
from embedcache.encoders import Encoder, load_encoder
from embedcache.errors import EmbedcacheError
from fusion.batch import Batch, ModalityBatch
from fusion.data import DataConfig, ModalityFeatures, StoreBatches, _pad, open_modality_store
from fusion.errors import FusionError
from fusion.models import FusionModel, FusionModelConfig
from fusion.models.fusion_model import fit_feature_stats_
from fusion.prepare.manifest import Manifest
from fusion.run import CachedFeed, RunManifest, RunResult, check_run_data, open_run, read_finished_run, stats_pass, train_run
from fusion.train import TrainConfig, adamw, decay_groups, resolve_amp, resolve_device

Log = Callable[[str], None]

ENCODER_MODES = ("frozen", "full", "lora", "last-n")


class FinetuneError(FusionError):
    """End-to-end training cannot start as asked; the message names the modality, store and model."""


# -- config ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """How the encoders take part in training. Written into run.json and the checkpoint."""

    encoder_modes: dict[str, str] = field(default_factory=dict)  # modality -> frozen | full | lora | last-n; modalities not named are frozen
    last_n: int = 1  # last-n: transformer blocks that train, counted back from the block whose output the store used
    encoder_lr: float = 1e-5  # peak learning rate of encoder parameters (the fusion model's is TrainConfig.lr); same warmup + cosine
    gradient_checkpointing: bool = False  # recompute trained encoders' activations in backward (HF models, Enformer)
    lora_rank: int = 8  # LoRA: rank r of the low-rank update B @ A
    lora_alpha: float = 16.0  # LoRA: the update is scaled by alpha / r
    lora_dropout: float = 0.0  # LoRA: dropout on the adapters' input
    init_from: str | None = None  # run directory of `fusion train` (cached features) whose fusion weights and standardisation start this run

    def __post_init__(self) -> None:
        bad = {m: v for m, v in self.encoder_modes.items() if v not in ENCODER_MODES}
        if bad:
            raise FinetuneError(f"unknown encoder mode(s) {bad}; valid modes are: {', '.join(ENCODER_MODES)}")
        if self.last_n < 1:
            raise FinetuneError(f"last_n must be >= 1, got {self.last_n}")
        if not self.encoder_lr > 0:
            raise FinetuneError(f"encoder_lr must be > 0, got {self.encoder_lr}")
        if self.lora_rank < 1:
            raise FinetuneError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise FinetuneError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def mode(self, modality: str) -> str:
        return self.encoder_modes.get(modality, "frozen")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FinetuneError(f"unknown FinetuneConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**d)


# -- the batch source: sequences instead of features ------------------------------------------------


@dataclass
class SequenceBatch:
    """One modality's sequences for a batch of samples; `EndToEndModel` turns them into a `ModalityBatch`."""

    sequences: list[str | None]  # residues as kept in the store; None where the sample lacks the modality
    present: torch.Tensor  # (b,) bool: False when the sample has no input of this modality

    def __post_init__(self) -> None:
        if tuple(self.present.shape) != (len(self.sequences),):
            raise ValueError(f"present shape {tuple(self.present.shape)} does not match {len(self.sequences)} sequences")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SequenceBatch":
        """Only `present` moves: sequences are strings; the encoders put their tokens on their device."""
        return SequenceBatch(sequences=self.sequences, present=self.present.to(device, non_blocking=True))


def read_residues(store: EmbeddingStore, keys: list[str]) -> dict[str, str]:
    """record id -> residues kept in the store (what `store.sequence(id)` returns), in one sequential read.

    Reads the store's `content_index` and `residues` arrays (its documented schema) once instead of
    one chunk decompression per record.
    """
    rows = store.rows(keys)
    content_index = store.root["content_index"][: store.committed.records]
    residues = store.root["residues"][: store.committed.content]
    return {k: str(residues[content_index[r]]) for k, r in zip(keys, rows)}


class SequenceFeatures(ModalityFeatures):
    """The residues of one store for the manifest's keys: `gather` gives a `SequenceBatch`."""

    def __init__(self, store: EmbeddingStore, keys: list[str]):
        self.dim = store.embed_dim
        self.residues = read_residues(store, keys)

    def gather(self, keys: list[str | None]) -> SequenceBatch:  # type: ignore[override]
        return SequenceBatch(
            sequences=[None if k is None else self.residues[k] for k in keys],
            present=torch.tensor([k is not None for k in keys], dtype=torch.bool),
        )


def open_sequence_batches(config: DataConfig, manifest: Manifest, *, log: Log = print) -> StoreBatches:
    """A `StoreBatches` over the manifest and stores whose batches hold sequences (`SequenceBatch`).

    Splits, shuffling, targets and target masks are StoreBatches' own; stores are checked as
    `fusion.data.open_batches` checks them.
    """
    features, stores, loading = {}, {}, {}
    for m in config.used_modalities:
        store, keys = open_modality_store(config, manifest, m)
        features[m], stores[m], loading[m] = SequenceFeatures(store, keys), store, "live"
        log(f"{m}: {len(keys)} records from {config.stores[m]} (live {store.attrs['config']['encoder']} {store.attrs['config']['model']})")
    return StoreBatches(config=config, manifest=manifest, features=features, stores=stores, loading=loading)


# -- encoders rebuilt from store provenance ---------------------------------------------------------

# Provenance fields that describe where or how fast the encoder runs, or what it was allowed, not what it computes.
_NOT_IDENTITY = ("model", "precision", "trust_remote_code")


@dataclass
class LiveEncoder:
    """One modality's encoder rebuilt from its store, and how it trains."""

    encoder: Encoder  # tokenizer, windows and the torch module (`encoder.model`)
    build: BuildConfig  # the store's build config: layer, window, crop, pooling, token_bins, ...
    store_path: str  # where the provenance came from (for messages and run.json)
    token_dtype: torch.dtype  # the store's per-token dtype: live rows are rounded to it, as cached rows were
    mode: str = "frozen"  # frozen | full | lora | last-n
    trained: list[str] = field(default_factory=list)  # names (in encoder.model) of the modules that train
    checkpointing: bool = False  # gradient checkpointing is on (in training mode only)

    def saves(self, name: str) -> bool:
        """Whether state entry `name` of the encoder goes into the checkpoint (see the module docstring)."""
        if self.mode == "full":
            return True
        if self.mode == "lora":
            return ".lora_" in name
        if self.mode == "last-n":
            return any(name.startswith(t + ".") for t in self.trained)
        return False


def encoder_precision(train_config: TrainConfig, device: torch.device) -> str:
    """The encoders' own autocast: what train()'s AMP resolves to on CUDA, full precision on the CPU.

    Set on the encoder itself (not only by train()'s autocast) so that evaluation, which predicts
    without autocast, computes features at the precision the model was trained with.
    """
    amp = resolve_amp(train_config.amp, device)
    if device.type != "cuda" or amp is None:
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]


def remote_code_files(model: str, revision: str | None) -> list[str]:
    """The model's own Python modules that loading it would run (`auto_map` of config.json and
    tokenizer_config.json), read as plain JSON: nothing is imported. [] when there are none or the
    model's files cannot be read here (loading then fails with its own message)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    maps = []
    for read in (lambda: PretrainedConfig.get_config_dict(model, revision=revision)[0], lambda: get_tokenizer_config(model, revision=revision)):
        try:
            maps.append(read().get("auto_map") or {})
        except (OSError, ValueError):
            pass
    refs = [r for m in maps for v in m.values() for r in (v if isinstance(v, list) else [v]) if r]
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})


def check_remote_code(build: BuildConfig, modality: str, store_path: str, trust_remote_code: bool, log: Log) -> None:
    """Only the user's own --trust-remote-code lets a finetune run a model's own code, never a store's record.

    Stores are shared and downloaded; their attrs name the model directory and say whether its code
    was trusted at build time. That is a fact about the build, not a permission for this machine.
    """
    if build.encoder == "enformer":  # enformer-pytorch's own classes; nothing is loaded from the model directory
        return
    files = remote_code_files(build.model, build.revision)
    if not files:
        return
    where = f"{modality}: store {store_path!r} names {build.encoder} model {build.model!r}" + (f" (revision {build.revision})" if build.revision else "")
    if not trust_remote_code:
        recorded = " (the store records trust_remote_code=true from its build; that does not count here)" if build.trust_remote_code else ""
        raise FinetuneError(
            f"{where}, which ships its own code: {', '.join(files)}. Loading it would run that code{recorded}. "
            f"Read those files in {build.model}, then pass --trust-remote-code to allow it"
        )
    log(f"{modality}: running the model's own code {', '.join(files)} from {build.model} (--trust-remote-code)")


def load_store_encoder(
    store: EmbeddingStore, modality: str, *, device: str = "auto", precision: str = "auto", trust_remote_code: bool = False, log: Log = print
) -> LiveEncoder:
    """The encoder that built `store`, from its provenance; refuses other weights or settings.

    The model's own code runs only with `trust_remote_code` (the user's flag), whatever the store says.
    """
    # The one layer this run reads (a store may hold several, built in one pass): the live encoder outputs it alone.
    build = BuildConfig.from_dict(store.attrs["config"])
    if len(store.layers) > 1:
        build = replace(build, layers=(store.layer,))
    check_remote_code(build, modality, str(store.path), trust_remote_code, log)
    settings = replace(build.encoder_settings(), device=device, precision=precision, trust_remote_code=trust_remote_code)
    where = f"{modality}: store {str(store.path)!r} was built by {build.encoder} model {build.model!r}"
    try:
        encoder = load_encoder(build.encoder, settings)
    except EmbedcacheError as e:
        raise FinetuneError(f"{where}, which cannot be loaded for end-to-end training: {e}") from e
    stored, live = store.attrs["provenance"], encoder.provenance()
    if "layers" in stored:  # several layers stored; the live encoder computes the selected one
        stored = {k: v for k, v in stored.items() if k != "layers"} | {"layer": store.layer}
    if live["weights"] != stored["weights"]:
        raise FinetuneError(
            f"{where}; the weights there now differ from those that built the store: store has {stored['weights']}, "
            f"model has {live['weights']}. Point the store's model at the original weights or rebuild the store."
        )
    diffs = {
        k: (stored.get(k), live.get(k))
        for k in sorted(set(stored) | set(live))
        if k not in _NOT_IDENTITY and stored.get(k) != live.get(k)
    }
    if diffs:
        raise FinetuneError(f"{where}; the reloaded encoder computes something else: " + "; ".join(
            f"{k}: store has {a!r}, reloaded has {b!r}" for k, (a, b) in diffs.items()))
    token_dtype = getattr(torch, store.attrs["stored_dtype"]["tokens"])
    return LiveEncoder(encoder=encoder, build=build, store_path=str(store.path), token_dtype=token_dtype)


def load_live_encoders(
    batches: StoreBatches, *, device: torch.device, precision: str, trust_remote_code: bool = False, log: Log = print
) -> dict[str, LiveEncoder]:
    live = {}
    for m in batches.modalities:
        live[m] = load_store_encoder(batches.stores[m], m, device=str(device), precision=precision, trust_remote_code=trust_remote_code, log=log)
        p = live[m].encoder.provenance()
        log(f"{m}: live encoder {p['encoder']} {p['model']} ({p.get('architecture')}, {p['precision']} on {live[m].encoder.device})")
    return live


# -- the model ---------------------------------------------------------------------------------------


class EndToEndModel(nn.Module):
    """features {modality: SequenceBatch} -> (b, n_targets): live encoders, then the fusion model.

    Per modality: `embed_sequences` on the present samples' distinct sequences (their windows in
    length-sorted encoder calls under the store's token budget), per-token rows (L_i, d) rounded to the store's token dtype, or the pooled (d,)
    vector as n = 1; `fusion.data._pad` (with the data config's `max_tokens` group mean) makes the
    ModalityBatch (x (b, n, d), mask (b, n), present (b,)) that cached mode would have loaded.
    """

    def __init__(self, live: dict[str, LiveEncoder], fusion: FusionModel, *, features: str, max_tokens: int | None) -> None:
        super().__init__()
        missing = [m for m in fusion.config.modalities if m not in live]
        if missing:
            raise FinetuneError(f"no live encoder for modalities {missing}; encoders were loaded for {sorted(live)}")
        self.encoders = nn.ModuleDict({m: live[m].encoder.model for m in fusion.config.modalities})
        self.fusion = fusion
        self.live = {m: live[m] for m in fusion.config.modalities}  # plain dict: the modules are registered above
        self.features = features
        self.max_tokens = max_tokens

    def forward(self, features: dict[str, SequenceBatch]) -> torch.Tensor:
        return self.fusion(self.embed(features))  # (b, n_targets)

    def embed(self, features: dict[str, SequenceBatch]) -> dict[str, ModalityBatch]:
        """What the fusion model sees: one ModalityBatch per modality, on the encoders' device."""
        out = {}
        for m, live in self.live.items():
            f = features[m]
            device = live.encoder.device  # where its module is, also after the model was moved
            # Isoforms of one gene share its DNA: embed each distinct sequence once (gradients add up).
            unique = list(dict.fromkeys(s for s in f.sequences if s is not None))
            with torch.no_grad() if live.mode == "frozen" else nullcontext():
                embedded = dict(zip(unique, embed_sequences(live.encoder, unique, live.build))) if unique else {}
            pieces: list[torch.Tensor | None] = [None] * len(f.sequences)
            for i, s in enumerate(f.sequences):
                if s is None:
                    continue
                tokens, pooled = embedded[s]  # (L, 1, d), (1, d): the encoder outputs the run's one layer
                if self.features == "pooled":
                    pieces[i] = pooled.float()  # (1, d): stored pooled vectors are float32
                else:
                    pieces[i] = tokens[:, 0].to(live.token_dtype).float()  # (L, d): rounded as the store rounded them
            with torch.device(device):  # _pad allocates with the default device
                out[m] = _pad(pieces, live.encoder.embed_dim, None if self.features == "pooled" else self.max_tokens)
        return out

    # -- training modes

    def configure_(self, config: FinetuneConfig, *, log: Log = print) -> None:
        """Apply each modality's encoder mode (and gradient checkpointing) from `config`."""
        unknown = sorted(set(config.encoder_modes) - set(self.live))
        if unknown:
            raise FinetuneError(f"--encoder-mode for modalities {unknown} that this run does not use; modalities: {list(self.live)}")
        for m, live in self.live.items():
            set_encoder_mode_(live, m, config.mode(m), config)
            if config.gradient_checkpointing and live.mode != "frozen":
                try:
                    live.encoder.set_gradient_checkpointing_(True)
                except EmbedcacheError as e:
                    raise FinetuneError(f"{m}: {e}; drop --gradient-checkpointing") from e
                live.checkpointing = True
            n = sum(p.numel() for p in live.encoder.model.parameters() if p.requires_grad)
            log(f"{m}: encoder {live.mode}, {n:,} trainable parameters" + (f" in {live.trained}" if live.mode == "last-n" else ""))
        self.train(self.training)

    def train(self, mode: bool = True) -> "EndToEndModel":
        """Train mode for the fusion model and what trains in the encoders; eval for the rest."""
        super().train(mode)
        for m, live in self.live.items():
            module = self.encoders[m]
            if live.mode == "frozen":
                module.eval()
            elif live.mode == "last-n":
                module.eval()
                for name in live.trained:
                    module.get_submodule(name).train(mode)
            if live.checkpointing:
                live.encoder.set_gradient_checkpointing_(mode)  # recompute in training only
            for sub in module.modules():  # frozen BatchNorm keeps its running statistics (Enformer's conv tower)
                if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in sub.parameters()):
                    sub.eval()
        return self

    # -- what the checkpoint holds

    def _saved(self, key: str) -> bool:
        if key.startswith("fusion."):
            return True
        _, m, name = key.split(".", 2)  # encoders.<modality>.<name>
        return self.live[m].saves(name)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The fusion model and the encoders' trained tensors only; frozen weights come from the stores' models."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix) and not self._saved(k[len(prefix):])]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what `state_dict()` saves; strict: exactly those keys, no more, no fewer."""
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"state of EndToEndModel: missing keys {missing[:8]} ({len(missing)}), unexpected keys {unexpected[:8]} "
                f"({len(unexpected)}); were the encoder modes {self.modes} used when it was saved?"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False, assign=assign)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    @property
    def modes(self) -> dict[str, str]:
        return {m: live.mode for m, live in self.live.items()}

    def describe(self) -> dict:
        """Per modality: mode, where the encoder came from, and what trains (JSON-safe, for run.json)."""
        out = {}
        for m, live in self.live.items():
            p = live.encoder.provenance()
            params = list(live.encoder.model.parameters())
            out[m] = {
                "mode": live.mode,
                "store": live.store_path,
                "encoder": p["encoder"],
                "model": p["model"],
                "weights": p["weights"],
                "architecture": p.get("architecture"),
                "precision": p["precision"],
                "parameters": sum(x.numel() for x in params),
                "trainable_parameters": sum(x.numel() for x in params if x.requires_grad),
                "trained_modules": list(live.trained),
                "checkpoint_tensors": sum(1 for k in live.encoder.model.state_dict() if live.saves(k)),
            }
        return out


def set_encoder_mode_(live: LiveEncoder, modality: str, mode: str, config: FinetuneConfig) -> None:
    """Set requires_grad (and inject LoRA adapters) for one encoder; records the mode and trained modules."""
    if mode not in ENCODER_MODES:
        raise FinetuneError(f"{modality}: unknown encoder mode {mode!r}; valid modes are: {', '.join(ENCODER_MODES)}")
    if live.mode != "frozen":
        raise FinetuneError(f"{modality}: encoder mode already set to {live.mode!r}")
    model = live.encoder.model
    model.requires_grad_(False)
    if mode == "full":
        model.requires_grad_(True)
        trained = [""]
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = _ask(live.encoder.lora_targets, modality, mode)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets.modules if isinstance(targets.modules, str) else list(targets.modules),
            fan_in_fan_out=targets.fan_in_fan_out,
        )
        try:
            inject_adapter_in_model(lora, model)  # in place: encode_windows keeps calling the same module
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise FinetuneError(f"{modality}: LoRA found none of the modules {targets.modules} in {type(model).__name__}: {e}") from e
        trained = sorted({n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n})
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
        if not trained:
            raise FinetuneError(f"{modality}: LoRA found none of the modules {targets.modules} in {type(model).__name__}")
    elif mode == "last-n":
        trained = last_blocks(live, modality, config.last_n)
        for name in trained:
            model.get_submodule(name).requires_grad_(True)
    else:
        trained = []
    live.mode, live.trained = mode, trained


def _ask(capability: Callable, modality: str, mode: str):
    """Call an encoder capability; an encoder that lacks it is a FinetuneError naming the modality and mode."""
    try:
        return capability()
    except EmbedcacheError as e:
        raise FinetuneError(f"{modality}: encoder mode {mode!r}: {e} (--encoder-mode {modality}=full or {modality}=frozen)") from e


def last_blocks(live: LiveEncoder, modality: str, n: int) -> list[str]:
    """Names (in encoder.model) of the last `n` blocks that feed the store's layer, plus the modules after
    the last block when the store used the model's last layer (both as the encoder names them)."""
    blocks = _ask(live.encoder.blocks_feeding_output, modality, "last-n")
    n_used = len(blocks)
    if not 1 <= n <= n_used:
        raise FinetuneError(
            f"{modality}: --last-n {n}, but store {live.store_path!r} used the output of block {n_used} of "
            f"{live.build.model!r} (layer {live.encoder.layer_index}): 1..{n_used} blocks feed it"
        )
    return blocks[n_used - n :] + live.encoder.modules_after_blocks()


# -- feature statistics, warm start, optimiser --------------------------------------------------------


@torch.no_grad()
def fit_live_feature_stats_(model: EndToEndModel, batches: Iterable[Batch]) -> dict[str, int]:
    """`fit_feature_stats_` on the live features of `batches` (pass the train split, unshuffled).

    Call before any encoder trains: the statistics are those of the pretrained encoders, as in cached mode.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        live = (replace(b, features=model.embed(b.to(device).features)) for b in batches)
        return fit_feature_stats_(model.fusion, live)
    finally:
        model.train(was_training)


def warm_start_fusion(run_dir: str | Path, batches: StoreBatches, data: DataConfig) -> FusionModel:
    """The fusion model (weights and standardisation) of a finished `fusion train` run, checked against this data."""
    run_dir = Path(run_dir)
    try:
        run, checkpoint = read_finished_run(run_dir)
    except FusionError as e:
        raise FinetuneError(f"--init-from: {e}") from e
    if run.mode != "cached":
        raise FinetuneError(f"--init-from {str(run_dir)!r} is a {run.mode!r} run; it must be a `fusion train` run on cached features")
    for name in ("features", "max_tokens"):
        if getattr(run.data, name) != getattr(data, name):
            raise FinetuneError(
                f"--init-from {str(run_dir)!r} was trained with {name}={getattr(run.data, name)!r}, this run has "
                f"{name}={getattr(data, name)!r}: pass --{name.replace('_', '-')} {getattr(run.data, name)}"
            )
    check_run_data(checkpoint, batches, source=f"--init-from {run_dir}")
    return CachedFeed().reopen(run, batches, checkpoint, None, print)


def make_finetune_optimizer(model: EndToEndModel, train_config: TrainConfig, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over `decay_groups` of each part; encoder groups carry lr_scale = encoder_lr / lr,
    which train() applies on top of its warmup + cosine schedule."""
    groups = []
    for part, scale in ((model.fusion, 1.0), (model.encoders, config.encoder_lr / train_config.lr)):
        groups += [{**g, "lr_scale": scale} for g in decay_groups(part, train_config)]
    return adamw(groups, lr=train_config.lr)


# -- runs: the live feed of fusion.run's pipeline ------------------------------------------------------


class LiveFeed:
    """`fusion finetune`'s feed for `fusion.run.train_run`: the stores' encoders run live (see the module docstring).

    `trust_remote_code` is the user's flag of this command; a store's or a run's record never sets it.
    """

    mode = "finetune"

    def __init__(self, config: FinetuneConfig, *, trust_remote_code: bool = False) -> None:
        self.config = config
        self.trust_remote_code = trust_remote_code
        self.live: dict[str, LiveEncoder] = {}
        self.device = torch.device("cpu")

    def open_batches(self, data: DataConfig, manifest: Manifest, log: Log, progress: bool = False) -> StoreBatches:
        return open_sequence_batches(data, manifest, log=log)

    def place(self, batches: StoreBatches, device: torch.device, log: Log) -> None:
        pass  # batches hold sequences; the live encoders run on the training device

    def _load(self, batches: StoreBatches, train_config: TrainConfig, log: Log) -> None:
        self.device = resolve_device(train_config.device)
        self.live = load_live_encoders(
            batches, device=self.device, precision=encoder_precision(train_config, self.device), trust_remote_code=self.trust_remote_code, log=log
        )

    def prepare(self, batches: StoreBatches, train_config: TrainConfig, log: Log) -> None:
        unknown = sorted(set(self.config.encoder_modes) - set(batches.modalities))
        if unknown:
            raise FinetuneError(f"--encoder-mode for modalities {unknown} that this run does not use; modalities: {list(batches.modalities)}")
        self._load(batches, train_config, log)

    def initial_fusion(self, batches: StoreBatches, data: DataConfig, log: Log) -> FusionModel | None:
        if not self.config.init_from:
            return None
        fusion = warm_start_fusion(self.config.init_from, batches, data)
        log(f"fusion model from {self.config.init_from}: aggregator {fusion.config.aggregator}, d_model {fusion.config.d_model} "
            f"(its architecture replaces the model options given here)")
        return fusion

    def wrap(self, fusion: FusionModel, data: DataConfig) -> nn.Module:
        return EndToEndModel(self.live, fusion, features=data.features, max_tokens=data.max_tokens).to(self.device)

    def fit_stats(self, model: nn.Module, batches: StoreBatches, progress: bool) -> str:
        if self.config.init_from:
            return f"from {self.config.init_from}"
        counts = fit_live_feature_stats_(model, stats_pass(batches, "feature statistics (live encoders)", progress))
        return f"fitted on live train features of the pretrained encoders ({counts} rows)"

    def configure(self, model: nn.Module, log: Log) -> dict:
        model.configure_(self.config, log=log)
        return model.describe()

    def optimizer(self, model: nn.Module, train_config: TrainConfig) -> torch.optim.Optimizer:
        return make_finetune_optimizer(model, train_config, self.config)

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def reopen(self, run: RunManifest, batches: StoreBatches, checkpoint: dict, device: str | None, log: Log) -> nn.Module:
        """Encoders rebuilt from the stores, the recorded modes applied, then the checkpoint's fusion weights and trained tensors."""
        self._load(batches, TrainConfig.from_dict({**run.train.to_dict(), **({"device": device} if device else {})}), log)
        fusion = FusionModel(FusionModelConfig.from_dict(checkpoint["model_config"]))
        model = EndToEndModel(self.live, fusion, features=run.data.features, max_tokens=run.data.max_tokens)
        model.configure_(self.config, log=log)
        model.load_state_dict(checkpoint["model_state"])
        return model.to(self.device).eval()


def run_finetune(
    data: DataConfig,
    aggregator: str,
    model_options: dict,
    train_config: TrainConfig,
    finetune: FinetuneConfig,
    run_dir: str | Path,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    log: Log = print,
) -> RunResult:
    """`fusion train` with live encoders: the run pipeline of `fusion.run` with a `LiveFeed`.

    With `finetune.init_from`, the fusion model (architecture, weights, standardisation) comes from
    that cached run and `aggregator` / `model_options` are not used; otherwise it is built as
    `fusion train` builds it and its standardisation is fitted on the live train features.
    """
    feed = LiveFeed(finetune, trust_remote_code=trust_remote_code)
    return train_run(data, aggregator, model_options, train_config, run_dir, feed=feed, progress=progress, log=log)


def load_finetune_run(
    run_dir: str | Path, *, device: str | None = None, trust_remote_code: bool = False, log: Log = print
) -> tuple[RunManifest, EndToEndModel, StoreBatches]:
    """(run manifest, model with the best weights in eval mode, its batch source) of a finished finetune run."""
    opened = open_run(run_dir, device=device, trust_remote_code=trust_remote_code, log=log)
    if opened.manifest.mode != "finetune":
        raise FinetuneError(f"{run_dir} is a {opened.manifest.mode!r} run, not a finetune run; use fusion.run.load_run")
    return opened.manifest, opened.model, opened.batches


__all__ = [
    "ENCODER_MODES",
    "EndToEndModel",
    "FinetuneConfig",
    "FinetuneError",
    "LiveFeed",
    "LiveEncoder",
    "SequenceBatch",
    "SequenceFeatures",
    "encoder_precision",
    "fit_live_feature_stats_",
    "last_blocks",
    "load_finetune_run",
    "load_live_encoders",
    "load_store_encoder",
    "remote_code_files",
    "check_remote_code",
    "make_finetune_optimizer",
    "open_sequence_batches",
    "read_residues",
    "run_finetune",
    "set_encoder_mode_",
    "warm_start_fusion",
]
