"""From embedding stores and a manifest to `Batch`es: the only place where fusion touches files.

Per modality, features come from one store, either pooled vectors (n = 1) or per-token rows.
Per-token data is loaded into RAM when it fits (one sequential read of the flat `tokens` array)
and otherwise streamed: each batch reads its sequences in one zarr call (concurrent per-sequence
reads), and two background threads prepare the next batches while the model trains. With
max_tokens, rows come from the store's reduced array (fusion.reduced), made once. Features held
whole (pooled, reduced in memory) can live on the training device, where a batch is an index
gather (`StoreBatches.place`). The training
loop reads through zarr directly: xarray with dask adds tens of milliseconds per small batch, and
orthogonal indexing of a sharded array (zarr's oindex) reads several times slower than concurrent
per-sequence reads.
"""

from __future__ import annotations

import collections
import functools
import gc
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader, Dataset, get_worker_info

from embedcache import EmbeddingStore, open_store
from embedcache.errors import StoreError
from embedcache.heap import keep_freed_memory
from fusion.batch import Batch, ModalityBatch
from fusion.errors import FusionError
from fusion.prepare.manifest import Manifest
from fusion.reduced import READ_AHEAD, ReducedArray, ReductionConfig, group_mean, reduced_array

FEATURES = ("tokens", "pooled")
LOADINGS = ("auto", "memory", "stream")
FEATURE_DEVICES = ("auto", "device", "host")


class DataError(FusionError):
    """Manifest and stores do not fit together."""


@dataclass(frozen=True)
class DataConfig:
    """Where the features and targets come from. Written into every run directory."""

    manifest: str  # prepared directory (with prepare.json) or a manifest table
    stores: dict[str, str]  # modality -> embedding store path or URL (s3://, gs://, ...)
    storage_options: dict = field(default_factory=dict)  # remote stores' filesystem options (no secrets: use the environment)
    modalities: tuple[str, ...] = ()  # modalities fed to the model; () = every store given
    features: str = "tokens"  # tokens (per-token rows + mask) | pooled (one vector per modality)
    max_tokens: int | None = None  # longer per-token inputs are averaged in consecutive equal groups down to this many rows
    batch_size: int = 32  # samples per batch
    loading: str = "auto"  # auto (RAM when it fits memory_gb) | memory | stream
    memory_gb: float = 8.0  # per-token data larger than this is streamed under loading=auto
    prefetch: int = 4  # batches prepared ahead by the streaming loader
    workers: int = 0  # DataLoader worker processes that read and assemble batches (Linux: fork); 0 = two background threads in this process
    seed: int = 0  # shuffling seed (the epoch number is mixed in)
    layers: dict[str, int] = field(default_factory=dict)  # modality -> hidden state read from a store built with several; unset = its only one
    reduced_dir: str | None = None  # where max_tokens reductions are kept (fusion.reduced); None = the user's cache directory
    feature_device: str = "auto"  # auto | device | host: where in-memory features live and batches are gathered (StoreBatches.place)
    device_memory_gb: float | None = None  # features placed on a CUDA device up to this size; None = half its memory

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise DataError(f"unknown features {self.features!r}; expected one of {list(FEATURES)}")
        if self.feature_device not in FEATURE_DEVICES:
            raise DataError(f"unknown feature_device {self.feature_device!r}; expected one of {list(FEATURE_DEVICES)}")
        if self.loading not in LOADINGS:
            raise DataError(f"unknown loading {self.loading!r}; expected one of {list(LOADINGS)}")
        if not self.stores:
            raise DataError("no stores given: pass at least one MODALITY=STORE")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise DataError(f"workers must be a whole number >= 0 (0: batches made in this process), got {self.workers!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataError(f"max_tokens must be positive, got {self.max_tokens}")
        unknown = [m for m in self.modalities if m not in self.stores]
        if unknown:
            raise DataError(f"modalities {unknown} have no store; stores were given for {sorted(self.stores)}")
        for m, layer in self.layers.items():
            if m not in self.stores:
                raise DataError(f"--layer {m}={layer}: no store was given for {m!r}; stores were given for {sorted(self.stores)}")
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise DataError(f"--layer {m}={layer!r}: a layer is an integer hidden-state index (e.g. {m}=12 or {m}=-1)")

    @property
    def used_modalities(self) -> tuple[str, ...]:
        return self.modalities or tuple(self.stores)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return cls(**{**d, "modalities": tuple(d.get("modalities", ()))})


# -- features of one modality ---------------------------------------------------------------------


class ModalityFeatures:
    """Features of one modality for any list of record keys (None = the sample lacks this modality)."""

    dim: int

    def gather(self, keys: list[str | None]) -> ModalityBatch:
        raise NotImplementedError


class IndexedFeatures(ModalityFeatures):
    """Features held whole as one padded table, (records + 1, n, d) with a zero last row for absent samples,
    so a batch is an index gather (`take`) on whatever device the table is on: no per-sample Python, no
    host collation. `StoreBatches.place` moves the tables to the training device when they fit there."""

    table: torch.Tensor  # (k + 1, n, d): row k is zeros (absent samples)
    lengths: torch.Tensor  # (k + 1,) int64 rows per record; 0 in the last
    row: dict[str, int]  # key -> row of the table

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.lengths.nbytes

    def index(self, keys: list[str | None]) -> np.ndarray:
        """(b,) table rows of the keys; absent samples get the zero row."""
        absent = len(self.table) - 1
        return np.array([absent if k is None else self.row[k] for k in keys], np.int64)

    def take(self, at: torch.Tensor) -> ModalityBatch:
        """The batch of table rows `at` (b,), on the table's device; fixed width n, so no device sync."""
        if self.table.device.type == "cpu":  # numpy's row copies: 1.8x torch's index_select (OpenMP), which took ms with a core busy
            x = torch.from_numpy(self.table.numpy()[at.numpy()])  # (b, n, d)
        else:
            x = self.table.index_select(0, at)  # (b, n, d)
        length = self.lengths.index_select(0, at)  # (b,)
        mask = torch.arange(x.shape[1], device=x.device) < length[:, None]  # (b, n)
        return ModalityBatch(x=x, mask=mask, present=length > 0)

    def gather(self, keys: list[str | None]) -> ModalityBatch:
        return self.take(torch.from_numpy(self.index(keys)).to(self.table.device))

    def to_(self, device: torch.device) -> None:
        self.table, self.lengths = self.table.to(device), self.lengths.to(device)


class PooledFeatures(IndexedFeatures):
    def __init__(self, store: EmbeddingStore, keys: list[str]):
        self.dim = store.embed_dim
        self.row = {k: i for i, k in enumerate(keys)}
        pooled = torch.from_numpy(store.pooled(keys))  # (k, d) float32
        self.table = rearrange(torch.cat([pooled, pooled.new_zeros(1, self.dim)]), "k d -> k 1 d")  # (k + 1, 1, d)
        self.lengths = torch.ones(len(keys) + 1, dtype=torch.int64)
        self.lengths[-1] = 0


class ReducedTokens(IndexedFeatures):
    """Per-token rows reduced once to at most `max_tokens` per record (fusion.reduced), held in memory:
    the (records + 1, width, d) table of the reduced array (fp16 unless the store is fp32), checked block by block as it is read."""

    def __init__(self, store: EmbeddingStore, keys: list[str], reduced: ReducedArray):
        self.dim, self.reduced = store.embed_dim, reduced
        self.row = dict(zip(keys, store.rows(keys).tolist()))
        n, width, d = reduced.shape
        table = np.zeros((n + 1, width, d), reduced.dtype)
        reduced.load(out=table[:n])
        self.table = torch.from_numpy(table)
        self.lengths = torch.from_numpy(np.append(reduced.lengths, 0).astype(np.int64))


class StreamedReducedTokens(ModalityFeatures):
    """A reduced array too large for memory, read per batch.

    Shuffled epochs visit the samples block by block of the largest streamed modality
    (`StoreBatches._order`), so its blocks are read whole, once an epoch each, in one large sequential
    read; the other modalities' records come in no block order and are read where they lie
    (ReducedArray maps the blocks' files). Every streamed modality is told the order in which the
    epoch first reaches its blocks (`lead`) and checks the next READ_AHEAD of them ahead of the batches.
    """

    def __init__(self, store: EmbeddingStore, keys: list[str], reduced: ReducedArray):
        self.dim, self.reduced = store.embed_dim, reduced
        self.row = dict(zip(keys, store.rows(keys).tolist()))
        self.width = reduced.shape[1]
        self.lead(None)

    def lead(self, blocks: list[int] | None) -> None:
        """The order in which the epoch first reaches this array's blocks (None: read nothing ahead)."""
        self._ahead = {b: blocks[i + 1 : i + 1 + READ_AHEAD] for i, b in enumerate(blocks or [])}  # block -> the next ones

    def index(self, keys: list[str | None]) -> np.ndarray:
        return np.array([-1 if k is None else self.row[k] for k in keys], np.int64)

    def gather(self, keys: list[str | None]) -> ModalityBatch:
        at = self.index(keys)
        batch, x = _zeros((len(keys), self.width, self.dim), self.reduced.dtype)  # (b, width, d), zero for absent samples
        for b in self.reduced.rows_of(at, x):  # the blocks after this batch's are read and checked while the next batches are made
            for nxt in self._ahead.get(b, ()):
                self.reduced.read_ahead(nxt)
        length = np.where(at >= 0, self.reduced.lengths[np.maximum(at, 0)], 0)  # (b,)
        mask = np.arange(self.width) < length[:, None]  # (b, width)
        return ModalityBatch(x=batch, mask=torch.from_numpy(mask), present=torch.from_numpy(length > 0))

    @property
    def nbytes(self) -> int:
        return self.reduced.nbytes


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A zeroed batch array as a tensor and a numpy view of the same memory (numpy fills it, the tensor travels).

    In a DataLoader worker process (`--workers`) the memory is shared memory from the start, as torch's
    own `default_collate` allocates it in workers: the batch then reaches the training process as a
    file descriptor, not through the copy into shared memory that torch makes of any other tensor a
    worker returns. That copy cost `--workers` its gain: on the 2-core VM, 2 workers went from 0.8-1.2x
    one loader thread to 1.4-1.7x (bench_fusion_data.py). New shared memory reads as zeros.
    """
    if get_worker_info() is None:
        x = np.zeros(shape, dtype)
        return torch.from_numpy(x), x
    kind = torch.from_numpy(np.zeros(0, dtype)).dtype
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * np.dtype(dtype).itemsize)
    tensor = torch.empty(0, dtype=kind).set_(storage).view(shape)
    return tensor, tensor.numpy()


def _pad(pieces: list[torch.Tensor | None], dim: int, max_rows: int | None = None) -> ModalityBatch:
    """Right-pad per-sample (L_i, d) rows into (b, max L, d) with an explicit mask, in the rows' own dtype.

    Stored fp16 rows stay fp16 (float32 only when a piece is float32: `group_mean` results, pooled
    vectors); the model's first step, its fitted standardisation, computes in float32 on the model's
    device, where the cast is exact and cheap. Float32 batches doubled every byte this function
    writes and the prefetch queue holds: at IsoFormer shapes collation was half of the streamed
    loader's time (bench_fusion_data.py: fp16 batches took a streamed epoch from 205 to 407 MB/s).
    Built in numpy: `np.zeros` takes pages the kernel zeroes lazily, so padding costs nothing, and the
    per-sample assignments make no torch (OpenMP) call.
    """
    if max_rows is not None:
        pieces = [p if p is None or len(p) <= max_rows else group_mean(p, max_rows) for p in pieces]
    lengths = [0 if p is None else len(p) for p in pieces]
    width = max(max(lengths), 1)
    live = [p for p in pieces if p is not None and (p.requires_grad or p.device.type != "cpu")]
    if live:  # finetune's live encoders: the batch stays on their device, and gradients flow through it
        return _pad_differentiable(pieces, lengths, width, dim, live[0].device)
    rows = [None if p is None else p.numpy() for p in pieces]
    dtypes = {r.dtype for r in rows if r is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.float32  # mixed (fp16 and reduced float32 rows): float32
    batch, x = _zeros((len(pieces), width, dim), dtype)  # (b, L, d)
    mask = np.zeros((len(pieces), width), bool)  # (b, L)
    for i, r in enumerate(rows):
        if r is not None:
            x[i, : len(r)] = r  # one copy (a cast only when mixed)
            mask[i, : len(r)] = True
    return ModalityBatch(x=batch, mask=torch.from_numpy(mask), present=torch.tensor([n > 0 for n in lengths]))


def _pad_differentiable(pieces: list[torch.Tensor | None], lengths: list[int], width: int, dim: int, device: torch.device) -> ModalityBatch:
    """`_pad` in torch, on `device`: slice assignment keeps the autograd graph of each piece."""
    x = torch.zeros(len(pieces), width, dim, device=device)  # (b, L, d)
    mask = torch.zeros(len(pieces), width, dtype=torch.bool, device=device)  # (b, L)
    for i, p in enumerate(pieces):
        if p is not None:
            x[i, : len(p)] = p.to(device)
            mask[i, : len(p)] = True
    return ModalityBatch(x=x, mask=mask, present=torch.tensor([n > 0 for n in lengths], device=device))


class InMemoryTokens(ModalityFeatures):
    """All per-token rows of the needed records in one flat tensor, in the stored dtype (usually fp16)."""

    def __init__(self, store: EmbeddingStore, keys: list[str]):
        self.dim = store.embed_dim
        flat, offsets, lengths = store.token_arrays()
        rows = store.rows(keys)
        self.flat = torch.from_numpy(flat)  # (T, d)
        self.span = {k: (int(offsets[r]), int(lengths[r])) for k, r in zip(keys, rows)}

    def gather(self, keys: list[str | None]) -> ModalityBatch:
        pieces: list[torch.Tensor | None] = []
        for k in keys:
            if k is None:
                pieces.append(None)
            else:
                o, n = self.span[k]
                pieces.append(self.flat[o : o + n])
        return _pad(pieces, self.dim)


class StreamedTokens(ModalityFeatures):
    """Per-token rows read from the store per batch: one zarr call reads the batch's records concurrently.

    An event loop runs the reads (the calling batch thread's own for a local store, whose chunks are
    views of its mapped files: embedcache.reader.run_reads, embedcache.mapped_store; zarr's otherwise),
    so there is no thread pool here, and every chunk's crc32c is still checked.
    zarr decodes straight into the padded fp16 batch (`EmbeddingStore.read_tokens_into`): no array
    per record to copy again (+10-15% in bench_fusion_data.py).
    """

    def __init__(self, store: EmbeddingStore, keys: list[str]):
        keep_freed_memory()  # zarr's ~1 MiB chunk buffers reused, not faulted in again per read (embedcache.heap)
        self.dim = store.embed_dim
        self.store = store
        self.dtype = np.dtype(store.attrs["stored_dtype"]["tokens"])

    def gather(self, keys: list[str | None]) -> ModalityBatch:
        lengths = np.array([0 if k is None else self.store.token_span(k)[1] for k in keys])  # (b,)
        shape = (len(keys), max(int(lengths.max(initial=0)), 1), self.dim)  # (b, L, d)
        batch, x = _zeros(shape, self.dtype)  # zero padding
        self.store.read_tokens_into(keys, x)  # zarr decodes into the batch: no per-record array to copy
        mask = np.arange(x.shape[1]) < lengths[:, None]  # (b, L)
        return ModalityBatch(x=batch, mask=torch.from_numpy(mask), present=torch.from_numpy(lengths > 0))


def token_bytes(store: EmbeddingStore, keys: list[str]) -> int:
    """Bytes of per-token rows the keys occupy in the store's dtype (to decide RAM vs streaming)."""
    itemsize = np.dtype(store.attrs["stored_dtype"]["tokens"]).itemsize
    return sum(store.token_span(k)[1] for k in keys) * store.embed_dim * itemsize


# -- the batch source -----------------------------------------------------------------------------


@dataclass
class StoreBatches:
    """`BatchSource` over a manifest and stores: `batches(split, shuffle=..., epoch=...)` yields `Batch`es."""

    config: DataConfig
    manifest: Manifest
    features: dict[str, ModalityFeatures]
    stores: dict[str, EmbeddingStore]
    loading: dict[str, str] = field(default_factory=dict)  # modality -> memory | stream | pooled, and where it is gathered
    device: torch.device | None = None  # set by `place`: every feature table lives there and batches are gathered there
    pin: bool = False  # set by `place`: host-made batches go to pinned memory (asynchronous copies to a CUDA device)
    _splits: dict[str, "SplitArrays"] = field(default_factory=dict, repr=False)  # split -> arrays, made on first use
    _indices: dict[str, dict] = field(default_factory=dict, repr=False)  # split -> table rows and targets on `device`

    @property
    def fingerprints(self) -> dict[str, str]:
        return {m: self.stores[m].fingerprint for m in self.modalities}

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.features)

    @property
    def input_dims(self) -> dict[str, int]:
        return {m: f.dim for m, f in self.features.items()}

    @property
    def target_names(self) -> list[str]:
        return list(self.manifest.target_columns)

    def with_modalities(self, modalities: tuple[str, ...]) -> "StoreBatches":
        """A view feeding only `modalities` (ablations reuse the loaded features)."""
        missing = [m for m in modalities if m not in self.features]
        if missing:
            raise DataError(f"modalities {missing} are not loaded; loaded: {list(self.features)}")
        return StoreBatches(
            config=self.config,
            manifest=self.manifest,
            features={m: self.features[m] for m in modalities},
            stores={m: self.stores[m] for m in modalities},
            loading={m: self.loading[m] for m in modalities},
            device=self.device,
            pin=self.pin,
        )

    def place(self, device: torch.device, *, log=print) -> None:
        """Decide where batches are made for training on `device` (DataConfig.feature_device), and say so.

        Features held whole (pooled vectors, reduced per-token rows in memory: `IndexedFeatures`) are
        moved to the device once, when they fit its budget (device_memory_gb, default half of a CUDA
        device's memory; a CPU device is the host RAM they already occupy): each batch is then an
        index gather there, with no host collation and no copy per step. Otherwise (streamed rows,
        rows not reduced, over budget, or feature_device=host) batches are made on the host by
        background threads; for a CUDA device in pinned memory, so their copies overlap the step.
        """
        indexed = all(isinstance(f, IndexedFeatures) for f in self.features.values())
        nbytes = sum(getattr(f, "nbytes", 0) for f in self.features.values())
        budget = _device_budget(device, self.config.device_memory_gb)
        choice = self.config.feature_device
        if choice == "device" and not indexed:
            held = [m for m, f in self.features.items() if not isinstance(f, IndexedFeatures)]
            raise DataError(f"feature_device 'device': {held} are not held whole (per-token rows are placed on the device only "
                            f"when reduced with max_tokens and in memory); use feature_device auto or host")
        if choice == "device" or (choice == "auto" and indexed and nbytes <= budget):
            for f in self.features.values():
                f.to_(device)
            self.device, self.pin = device, False
            how = f"on {device}, gathered there per batch ({nbytes / 1e6:,.1f} MB of features)"
        else:
            self.device, self.pin = None, device.type == "cuda"
            why = "feature_device host" if choice == "host" else ("streamed or not reduced" if not indexed else
                                                                 f"{nbytes / 1e9:.1f} GB > the device budget {budget / 1e9:.1f} GB")
            how = f"made on the host per batch ({why})" + ("; pinned, copied asynchronously" if self.pin else "")
        where = f"batches on {device}" if self.device is not None else "batches on the host"
        self.loading = {m: f"{v.split('; ')[0]}; {where}" for m, v in self.loading.items()}
        log(f"features: {how}")

    def split_manifest(self, split: str) -> Manifest:
        return self.manifest.split(split)

    def split_arrays(self, split: str) -> "SplitArrays":
        """The split's ids, keys per modality and targets as plain arrays, made once per split."""
        if split not in self._splits:
            self._splits[split] = SplitArrays.of(self.split_manifest(split), self.features)
        return self._splits[split]

    def n_batches(self, split: str) -> int:
        return -(-len(self.split_arrays(split).sample_ids) // self.config.batch_size)

    def __call__(self, split: str, *, shuffle: bool = False, epoch: int = 0) -> Iterator[Batch]:
        arrays = self.split_arrays(split)
        order = self._order(arrays, shuffle, epoch)
        if self.device is not None:  # features on the device: each batch is an index gather there
            return self._gathered(split, arrays, order)
        rows = [order[s : s + self.config.batch_size] for s in range(0, len(order), self.config.batch_size)]
        if self.config.workers:
            return _with_old_objects_frozen(lambda: _worker_batches(EpochBatches(self, arrays, rows), self.config.workers, self.config.prefetch))
        # Batches are assembled in background threads, overlapping the training step.
        return _with_old_objects_frozen(lambda: _prefetch(functools.partial(self._batch, arrays), rows, self.config.prefetch))

    def _order(self, arrays: "SplitArrays", shuffle: bool, epoch: int) -> np.ndarray:
        """The epoch's sample order. Shuffled epochs over a streamed reduced array go block by block (the
        largest such modality's blocks in random order, samples shuffled within each), so every block
        is read about once an epoch; other epochs are plain permutations (or in order, unshuffled).
        Each streamed reduced modality is told the order in which the epoch first reaches its blocks,
        so that it reads the next ones ahead."""
        order = np.arange(len(arrays.sample_ids))
        streamed = {m: f for m, f in self.features.items() if isinstance(f, StreamedReducedTokens)}
        if shuffle:
            rng = np.random.default_rng([self.config.seed, epoch])
            if streamed:
                leader = max(streamed, key=lambda m: streamed[m].reduced.nbytes)
                f = streamed[leader]
                at = f.index(arrays.keys[leader])
                block = np.where(at >= 0, at // f.reduced.block_rows, -1)  # absent samples form a block of their own
                rank = rng.permutation(block.max() + 2)[block + 1]  # a random rank per block
                order = np.lexsort((rng.random(len(order)), rank))  # by block rank, then at random within the block
            else:
                rng.shuffle(order)
        for m, f in streamed.items():
            at = f.index(arrays.keys[m])[order]
            f.lead(list(dict.fromkeys((at[at >= 0] // f.reduced.block_rows).tolist())))  # its blocks, as the epoch first reaches them
        return order

    def _gathered(self, split: str, arrays: "SplitArrays", order: np.ndarray) -> Iterator[Batch]:
        """Batches gathered on `self.device` from tables placed there: the split's table rows and targets
        go there once; per batch, one index per modality (no host collation, no copies per step)."""
        if split not in self._indices:
            targets = arrays.targets.to(self.device)
            self._indices[split] = {
                "rows": {m: torch.from_numpy(f.index(arrays.keys[m])).to(self.device) for m, f in self.features.items()},
                "targets": torch.nan_to_num(targets, nan=0.0),
                "target_mask": ~torch.isnan(targets),
            }
        at = self._indices[split]
        on_device = torch.from_numpy(order).to(self.device)
        for s in range(0, len(order), self.config.batch_size):
            b = on_device[s : s + self.config.batch_size]  # (b,)
            yield Batch(
                features={m: f.take(at["rows"][m][b]) for m, f in self.features.items()},
                targets=at["targets"][b],
                target_mask=at["target_mask"][b],
                sample_ids=[arrays.sample_ids[r] for r in order[s : s + self.config.batch_size]],
            )

    def _batch(self, arrays: "SplitArrays", rows: np.ndarray) -> Batch:
        features = {m: feats.gather([arrays.keys[m][r] for r in rows]) for m, feats in self.features.items()}
        targets = arrays.targets[rows]  # (b, t), NaN = missing
        mask = ~torch.isnan(targets)
        batch = Batch(
            features=features,
            targets=torch.nan_to_num(targets, nan=0.0),
            target_mask=mask,
            sample_ids=[arrays.sample_ids[r] for r in rows],
        )
        return _pinned(batch) if self.pin else batch


def _pinned(batch: Batch) -> Batch:
    """The batch in page-locked memory (made in a loader thread), so `Batch.to(cuda, non_blocking=True)`
    copies it while the step runs instead of blocking on a pageable copy."""
    pin = lambda t: t.pin_memory() if t.device.type == "cpu" else t  # noqa: E731 (live features may already be on the device)
    return Batch(
        features={m: ModalityBatch(x=pin(f.x), mask=pin(f.mask), present=pin(f.present)) for m, f in batch.features.items()},
        targets=pin(batch.targets),
        target_mask=pin(batch.target_mask),
        sample_ids=batch.sample_ids,
    )


def _device_budget(device: torch.device, device_memory_gb: float | None) -> float:
    """Bytes of features `place` puts on `device`: device_memory_gb, else half a CUDA device's memory
    (the rest is the model's, its activations' and the optimizer's); a CPU device has no separate
    memory, the features are already in RAM."""
    if device_memory_gb is not None:
        return device_memory_gb * 1e9
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2
    return float("inf")


@dataclass
class SplitArrays:
    """One split of the manifest as plain lists and a tensor (pandas stays out of the batch loop)."""

    sample_ids: list[str]
    keys: dict[str, list[str | None]]  # modality -> record key per sample (None: the sample lacks it)
    targets: torch.Tensor  # (n, t) float32, NaN = missing

    @classmethod
    def of(cls, part: Manifest, modalities) -> "SplitArrays":
        frame = part.frame
        return cls(
            sample_ids=frame[part.sample_id_column].astype(str).tolist(),
            keys={m: [None if _is_missing(k) else str(k) for k in frame[part.key_columns[m]]] for m in modalities},
            targets=torch.from_numpy(part.targets()),
        )


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


class EpochBatches(Dataset):
    """One epoch's batches by position (rows of the split), each made by `StoreBatches._batch`."""

    def __init__(self, source: StoreBatches, arrays: SplitArrays, rows: list[np.ndarray]):
        self.source, self.arrays, self.rows = source, arrays, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Batch:
        return self.source._batch(self.arrays, self.rows[i])


def _worker_batches(epoch: EpochBatches, workers: int, prefetch: int) -> Iterator[Batch]:
    """The epoch's batches, in order, made by `workers` torch DataLoader processes.

    Forked, so each worker starts with the opened stores and loaded features of this process (nothing is
    pickled or opened again; zarr resets its event loop in a forked child). Each worker has its own zarr
    event loop, so reading and decoding, which one loader thread does on one core, spread over the
    workers' cores; batches are built in shared memory (`_zeros`) and cross without a copy. In training
    they share the cores with the model's step, so they pay off on cores the step leaves free
    (bench_fusion_data.py measures them).
    """
    loader = DataLoader(epoch, batch_size=None, num_workers=workers, prefetch_factor=max(1, -(-prefetch // workers)),
                        multiprocessing_context="fork")  # fmt: skip
    # Forked inside `_with_old_objects_frozen`, as Python's gc docs advise for fork without exec: the
    # workers' collections skip every object they inherit (and leave those pages unwritten).
    return iter(loader)


def _with_old_objects_frozen(epoch: Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
    """The batches of `epoch()`, read while every object older than the epoch is frozen (`gc.freeze`).

    A streamed epoch makes zarr create asyncio tasks, futures and indexers per chunk; enough outlive
    two young collections that CPython 3.11 ran ~5 full collections a streamed epoch, each walking the
    ~300,000 objects torch, transformers and pandas leave at import: 0.55 s of a 5.4 s epoch by
    gc.callbacks (100 genes), with caches cooled on top. Frozen, the collections skip those objects;
    the epoch's own garbage is collected as before, and the heap is unfrozen when the epoch ends or its
    iterator is closed. bench_fusion_data.py, 100 genes, 4 alternating pairs: 1.22x cold, 1.32x warm,
    a fifth less CPU per GB. A heap already frozen (by the caller, or an enclosing epoch) is left as
    it is: unfreezing is theirs. The DataLoader workers fork inside the epoch, as Python's gc docs
    advise for fork without exec (2-11% faster worker epochs, 6 of 6 pairs, when that alone was tried).
    """
    ours = not gc.get_freeze_count()
    if ours:
        gc.freeze()
    try:
        yield from epoch()
    finally:
        if ours:
            gc.unfreeze()


_BATCH_THREADS = 2  # two batches read, decoded and padded at once: on the 2-core VM, one per core


def _prefetch(make: Callable[[np.ndarray], Batch], rows: list[np.ndarray], depth: int) -> Iterator[Batch]:
    """`make(r)` for every r in `rows`, in order, up to `depth` batches ahead, in `_BATCH_THREADS` threads.

    A batch is made in two steps: zarr reads its rows, then the thread pads them, or averages them
    with --max-tokens (numpy and torch, which release the GIL). With one thread the reads stopped while
    a batch was averaged; with two, the next batch's reads run meanwhile. A mapped local store's reads
    run on the asking thread's own event loop (embedcache.reader.run_reads), so two batches also
    decode at once, each on a core (the GIL still serialises zarr's Python and crc32c).
    """
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(_BATCH_THREADS, thread_name_prefix="fusion-batches") as pool:
        try:
            for r in rows:
                pending.append(pool.submit(make, r))
                if len(pending) > max(depth, 1):
                    yield pending.popleft().result()  # re-raises what making it raised
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early (or a batch failed): the rest are not made
            for f in pending:
                f.cancel()


# -- opening ---------------------------------------------------------------------------------------


def check_keys(manifest: Manifest, modality: str, store: EmbeddingStore) -> list[str]:
    """The modality's keys in the manifest, all of which must be in the store (else: examples and counts)."""
    keys = list(dict.fromkeys(manifest.keys(modality)))
    missing = [k for k in keys if k not in store]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(keys)} {modality} keys of manifest {manifest.path} are not in store "
            f"{str(store.path)!r}, e.g. {missing[:5]}; build the store from the manifest's {modality} sequences"
        )
    return keys


# Which residues a modality slot holds: a store records its alphabet (attrs["provenance"]["alphabet"]).
# RNA is written with T (cDNA) for the nucleotide models, so an RNA store may hold the dna alphabet.
SLOT_ALPHABETS = {"dna": ("dna",), "rna": ("rna", "dna"), "protein": ("protein",)}


def check_modality(modality: str, store: EmbeddingStore, path: str) -> None:
    """Refuse a store whose recorded alphabet does not fit the slot it is given for (protein=rna.zarr).

    Slots other than dna / rna / protein, and stores without a recorded alphabet (an `hf` build
    without --alphabet), cannot be checked and are taken as given.
    """
    expected = SLOT_ALPHABETS.get(modality)
    provenance = store.attrs.get("provenance", {})
    alphabet = provenance.get("alphabet")
    if expected is None or alphabet is None or alphabet in expected:
        return
    encoder = store.attrs.get("config", {}).get("encoder", provenance.get("encoder"))
    raise DataError(
        f"store {path!r} was given as the {modality!r} modality but holds {alphabet} sequences "
        f"(built by encoder {encoder!r} with the {alphabet} alphabet); a {modality!r} store needs the "
        f"{' or '.join(expected)} alphabet. Check the --store MODALITY=PATH pairs"
    )


def open_modality_store(config: DataConfig, manifest: Manifest, modality: str) -> tuple[EmbeddingStore, list[str]]:
    """One modality's store, checked (complete, right modality, every manifest key present), and its keys.

    Cached features and live encoders (fusion.finetune) open their stores through here.
    """
    path = config.stores[modality]
    layer = config.layers.get(modality)
    try:
        store = open_store(path, config.storage_options, layer=layer)
    except StoreError as e:
        if layer is None:
            raise
        raise DataError(f"--layer {modality}={layer}: {e}") from e
    if store.layer is None:
        raise DataError(
            f"store {path!r} ({modality}) holds layers {store.layers}; choose one with --layer {modality}=I "
            f"(e.g. --layer {modality}={store.layers[-1]})"
        )
    if not store.complete:
        raise DataError(f"store {path!r} ({modality}) is {store.status!r}, not complete: run its embedcache build again to finish it")
    check_modality(modality, store, path)
    keys = check_keys(manifest, modality, store)
    if config.features == "pooled" and store.attrs["config"]["pooling"] == "none":
        raise DataError(f"store {path!r} ({modality}) was built with --pooling none: it has no pooled vectors; use --features tokens")
    return store, keys


def open_batches(config: DataConfig, manifest: Manifest, *, log=print, progress: bool = False) -> StoreBatches:
    """Open the stores, check them against the manifest, and load or prepare features per modality.

    With max_tokens, per-token rows come from the store's reduced array (fusion.reduced), made on
    first use (`progress`: its bar) and reused by every later run and epoch.
    """
    features, stores, loading = {}, {}, {}
    for m in config.used_modalities:
        path = config.stores[m]
        store, keys = open_modality_store(config, manifest, m)
        if config.features == "pooled":
            features[m], loading[m] = PooledFeatures(store, keys), "pooled"
        else:
            if not store.has_tokens:
                raise DataError(f"store {path!r} ({m}) holds no per-token embeddings (--no-tokens); use features='pooled'")
            reduced = None
            if config.max_tokens is not None:
                reduced = reduced_array(store, ReductionConfig.of(store, config.max_tokens), config.reduced_dir, log=log, progress=progress)
            size = token_bytes(store, keys) if reduced is None else reduced.nbytes
            in_memory = config.loading == "memory" or (config.loading == "auto" and size <= config.memory_gb * 1e9)
            if reduced is None:
                features[m] = (InMemoryTokens if in_memory else StreamedTokens)(store, keys)
            else:
                features[m] = (ReducedTokens if in_memory else StreamedReducedTokens)(store, keys, reduced)
            loading[m] = ("memory" if in_memory else "stream") + ("" if reduced is None else f", reduced to {config.max_tokens} rows")
            pool = store.attrs.get("config", {}).get("token_pool")
            pooled_note = f", every {pool} rows averaged at build (--token-pool)" if pool and pool > 1 else ""
            what = "per-token" if reduced is None else f"per-token reduced, {reduced.path}"
            log(f"{m}: {len(keys)} records from {path} ({size / 1e6:,.1f} MB {what}, {loading[m]}{pooled_note})")
        stores[m] = store
    return StoreBatches(config=config, manifest=manifest, features=features, stores=stores, loading=loading)
