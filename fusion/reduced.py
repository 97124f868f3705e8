"""Per-token rows reduced once (`--max-tokens`): a store's records averaged down to at most
`max_tokens` rows each, kept as one training-ready array that every epoch and every run reuses.

Without it, each epoch of each run read the per-token store again and averaged the same records
again (`group_mean`): an ablation of N runs read every store N x epochs times. The reduction of a
store is fixed by the store's content, its layer and `max_tokens`, so it is computed in one pass
and written, under a name derived from exactly those, into a cache directory:

    <cache>/<digest>.zarr/
        rows       (records, width, d) float16   each record's reduced rows, zero past its length, in the
                                                 store's per-token dtype (float16 unless built float32);
                                                 one raw chunk (file, no codec) per block of records
                                                 (about BLOCK_BYTES): the file is the block's rows as in memory
        lengths    (records,) int32              rows per record (<= max_tokens)
        block_crc  (blocks,) uint32              crc32 of each block's rows: a changed or swapped file is refused
        zarr.json  attrs["fusion_reduced"]: format, ReductionConfig, the source store, block rows, the crc32
                   of lengths and of block_crc (zarr reads a lost chunk as zeros; checked on open)

Records are in the store's own record order (`EmbeddingStore.ids`). Reading maps each block's file
(ReducedArray): a streamed epoch reads the modality it is ordered by a whole block at a time (one
sequential read of a file, the next blocks read ahead on threads of their own), the others record by
record (only the pages a record lies on, once its block was checked). The array is written under a
temporary name and renamed when complete, so a killed reduction never leaves one that looks
finished; a store that gained commits (or a different layer or max_tokens) has another digest, so
its array is made anew and a stale one is never read. Each block's crc32 is checked once per
process, on its first read (a record read later from a block checked before is not checked again).
The chunks carry no crc32c of their own, unlike a store's: the block's crc32 covers every byte once,
and also catches a swapped file, which per-chunk checksums cannot.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import threading
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
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
from zarr.codecs.bytes import Endian
from zarr.storage import LocalStore

from embedcache import EmbeddingStore
from embedcache.errors import StoreError
from embedcache.mapped_store import MappedLocalStore
from fusion.errors import FusionError

FORMAT = "fusion-reduced-tokens"
FORMAT_VERSION = 3  # 3: lengths and block digests checked on open; 2: one raw chunk file per block, read mapped; 1: shards of crc32c chunks
BLOCK_BYTES = 16 << 20  # records of one chunk file (a block): large sequential reads, few enough files
CACHE_ENV = "EMBEDCACHE_CACHE"  # overrides the cache root (default: $XDG_CACHE_HOME/embedcache or ~/.cache/embedcache)
MAX_MAPS = 64  # block files kept mapped per array (each mapping holds a file descriptor)
READ_AHEAD = 2  # blocks each streamed modality checks ahead of its batches, and the threads doing it


class ReducedError(FusionError):
    """A reduced array is damaged, foreign or does not belong to its store."""


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

    @classmethod
    def of(cls, store: EmbeddingStore, max_tokens: int) -> "ReductionConfig":
        """The reduction of `store`'s layer, in the store's own per-token dtype: rows stored in float32
        (`embedcache build --dtype float32`, for an encoder whose rows differ below float16's step)
        stay float32."""
        return cls(max_tokens, int(store.layer), store.attrs["stored_dtype"]["tokens"])


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
    """An opened reduced array: lengths in memory, each block's file mapped and its rows read in place.

    The rows array has no codec and one chunk per block, so a block's chunk file is its rows as they
    lie in memory (C order, little-endian): they are read through a read-only memory map of it,
    without zarr's decode, which copied every block on zarr's one event-loop thread and held a
    streamed epoch under half of the disk's read rate (benchmarks/README.md). Mapped, the page cache
    is the only cache; the copy into a batch is the one copy; a record read later touches only its
    own pages. What a mapping implies (a disk error or a file truncated in place is a SIGBUS, not an
    exception) is as for the stores (embedcache.mapped_store); nothing truncates these files in place.
    """

    def __init__(self, path: Path, store: EmbeddingStore, config: ReductionConfig):
        self.path = path
        try:
            group = zarr.open_group(LocalStore(path, read_only=True), mode="r")
            meta = dict(group.attrs.get("fusion_reduced", {}))
            rows = group["rows"]
            self.lengths = group["lengths"][:]  # (n,) int32
            self._block_crc = group["block_crc"][:]  # (blocks,) uint32
        except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError) as e:
            raise ReducedError(f"reduced array {str(path)!r} cannot be read ({type(e).__name__}: {e}); delete it and it is made again") from e
        expected = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(config), "source": source_of(store)}
        found = {k: meta.get(k) for k in expected}
        if found != expected:
            raise ReducedError(f"reduced array {str(path)!r} holds {found}, but store {store.path!r} with this reduction needs {expected}; "
                               f"delete it and it is made again")
        index_digests = {"lengths": zlib.crc32(self.lengths.tobytes()), "block_crc": zlib.crc32(self._block_crc.tobytes())}
        if meta.get("index_digests") != index_digests:  # zarr reads a missing chunk as zeros: a lost file must not pass for zero lengths
            raise ReducedError(f"reduced array {str(path)!r}: lengths and block digests have crc32 {index_digests}, recorded "
                               f"{meta.get('index_digests')}: a file was changed or lost; delete the array and it is made again")
        n = len(store)
        self.block_rows = int(meta.get("block_rows", 0))
        if rows.shape[0] != n or len(self.lengths) != n or self.block_rows < 1 or len(self._block_crc) != -(-n // self.block_rows):
            raise ReducedError(f"reduced array {str(path)!r}: {rows.shape[0]} rows, {len(self.lengths)} lengths, "
                               f"{len(self._block_crc)} block digests of {self.block_rows} records; store {store.path!r} has {n} records")
        layout = (rows.shards, rows.chunks[0], rows.dtype, [type(c).__name__ for c in rows.metadata.codecs], rows.metadata.codecs[0].endian)
        if layout[:-1] != (None, self.block_rows, np.dtype(config.dtype), ["BytesCodec"]) or layout[-1] not in (None, Endian.little):
            raise ReducedError(f"reduced array {str(path)!r}: rows laid out as (shards, chunk rows, dtype, codecs, endian) {layout}, "
                               f"not one raw little-endian chunk of {self.block_rows} records per block; delete it and it is made again")
        self.shape = tuple(rows.shape)  # (n, width, d)
        self.dtype = np.dtype(config.dtype)
        self._keys = [rows.metadata.encode_chunk_key((b, 0, 0)) for b in range(self.n_blocks)]  # block -> its file under rows/
        self._checked: set[int] = set()
        self._forked()

    def _forked(self) -> None:
        """The locks, mapped files and read-ahead threads of this process (a forked DataLoader worker makes its own)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # the block files, mapped (the last MAX_MAPS used; opened without following a symlink, mapped anew if replaced)
        self._files = MappedLocalStore(self.path / "rows", max_maps=MAX_MAPS)
        self._checking: dict[int, Future] = {}  # block -> its check under way
        self._reader: ThreadPoolExecutor | None = None  # checks blocks ahead (read_ahead), made on first use

    @property
    def n_blocks(self) -> int:
        return len(self._block_crc)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def _mapped(self, b: int) -> np.ndarray:
        """(<= block_rows, width, d) rows of block b, mapped from its file (not read: pages come in as they are touched)."""
        lo, hi = b * self.block_rows, min((b + 1) * self.block_rows, self.shape[0])
        size = self.block_rows * math.prod(self.shape[1:]) * self.dtype.itemsize  # zarr writes the last block's chunk whole too
        try:
            data = self._files.mapped(self._keys[b])
            if len(data) != size:
                raise ValueError(f"{len(data)} bytes, a block is {size}")
        except (OSError, ValueError, StoreError) as e:
            raise ReducedError(f"reduced array {str(self.path)!r}: block {b} (records {lo}..{hi - 1}, rows/{self._keys[b]}) cannot be read "
                               f"({e}); delete the array and it is made again") from e
        return np.frombuffer(data, self.dtype).reshape(self.block_rows, *self.shape[1:])[: hi - lo]

    def _check(self, b: int, block: np.ndarray) -> None:
        crc = zlib.crc32(block)  # reads the block's pages in: its disk read happens here, with the GIL released
        if crc != int(self._block_crc[b]):
            lo = b * self.block_rows
            raise ReducedError(f"reduced array {str(self.path)!r}: block {b} (records {lo}..{lo + len(block) - 1}) has crc32 {crc}, "
                               f"recorded {int(self._block_crc[b])}: the file was changed or swapped; delete the array and it is made again")
        self._checked.add(b)

    def block(self, b: int) -> np.ndarray:
        """(<= block_rows, width, d) rows of block b (mapped), checked on its first read."""
        if os.getpid() != self._pid:
            self._forked()
        with self._lock:
            checked = b in self._checked  # under the lock: a check that just ended is seen, not made again
            future, mine = self._checking.get(b), False
            if not checked and future is None:
                future, mine = self._checking.setdefault(b, Future()), True
        if checked:
            return self._mapped(b)
        if mine:
            self._verify(b, future)
        return future.result()

    def read_ahead(self, b: int) -> None:
        """Check block b (reading it from the disk) on a background thread, when that is not done or under way,
        so its read overlaps the batches made from the blocks before it."""
        if os.getpid() != self._pid:
            self._forked()
        with self._lock:
            if b in self._checked or b in self._checking:
                return
            future = self._checking[b] = Future()
            if self._reader is None:
                self._reader = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="fusion-read-ahead")
        try:
            self._reader.submit(self._verify, b, future)
        except BaseException as e:  # no thread to run it (shutting down): whoever waits for b must not wait forever
            with self._lock:
                self._checking.pop(b, None)
            future.set_exception(e)

    def _verify(self, b: int, future: Future) -> None:
        """Map and check block b, then resolve `future` with its rows (or its error: whoever waits raises it)."""
        try:
            rows = self._mapped(b)
            self._check(b, rows)
            future.set_result(rows)
        except BaseException as e:
            future.set_exception(e)
        finally:
            with self._lock:
                self._checking.pop(b, None)

    def rows_of(self, at: np.ndarray, out: np.ndarray) -> list[int]:
        """out[i] = the rows of record at[i] (-1 leaves out[i]); each block is checked on its first read.
        Returns the blocks read."""
        blocks = np.unique(at[at >= 0] // self.block_rows).tolist()
        for b in blocks:
            rows = self.block(b)
            pick = np.flatnonzero((at >= 0) & (at // self.block_rows == b))
            out[pick] = rows[at[pick] - b * self.block_rows]
        return blocks

    def load(self, out: np.ndarray | None = None) -> np.ndarray:
        """(n, width, d) rows: every block, checked (the next ones read ahead) and copied into `out` (made when not given)."""
        rows = out if out is not None else np.empty(self.shape, self.dtype)
        for b in range(self.n_blocks):
            for ahead in range(b + 1, min(b + 1 + READ_AHEAD, self.n_blocks)):
                self.read_ahead(ahead)
            rows[b * self.block_rows : (b + 1) * self.block_rows] = self.block(b)
        return rows


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
    row_bytes = store.embed_dim * np.dtype(store.attrs["stored_dtype"]["tokens"]).itemsize
    if (hi - lo) > 2 * rows + BLOCK_BYTES // row_bytes:  # scattered: the span would read far more than the records
        return store.tokens_many(ids, layer=layer)
    flat = store.token_rows(lo, hi, layer=layer)  # (hi - lo, d)
    return [flat[o - lo : o - lo + n] for o, n in spans]


def _write(store: EmbeddingStore, config: ReductionConfig, path: Path, progress: bool) -> None:
    """Reduce every record of the store, block by block, into a temporary array; rename it into place when complete."""
    n, d = len(store), store.embed_dim
    width = max(1, min(config.max_tokens, max((store.token_span(i)[1] for i in store.ids), default=1)))
    block_rows = max(1, min(n, BLOCK_BYTES // (width * d * np.dtype(config.dtype).itemsize)))  # a small array: one block of its records
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(str(tmp), mode="w")
        # One raw chunk per block (ReducedArray maps it), written even when all zeros: a missing file is an error, not zeros.
        rows = group.create_array("rows", shape=(n, width, d), chunks=(block_rows, width, d), dtype=config.dtype, compressors=None,
                                  dimension_names=("record", "row", "feature"), fill_value=0, config={"write_empty_chunks": True})  # fmt: skip
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
            "index_digests": {"lengths": zlib.crc32(lengths.tobytes()), "block_crc": zlib.crc32(crcs.tobytes())},
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():  # another run made it first: theirs is the same array
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
