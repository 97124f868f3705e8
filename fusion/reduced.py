"""Per-token rows reduced once (`--max-tokens`): a store's records averaged down to at most
`max_tokens` rows each, kept as one training-ready array that every epoch and every run reuses.

Without it, each epoch of each run read the per-token store again and averaged the same records
again (`group_mean`): an ablation of N runs read every store N x epochs times. The reduction of a
store is fixed by the store's content, its layer and `max_tokens`, so it is computed in one pass
and written, under a name derived from exactly those, into a cache directory:

    <cache>/<digest>.zarr/
        rows       (records, width, d) float16   each record's reduced rows, zero past its length; one
                                                 shard (file) per block of records (about BLOCK_BYTES),
                                                 chunks of about CHUNK_BYTES (at least one record) inside it
        lengths    (records,) int32              rows per record (<= max_tokens)
        block_crc  (blocks,) uint32              crc32 of each block's rows: a swapped chunk is refused
        zarr.json  attrs["fusion_reduced"]: format, ReductionConfig, the source store, block rows

Records are in the store's own record order (`EmbeddingStore.ids`). A streamed epoch reads the
modality it is ordered by a whole block at a time (one sequential read of a file), the others record
by record (a chunk each, no block read for one record). Every chunk also carries its crc32c, as in a
store. The array is written under a temporary name and renamed when complete, so
a killed reduction never leaves one that looks finished; a store that gained commits (or a
different layer or max_tokens) has another digest, so its array is made anew and a stale one is
never read. Reading checks each block's crc32 once per object, as it first reads it.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import os
import shutil
import threading
import uuid
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from einops import rearrange
from tqdm.auto import tqdm
from zarr.codecs import Crc32cCodec
from zarr.core.buffer.cpu import NDBuffer
from zarr.storage import LocalStore

from embedcache import EmbeddingStore
from embedcache.mapped_store import MappedLocalStore, can_map
from embedcache.reader import run_reads
from fusion.errors import FusionError

FORMAT = "fusion-reduced-tokens"
FORMAT_VERSION = 1
BLOCK_BYTES = 16 << 20  # records of one shard (a block): large sequential reads, few enough files
CHUNK_BYTES = 256 << 10  # records of one chunk inside it, at least one: what a record-by-record read reads
CACHE_ENV = "EMBEDCACHE_CACHE"  # overrides the cache root (default: $XDG_CACHE_HOME/embedcache or ~/.cache/embedcache)
CACHED_BLOCKS = 4  # decoded blocks a streamed reader keeps per modality


class ReducedError(FusionError):
    """A reduced array is damaged, foreign or does not belong to its store."""


# What reading a damaged array raises: a missing or short file, a chunk's crc32c, a codec.
_READ_ERRORS = (OSError, ValueError, RuntimeError, zarr.errors.BaseZarrError)


# A window wider than this many rows is averaged by torch's adaptive pooling instead of row by row.
_WIDE_WINDOW = 16


def group_mean(x: torch.Tensor, max_rows: int | None) -> torch.Tensor:
    """(L, d) -> (min(L, max_rows), d): the mean of consecutive, near-equal groups of rows.

    An explicit, recorded reduction (DataConfig.max_tokens) for fusion inputs too long for the
    compute at hand; every input row still counts, none is dropped. The groups are those of
    `F.adaptive_avg_pool1d` (group i: rows floor(i L / m) to ceil((i + 1) L / m), so neighbours
    may share a row), computed in float32 whatever x's dtype, and the result is bit-equal to it
    (tests/fusion/test_data.py). It is summed here as a few (m, d) row gathers, one per position
    within a group: about 6x faster than the pooling, which reads the rows transposed (2,000 x 1,024
    fp16 rows to 512 on the 2-core VM: 1.8 ms vs 10.8 ms). Groups wider than _WIDE_WINDOW rows still
    go through the pooling.
    """
    if max_rows is None or len(x) <= max_rows:
        return x
    n = len(x)
    group = torch.arange(max_rows, device=x.device)
    start = group * n // max_rows  # (m,)
    end = -(-(group + 1) * n // max_rows)  # (m,) ceil, exclusive
    width = int((end - start).max())
    if width > _WIDE_WINDOW:  # few groups of many rows: one pooling call rather than a long loop here
        pooled = F.adaptive_avg_pool1d(rearrange(x.float(), "l d -> 1 d l"), max_rows)  # (1, d, m)
        return rearrange(pooled, "1 d l -> l d")
    size = end - start  # (m,) rows per group
    smallest = int(size.min())
    total = x.index_select(0, start).float()  # (m, d): each group's first row
    for k in range(1, width):  # then each group's k-th row, added in row order as the pooling adds them
        at = start + k
        if k < smallest:  # every group has one
            total += x.index_select(0, at)  # fp16 rows are widened to float32 exactly, in the addition
        else:  # groups without a k-th row add zero; elementwise, not index_add_, which took ms when a core was busy
            has = rearrange(at < end, "m -> m 1")
            total += torch.where(has, x.index_select(0, at.clamp(max=n - 1)).float(), 0.0)
    return total / size[:, None]  # (m, d) float32


@dataclass(frozen=True)
class ReductionConfig:
    """What a reduced array holds besides its source store. Written into the array."""

    max_tokens: int  # rows per record at most: longer records are averaged by `group_mean`
    layer: int  # the store's hidden state that was reduced
    dtype: str = "float16"  # stored dtype of the reduced rows


def default_cache_dir() -> Path:
    """Where reduced arrays live unless the run says (`--reduced-dir`): $EMBEDCACHE_CACHE/reduced,
    else $XDG_CACHE_HOME/embedcache/reduced, else ~/.cache/embedcache/reduced (like the HF cache)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "embedcache")
    return Path(root) / "reduced"


def source_of(store: EmbeddingStore) -> dict:
    """The store content a reduction depends on: its fingerprint and its commit head (the commit count
    and the crc32 chaining every commit's checksums), so any new or changed commit changes it."""
    head = store.log.head
    return {"fingerprint": store.fingerprint, "commits": head.n, "records": head.records, "log_crc": head.log_crc}


def array_name(store: EmbeddingStore, config: ReductionConfig) -> str:
    key = json.dumps({"source": source_of(store), "config": asdict(config), "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24] + ".zarr"


class ReducedArray:
    """An opened reduced array: lengths in memory, rows read whole (`load`) or block by block (`rows_of`)."""

    def __init__(self, path: Path, store: EmbeddingStore, config: ReductionConfig):
        self.path = path
        try:
            group = zarr.open_group(MappedLocalStore(path) if can_map() else LocalStore(path, read_only=True), mode="r")
            meta = dict(group.attrs.get("fusion_reduced", {}))
            self._rows = group["rows"]
            self.lengths = group["lengths"][:]  # (n,) int32
            self._block_crc = group["block_crc"][:]  # (blocks,) uint32
        except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError) as e:
            raise ReducedError(f"reduced array {str(path)!r} cannot be read ({type(e).__name__}: {e}); delete it and it is made again") from e
        expected = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(config), "source": source_of(store)}
        found = {k: meta.get(k) for k in expected}
        if found != expected:
            raise ReducedError(f"reduced array {str(path)!r} holds {found}, but store {store.path!r} with this reduction needs {expected}; "
                               f"delete it and it is made again")
        n = len(store)
        self.block_rows = int(meta.get("block_rows", 0))
        if self._rows.shape[0] != n or len(self.lengths) != n or self.block_rows < 1 or len(self._block_crc) != -(-n // self.block_rows):
            raise ReducedError(f"reduced array {str(path)!r}: {self._rows.shape[0]} rows, {len(self.lengths)} lengths, "
                               f"{len(self._block_crc)} block digests of {self.block_rows} records; store {store.path!r} has {n} records")
        self.shape = tuple(self._rows.shape)  # (n, width, d)
        self._checked: set[int] = set()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # block -> decoded rows (streamed reads)
        self._lock = threading.Lock()

    @property
    def n_blocks(self) -> int:
        return len(self._block_crc)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self._rows.dtype.itemsize

    def _check(self, b: int, block: np.ndarray) -> None:
        if b in self._checked:
            return
        crc = zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1))
        if crc != int(self._block_crc[b]):
            lo = b * self.block_rows
            raise ReducedError(f"reduced array {str(self.path)!r}: block {b} (records {lo}..{lo + len(block) - 1}) has crc32 {crc}, "
                               f"recorded {int(self._block_crc[b])}: the file was changed or swapped; delete the array and it is made again")
        self._checked.add(b)

    def _read(self, lo: int, hi: int) -> np.ndarray:
        try:
            return self._rows[lo:hi]
        except _READ_ERRORS as e:
            raise ReducedError(f"reduced array {str(self.path)!r}: records {lo}..{hi - 1} cannot be read ({e}); "
                               f"delete the array and it is made again") from e

    def load(self, out: np.ndarray | None = None) -> np.ndarray:
        """(n, width, d) float16: every block, read in one call (chunks decoded concurrently, straight
        into `out` when given) and checked."""
        n = self.shape[0]
        rows = out if out is not None else np.empty(self.shape, np.float16)
        try:
            self._rows.get_orthogonal_selection(slice(0, n), out=NDBuffer.from_numpy_array(rows))
        except _READ_ERRORS as e:
            raise ReducedError(f"reduced array {str(self.path)!r} cannot be read ({e}); delete it and it is made again") from e
        for b in range(len(self._block_crc)):
            self._check(b, rows[b * self.block_rows : (b + 1) * self.block_rows])
        return rows

    def block(self, b: int) -> np.ndarray:
        """(<= block_rows, width, d) rows of block b, checked on its first read; the last CACHED_BLOCKS stay decoded."""
        with self._lock:
            if b in self._cache:
                self._cache.move_to_end(b)
                return self._cache[b]
        rows = self._read(b * self.block_rows, min((b + 1) * self.block_rows, self.shape[0]))
        with self._lock:
            self._check(b, rows)
            self._cache[b] = rows
            while len(self._cache) > CACHED_BLOCKS:
                self._cache.popitem(last=False)
        return rows

    def rows_of(self, at: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the rows of record at[i], a whole block at a time (kept decoded: samples visited block by block); -1 leaves out[i]."""
        for b in np.unique(at[at >= 0] // self.block_rows):
            rows = self.block(int(b))
            pick = np.flatnonzero((at >= 0) & (at // self.block_rows == b))
            out[pick] = rows[at[pick] - b * self.block_rows]

    def records_into(self, at: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the rows of record at[i], read record by record (concurrently, in one call: a chunk each),
        for samples in no block order. A block not read before is read whole (it is checked on its first read)
        and serves its records from memory, so no record is read twice. -1 leaves out[i]."""
        unseen = [b for b in np.unique(at[at >= 0] // self.block_rows).tolist() if b not in self._checked and b not in self._cache]
        if unseen:
            whole = (at >= 0) & np.isin(at // self.block_rows, unseen)
            self.rows_of(np.where(whole, at, -1), out)
            at = np.where(whole, -1, at)
        array = self._rows._async_array
        first = {int(r): i for i, r in reversed(list(enumerate(at))) if r >= 0}

        async def read_all() -> None:
            await asyncio.gather(*(array.get_orthogonal_selection(slice(r, r + 1), out=NDBuffer.from_numpy_array(out[i : i + 1]))
                                   for r, i in first.items()))  # fmt: skip

        try:
            run_reads(self._rows.store, read_all())
        except _READ_ERRORS as e:
            raise ReducedError(f"reduced array {str(self.path)!r}: {len(first)} records cannot be read ({e}); delete it and it is made again") from e
        for i, r in enumerate(at):
            if r >= 0 and first[int(r)] != i:
                out[i] = out[first[int(r)]]


def reduced_array(store: EmbeddingStore, config: ReductionConfig, cache_dir: str | Path | None = None, *,
                  log: Callable[[str], None] = print, progress: bool = False) -> ReducedArray:  # fmt: skip
    """The store's reduction: opened from the cache when it was made before, else made now (one pass over the store)."""
    if cache_dir and "://" in str(cache_dir):  # checked before Path(), which folds "s3://b" into "s3:/b"
        raise ReducedError(f"--reduced-dir {str(cache_dir)!r}: reduced arrays live in a local directory (the stores themselves may be remote)")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / array_name(store, config)
    if not path.exists():
        log(f"reducing {store.path} to at most {config.max_tokens} rows per record (layer {config.layer}) once, into {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, no permission, a read-only disk
            raise ReducedError(f"--reduced-dir {str(root)!r}: cannot make a directory for the reduced arrays there ({e})") from e
        try:
            _write(store, config, path, progress)
        except OSError as e:  # the disk filled up, the directory became read-only: nothing is left behind
            raise ReducedError(f"reducing {store.path} into {str(path)!r} failed: {e}") from e
    return ReducedArray(path, store, config)


def _block_tokens(store: EmbeddingStore, ids: list[str], layer: int) -> list[np.ndarray]:
    """The per-token rows of `ids`: one read of the rows they span when those lie close together (a build
    commits records side by side), which beats one read per record by far for short records; else per record."""
    spans = [store.token_span(i) for i in ids]
    lo, hi = min(o for o, _ in spans), max(o + n for o, n in spans)
    rows = sum(n for _, n in spans)
    if (hi - lo) > 2 * rows + (BLOCK_BYTES // (2 * store.embed_dim)):  # scattered: the span would read far more than the records
        return store.tokens_many(ids, layer=layer)
    flat = store.token_rows(lo, hi, layer=layer)  # (hi - lo, d)
    return [flat[o - lo : o - lo + n] for o, n in spans]


def _write(store: EmbeddingStore, config: ReductionConfig, path: Path, progress: bool) -> None:
    """Reduce every record of the store, block by block, into a temporary array; rename it into place when complete."""
    n, d = len(store), store.embed_dim
    width = max(1, min(config.max_tokens, max((store.token_span(i)[1] for i in store.ids), default=1)))
    record_bytes = width * d * np.dtype(config.dtype).itemsize
    chunk_rows = max(1, CHUNK_BYTES // record_bytes)  # records of one chunk: small records share one, so a block is not thousands of chunks
    block_rows = max(1, BLOCK_BYTES // record_bytes) // chunk_rows * chunk_rows or chunk_rows
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(str(tmp), mode="w")
        rows = group.create_array("rows", shape=(n, width, d), shards=(block_rows, width, d), chunks=(chunk_rows, width, d), dtype=config.dtype,
                                  dimension_names=("record", "row", "feature"), compressors=(Crc32cCodec(),), fill_value=0)  # fmt: skip
        lengths = np.zeros(n, np.int32)
        crcs = np.zeros(-(-n // block_rows), np.uint32)
        bar = tqdm(total=n, unit="record", desc=f"reduce {Path(store.path).name}", disable=not progress, dynamic_ncols=True)
        for b, lo in enumerate(range(0, n, block_rows)):
            ids = store.ids[lo : lo + block_rows]
            block = np.zeros((len(ids), width, d), config.dtype)  # (k, width, d)
            for j, x in enumerate(_block_tokens(store, ids, config.layer)):
                r = group_mean(torch.from_numpy(x), config.max_tokens)  # (<= width, d)
                block[j, : len(r)] = r.numpy()
                lengths[lo + j] = len(r)
            rows[lo : lo + len(ids)] = block
            crcs[b] = zlib.crc32(block.view(np.uint8).reshape(-1))
            bar.update(len(ids))
        bar.close()
        group.create_array("lengths", data=lengths, dimension_names=("record",), compressors=(Crc32cCodec(),))
        group.create_array("block_crc", data=crcs, dimension_names=("block",), compressors=(Crc32cCodec(),))
        group.attrs["fusion_reduced"] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": asdict(config),
            "source": source_of(store),
            "store": store.path,  # where it was made from (not part of its identity: a moved store keeps its array)
            "block_rows": block_rows,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():  # another run made it first: theirs is the same array
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
