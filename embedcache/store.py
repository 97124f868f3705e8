"""The embedding store: a Zarr v3 group at a path or URL. Its schema is the contract with `fusion`.

Schema version 2 (dimension names are Zarr v3 `dimension_names`, so `xarray.open_zarr` reads it):

    sequence       (sequence,)                str      record ids, one per input record (coordinate)
    content_index  (sequence,)                int64    row of the record's unique sequence in the content arrays
    content        (content,)                 str      sha256 of the residues: the content address (coordinate)
    residues       (content,)                 str      the sequence as embedded (upper-cased, before any crop)
    n_input_tokens (content,)                 int64    tokens of the whole sequence
    n_cropped      (content,)                 int64    tokens removed by an explicit --crop (0 otherwise)
    n_windows      (content,)                 int32    model calls the sequence took
    pooled         (content, layer, feature)  float32  pooled embedding per unique sequence    [pooling != none]
    token_offset   (content,)                 int64    first row of the sequence in `tokens`    [per-token on]
    token_length   (content,)                 int64    rows of the sequence in `tokens`         [per-token on]
    tokens         (token, layer, feature)    float16  per-token embeddings, flat ("contiguous ragged array")
    layer          (layer,)                   int64    hidden-state index of each layer (coordinate)
    _commits/                                          the commit log (embedcache.commits)

What counts is what the commit log says: records [0, head.records) and the content and token
rows of each commit. Rows outside them (a build in progress, or one killed) are never read.
Every chunk carries a crc32c checksum, and every commit a crc32 of each array's rows, so a
flipped byte, a missing chunk or an edited index is named by `verify` and refused by readers.
A completed build also writes Zarr v3 consolidated metadata (so `xarray.open_zarr` opens the store
without a warning); embedcache itself never reads it, so a stale copy cannot mislead it.

Changes from schema 1: `pooled` is per unique sequence (was per record) and both per-layer arrays
have a `layer` dimension; the commit log moved from `_build` attrs to `_commits/`; chunks carry
crc32c. Schema 1 stores still open for reading; they cannot be extended.
"""

from __future__ import annotations

import asyncio
import json
import math
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.api.asynchronous import consolidate_metadata
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.array import AsyncArray
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning

from embedcache.commits import (
    CHECKED_ARRAYS,
    COMMITS_GROUP,
    CONTENT_ARRAYS,
    RECORD_ARRAYS,
    TOKEN_INDEX_ARRAYS,
    SHARD_CRC,
    CommitLog,
    Head,
    TokenShards,
    append_commit,
    append_commits,
    crc_of,
    create_log,
    create_shard_log,
    read_log,
    shard_digests,
    token_shards,
    trim_log,
    write_head,
    write_shard_digests,
)
from embedcache.errors import FingerprintMismatch, StoreError
from embedcache.shard_stamps import current_stamps, record_stamps, recorded_stamps
from embedcache.lease import LEASE_KEY
from embedcache.spool import SPOOL_PREFIX
from embedcache.location import Location, check_local_files, describe_io_error, io_errors, open_location, why_absent

FORMAT = "embedcache-store"
LEGACY_BUILD_GROUP = "_build"  # schema 1: the commit log lived in this group's attrs
SCHEMA_VERSION = 2
CHUNK_BYTES = 1 << 20  # ~1 MiB inner chunks: small enough for one-sequence reads
RECORD_CHUNK = 4096  # rows per chunk of the per-record / per-content arrays
RESIDUE_CHUNK = 256  # strings per chunk of `residues` (an Enformer window is 196 kb)
MAX_EMBED_DIM = 1 << 16  # a store claiming wider rows is damaged, not a model

# Per-token chunk codecs (BuildConfig.token_codec). fp16 embeddings barely compress (1.08-1.10x with
# any codec), and decoding is what the fusion loader pays on every epoch, so the default stores them
# raw (bench_fusion_data.py). Either way every chunk carries its crc32c.
TOKEN_CODECS = {
    "none": (Crc32cCodec(),),
    "lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()),
}
_TEXT_CODECS = (ZstdCodec(level=3), Crc32cCodec())
_NUMBER_CODECS = (ZstdCodec(level=1), Crc32cCodec())
# Every chunk inside a committed range is written, even when it holds only the fill value, so a
# missing chunk object is always a fault, never an all-zero chunk.
_WRITE_CONFIG = {"write_empty_chunks": True}


@dataclass
class ContentResult:
    """One embedded unique sequence, on its way to the store."""

    key: str
    residues: str
    tokens: np.ndarray | None  # (L, k, d) in the stored dtype, or None when per-token output is off
    pooled: np.ndarray | None  # (k, d) float32, or None when pooling is off
    n_input_tokens: int
    n_cropped: int
    n_windows: int


@dataclass(frozen=True)
class Committed:
    records: int = 0
    content: int = 0  # one past the last content row in use
    tokens: int = 0  # one past the last token row in use


def token_chunking(row_bytes: int, shard_mb: float, chunk_bytes: int = CHUNK_BYTES, n_layers: int = 1) -> tuple[int, int]:
    """(tokens per inner chunk, tokens per shard) for ~1 MiB chunks and ~shard_mb shards.

    `row_bytes` is one token row of one layer. A chunk holds one layer (a reader of one layer reads
    only its chunks); a shard holds all `n_layers`, so it spans 1 / n_layers as many tokens. A shard
    smaller than a chunk makes the chunk the whole shard (tests use tiny shards to get many commits
    from little data).
    """
    shard_bytes = shard_mb * (1 << 20) / n_layers
    chunk = max(1, int(min(chunk_bytes, shard_bytes) // row_bytes))
    per_shard = max(1, round(shard_bytes / (chunk * row_bytes)))
    return chunk, chunk * per_shard


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- opening ------------------------------------------------------------------------------------

_io_errors = io_errors


_METADATA_KEYS = tuple(
    f"{name}/zarr.json" for name in (*CHECKED_ARRAYS, "layer", COMMITS_GROUP, f"{COMMITS_GROUP}/ranges", f"{COMMITS_GROUP}/crc",
                                                  f"{COMMITS_GROUP}/{SHARD_CRC}")
)


async def _check_metadata(store: Store, where: str) -> None:
    """Parse every metadata document first, so a damaged one is named instead of failing deep in zarr."""
    from zarr.core.buffer import default_buffer_prototype

    for key in ("zarr.json", *_METADATA_KEYS):
        buf = await store.get(key, prototype=default_buffer_prototype())
        if buf is None:
            continue
        try:
            json.loads(buf.to_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"store {where!r}: {key} is not valid JSON ({e}); the store's metadata is damaged") from None


def open_root(location: Location, mode: str) -> tuple[Store, zarr.Group]:
    """The store's root group, checked to be an embedcache store. mode: "r" or "r+"."""
    read_only = mode == "r"
    store = open_location(location, read_only=read_only)
    try:
        if not sync(store.exists("zarr.json")):
            raise StoreError(f"no embedcache store at {location.url!r} ({why_absent(location, store)})")
        check_local_files(location)  # symlinks and FIFOs, before zarr opens anything
        sync(_check_metadata(store, location.url))
        root = zarr.open_group(store=store, mode=mode, zarr_format=3, use_consolidated=False)  # see `consolidate`
    except StoreError:
        raise
    except _io_errors() as e:
        raise StoreError(describe_io_error(location, e)) from e
    meta = root.attrs.get("embedcache")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{location.url!r} is a Zarr group but not an embedcache store (no embedcache attrs)")
    version = meta.get("schema_version")
    if version not in (1, SCHEMA_VERSION):
        raise StoreError(
            f"store {location.url!r} has schema_version {version!r}; this embedcache reads versions 1 and "
            f"{SCHEMA_VERSION}: upgrade embedcache or rebuild the store"
        )
    return store, root


def store_state(location: Location) -> str:
    """"created" (a store with a commit head), "partial" (our store, killed while being created),
    "absent" (nothing, or only a writer lease), or "foreign" (other data: never touched)."""
    store = open_location(location, read_only=False)
    try:
        keys = [k for k in sync(_list_all(store)) if k != LEASE_KEY and not k.startswith(f"{SPOOL_PREFIX}/")]
        if not keys:
            return "absent"
        if "zarr.json" not in keys:
            return "foreign"
        root = zarr.open_group(store=store, mode="r", zarr_format=3, use_consolidated=False)
        meta = root.attrs.get("embedcache")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return "foreign"
        if f"{COMMITS_GROUP}/zarr.json" in keys and "head" in root[COMMITS_GROUP].attrs:
            return "created"
        if meta.get("schema_version") == 1 and f"{LEGACY_BUILD_GROUP}/zarr.json" in keys:
            return "created"
        return "partial"
    except json.JSONDecodeError as e:
        raise StoreError(f"store {location.url!r}: zarr.json is not valid JSON ({e}); the store's metadata is damaged") from e
    except _io_errors() as e:
        raise StoreError(describe_io_error(location, e)) from e


async def _clear_except_lease(store: Store) -> None:
    """Remove a half-created store's objects; the build's own lease and spool stay."""
    for key in [k async for k in store.list_prefix("")]:
        if key != LEASE_KEY and not key.startswith(f"{SPOOL_PREFIX}/"):
            await store.delete(key)


# -- consolidated metadata: for xarray, never for embedcache ------------------------------------

async def _root_document(store: Store) -> dict:
    from zarr.core.buffer import default_buffer_prototype

    buf = await store.get("zarr.json", prototype=default_buffer_prototype())
    return json.loads(buf.to_bytes()) if buf is not None else {}


def consolidate(location: Location) -> None:
    """Write Zarr v3 consolidated metadata (every array's metadata, in the root zarr.json).

    `xarray.open_zarr` looks for it first and warns on every open of a store without it. It is a
    snapshot for other readers only: embedcache opens groups with use_consolidated=False and the
    commit log decides what counts, so a stale snapshot cannot make embedcache read wrong rows.
    A build writes it when it completes; a writer drops it first (`drop_consolidated`).
    """
    store = open_location(location, read_only=False)
    with warnings.catch_warnings():
        # zarr says the format is not in the v3 spec yet, and names the lease object it skips: both known.
        warnings.simplefilter("ignore", ZarrUserWarning)
        try:
            sync(consolidate_metadata(store, zarr_format=3))
        except _io_errors() as e:
            raise StoreError(
                f"store {location.url!r}: the build is complete, but writing its consolidated metadata (for xarray) failed: "
                f"{describe_io_error(location, e)}; run the same command again to write it"
            ) from e


def drop_consolidated(store: Store, where: str) -> None:
    """Remove the consolidated snapshot before the arrays change. zarr opens a group through it by
    default, so a process opening the store for writing (a build's workers) would otherwise see
    the arrays' old shapes. One write of the root zarr.json, atomic on disk and on object stores."""
    from zarr.core.buffer import default_buffer_prototype

    try:
        doc = sync(_root_document(store))
        if doc.pop("consolidated_metadata", None) is None:
            return
        sync(store.set("zarr.json", default_buffer_prototype().buffer.from_bytes(json.dumps(doc, indent=2).encode())))
    except _io_errors() as e:
        raise StoreError(f"store {where!r}: cannot rewrite its zarr.json: {type(e).__name__}: {e}") from e


# -- creating -----------------------------------------------------------------------------------

def _array(group: zarr.Group, name: str, dims: tuple[str, ...], dtype, shape_tail: tuple[int, ...] = (), chunks=None,
           codecs=_NUMBER_CODECS, **kw) -> zarr.Array:
    chunks = chunks or (RECORD_CHUNK, *shape_tail)
    return group.create_array(name, shape=(0, *shape_tail), chunks=chunks, dtype=dtype, dimension_names=dims,
                              compressors=codecs, config=_WRITE_CONFIG, **kw)


def create_store(
    location: Location | str | Path,
    *,
    attrs: dict,
    embed_dim: int,
    layers: tuple[int, ...] = (0,),
    pooled: bool,
    tokens: bool,
    token_dtype: str,
    shard_mb: float,
    chunk_bytes: int = CHUNK_BYTES,
    token_codec: str = "none",
) -> None:
    """Create an empty store: every array at length 0, an empty commit log, and, LAST, the head.

    Until the head exists the store does not count as created, so a build killed while creating
    leaves a location that the next build simply creates again.
    """
    location = as_location(location)
    store = open_location(location, read_only=False)
    try:
        sync(_clear_except_lease(store))  # only ever called on an absent or partial store (see store_state)
        root = zarr.create_group(store=store, zarr_format=3, attributes={"embedcache": attrs})
        k = len(layers)
        _array(root, "sequence", ("sequence",), str, codecs=_TEXT_CODECS)
        _array(root, "content_index", ("sequence",), "int64")
        _array(root, "content", ("content",), str, codecs=_TEXT_CODECS)
        _array(root, "residues", ("content",), str, chunks=(RESIDUE_CHUNK,), codecs=_TEXT_CODECS)
        for name in ("n_input_tokens", "n_cropped"):
            _array(root, name, ("content",), "int64")
        _array(root, "n_windows", ("content",), "int32")
        layer = root.create_array("layer", shape=(k,), dtype="int64", dimension_names=("layer",), compressors=_NUMBER_CODECS)
        layer[:] = np.asarray(layers, np.int64)
        if pooled:
            _array(root, "pooled", ("content", "layer", "feature"), "float32", (k, embed_dim), chunks=(1024, 1, embed_dim))
        if tokens:
            for name in TOKEN_INDEX_ARRAYS:
                _array(root, name, ("content",), "int64")
            chunk, shard = token_chunking(embed_dim * np.dtype(token_dtype).itemsize, shard_mb, chunk_bytes, n_layers=k)
            root.create_array(
                "tokens", shape=(0, k, embed_dim), chunks=(chunk, 1, embed_dim), shards=(shard, k, embed_dim),
                dtype=token_dtype, dimension_names=("token", "layer", "feature"), compressors=TOKEN_CODECS[token_codec],
                config=_WRITE_CONFIG,
            )
        create_log(root)
        write_head(root, Head())
    except _io_errors() as e:
        raise StoreError(describe_io_error(location, e)) from e


def check_fingerprint(where: str, store_attrs: dict, expected: str, expected_fields: dict) -> None:
    """Refuse a store built with other settings, naming both fingerprints and the fields that differ."""
    actual = store_attrs.get("fingerprint")
    if actual == expected:
        return
    stored = store_attrs.get("fingerprint_fields", {})
    diffs = [
        f"{k}: store has {stored.get(k)!r}, this build has {expected_fields.get(k)!r}"
        for k in sorted(set(stored) | set(expected_fields))
        if stored.get(k) != expected_fields.get(k)
    ]
    raise FingerprintMismatch(
        f"store {where!r} has fingerprint {actual} but this build has fingerprint {expected}; "
        f"differences: {'; '.join(diffs) or 'none listed'}. Build into a new store, or use the store's settings."
    )


# -- the index every reader and writer validates ------------------------------------------------

@dataclass
class StoreIndex:
    """The committed rows of a store, validated against each other and against the arrays."""

    log: CommitLog
    ids: list[str]
    content_index: np.ndarray  # (records,) int64
    content_keys: np.ndarray  # (content_end,) object: "" where no commit wrote
    committed_content: np.ndarray  # (content_end,) bool
    offsets: np.ndarray | None  # (content_end,) int64
    lengths: np.ndarray | None
    shards: TokenShards | None = None  # None: no tokens, or a store written before shard digests

    @property
    def committed(self) -> Committed:
        return Committed(self.log.head.records, self.log.content_end, self.log.token_end)


ROOT_ARRAYS = (*CHECKED_ARRAYS, "layer")  # every array a store's root may hold


def root_arrays(root: zarr.Group, names: Iterable[str] = ROOT_ARRAYS) -> dict[str, zarr.Array]:
    """Those of `names` that the root holds, their metadata read concurrently. Each `name in root` or
    `root[name]` reads that array's zarr.json: on an object store a request of its own."""

    async def one(name: str):
        try:
            return name, await root._async_group.getitem(name)
        except KeyError:
            return name, None

    async def every() -> list:
        return await asyncio.gather(*(one(name) for name in names))

    return {name: zarr.Array(node) for name, node in sync(every()) if isinstance(node, AsyncArray)}


def _read_rows(arrays: dict[str, zarr.Array], name: str, end: int, where: str, start: int = 0) -> np.ndarray:
    arr = arrays[name]
    if arr.shape[0] < end:
        raise StoreError(f"store {where!r}: array {name!r} has {arr.shape[0]} rows, the commit log counts {end}")
    try:
        return arr[start:end] if end > start else np.zeros(0, arr.dtype if arr.dtype.kind != "T" else object)
    except _io_errors() + (ValueError, RuntimeError) as e:  # codec / checksum failure while decoding
        raise StoreError(f"store {where!r}: array {name!r} rows {start}..{end} cannot be read: {e}; run embedcache verify") from e


def read_index(root: zarr.Group, where: str, attrs: dict, arrays: dict[str, zarr.Array] | None = None) -> StoreIndex:
    """Read and cross-check the commit log and the index arrays. Sizes are checked before reading.
    `arrays`: `root_arrays(root)`, where the caller has them already."""
    log = read_log(root, where)
    arrays = root_arrays(root) if arrays is None else arrays
    config = attrs.get("config", {})
    required = [*RECORD_ARRAYS, *CONTENT_ARRAYS, "layer"]
    required += ["pooled"] if config.get("pooling", "mean") != "none" else []
    required += [*TOKEN_INDEX_ARRAYS, "tokens"] if config.get("tokens", True) else []
    missing = [name for name in required if name not in arrays]
    if missing:
        raise StoreError(f"store {where!r}: array(s) {missing} are missing, but its config says they were built; the store is damaged")
    embed_dim = attrs.get("embed_dim")
    if not isinstance(embed_dim, int) or not 0 < embed_dim <= MAX_EMBED_DIM:
        raise StoreError(f"store {where!r}: embed_dim {embed_dim!r} is not a width in 1..{MAX_EMBED_DIM}")
    for name in ("pooled", "tokens"):
        if name in arrays and arrays[name].shape[-1] != embed_dim:
            raise StoreError(f"store {where!r}: array {name!r} is {arrays[name].shape[-1]} wide, attrs say embed_dim {embed_dim}")
    c_end, t_end, r_end = log.content_end, log.token_end, log.head.records
    if log.head.status == "complete":  # a completed build trims every array to what its log counts
        counted = {**dict.fromkeys(RECORD_ARRAYS, r_end), **dict.fromkeys((*CONTENT_ARRAYS, *TOKEN_INDEX_ARRAYS, "pooled"), c_end),
                   "tokens": t_end}
        for name, rows in counted.items():
            if name in arrays and arrays[name].shape[0] != rows:
                if read_log(root, where).head.status != "complete":
                    break  # a build began extending the store after its head was read here: it sizes the arrays first
                raise StoreError(
                    f"store {where!r}: array {name!r} has {arrays[name].shape[0]} rows, but the commit log of this complete "
                    f"store counts {rows}; its metadata was edited or damaged (run embedcache verify)"
                )
    for name in (*CONTENT_ARRAYS, *TOKEN_INDEX_ARRAYS, "pooled"):
        if name in arrays and arrays[name].shape[0] < c_end:
            raise StoreError(f"store {where!r}: array {name!r} has {arrays[name].shape[0]} rows, the commit log counts {c_end}")
    if "tokens" in arrays and arrays["tokens"].shape[0] < t_end:
        raise StoreError(f"store {where!r}: array 'tokens' has {arrays['tokens'].shape[0]} rows, the commit log counts {t_end}")
    # The index arrays are read whole here, so each commit's rows are checked against its crc32 too (a
    # crc32 over bytes already in memory): a swapped or overwritten row is refused even when its chunk's
    # crc32c holds.
    names = _read_rows(arrays, "sequence", r_end, where)
    log.check_rows("sequence", names, where)
    ids = names.tolist()
    content_index = _read_rows(arrays, "content_index", r_end, where)
    log.check_rows("content_index", content_index, where)
    content_index = content_index.astype(np.int64)
    keys = _read_rows(arrays, "content", c_end, where)
    log.check_rows("content", keys, where)
    committed = log.committed_content(c_end)
    if len(content_index) and (content_index.min() < 0 or content_index.max() >= c_end or not committed[content_index].all()):
        bad = int(np.flatnonzero((content_index < 0) | (content_index >= c_end))[0]) if (
            (content_index < 0) | (content_index >= c_end)).any() else int(np.flatnonzero(~committed[content_index])[0])
        raise StoreError(f"store {where!r}: record {ids[bad]!r} points to content row {int(content_index[bad])}, which no commit wrote")
    offsets = lengths = None
    if "tokens" in arrays:
        offsets = _read_rows(arrays, "token_offset", c_end, where)
        lengths = _read_rows(arrays, "token_length", c_end, where)
        log.check_rows("token_offset", offsets, where)
        log.check_rows("token_length", lengths, where)
        offsets, lengths = offsets.astype(np.int64), lengths.astype(np.int64)
        for i, (_, _, c0, c1, t0, t1) in enumerate(log.ranges.tolist()):
            o, n = offsets[c0:c1], lengths[c0:c1]
            if len(o) and ((o < t0).any() or (o + n > t1).any() or (n < 0).any()):
                raise StoreError(
                    f"store {where!r}: a sequence of commit {i} points outside that commit's token rows {t0}..{t1}; "
                    f"the index was edited or damaged (run embedcache verify)"
                )
    shards = token_shards(log, shard_rows(arrays["tokens"]), where) if "tokens" in arrays else None
    return StoreIndex(log, ids, content_index, keys, committed, offsets, lengths, shards)


def shard_rows(tokens: zarr.Array) -> int:
    """Token rows per stored object of `tokens`: its shard (or, unsharded, its chunk)."""
    return (tokens.shards or tokens.chunks)[0]


def _chunk_keys(arr: zarr.Array, lo: int, hi: int) -> Iterator[tuple[str, tuple[int, int]]]:
    """(store key, (first row, end row)) of every stored object (chunk or shard) holding rows lo..hi."""
    outer = arr.metadata.chunk_grid.chunk_shape  # the shard shape for sharded arrays
    rest = [range(math.ceil(s / c)) for s, c in zip(arr.shape[1:], outer[1:])]
    for i in range(lo // outer[0], math.ceil(hi / outer[0])):
        for tail in np.ndindex(*[len(r) for r in rest]) if rest else [()]:
            key = f"{arr.path}/{arr.metadata.encode_chunk_key((i, *tail))}"
            yield key, (i * outer[0], min((i + 1) * outer[0], arr.shape[0]))


def missing_objects(store: Store, root: zarr.Group, index: StoreIndex, arrays: dict[str, zarr.Array] | None = None) -> list[str]:
    """Every chunk or shard that committed rows live in but the store lacks: each one a fault. `arrays`: as
    in `read_index`."""
    log = index.log
    arrays = root_arrays(root) if arrays is None else arrays
    needed: dict[str, list[tuple[int, int]]] = {}
    if log.head.records:
        needed.update({name: [(0, log.head.records)] for name in RECORD_ARRAYS})
    content_spans = [(c0, c1) for _, _, c0, c1, _, _ in log.ranges.tolist() if c1 > c0]
    token_spans = [(t0, t1) for *_, t0, t1 in log.ranges.tolist() if t1 > t0]
    for name in (*CONTENT_ARRAYS, "pooled", *TOKEN_INDEX_ARRAYS):
        if name in arrays and content_spans:
            needed[name] = content_spans
    if "tokens" in arrays and token_spans:
        needed["tokens"] = token_spans
    # Only the checked arrays are listed: the rest of the store may change meanwhile (a finishing build removes
    # its spool directory, which a listing of everything could be walking: FileNotFoundError).
    present = set(sync(_list_prefixes(store, [f"{name}/" for name in needed])))
    faults = []
    for name, spans in needed.items():
        arr = arrays[name]
        seen = set()
        for lo, hi in spans:
            for key, (r0, r1) in _chunk_keys(arr, lo, hi):
                if key not in present and key not in seen:
                    seen.add(key)
                    faults.append(f"array {name!r}: chunk {key!r} (rows {r0}..{r1}) is missing, but committed rows live there")
    return faults


async def _list_all(store: Store) -> list[str]:
    return [k async for k in store.list_prefix("")]


async def _list_prefixes(store: Store, prefixes: list[str]) -> list[str]:
    async def one(prefix: str) -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    listed = await asyncio.gather(*(one(p) for p in prefixes))
    return [k for keys in listed for k in keys]


async def _delete_chunks_from(store: Store, arr, rows: int) -> None:
    """Delete the stored chunk objects (shards) of `arr` that lie wholly at or past row `rows`."""
    outer = arr.metadata.chunk_grid.chunk_shape[0]
    first_outside = -(-rows // outer)
    prefix = f"{arr.path}/c/"  # the default v3 chunk key encoding: <array>/c/<i>/<j>/...
    stale = []
    async for key in store.list_prefix(prefix):
        row_chunk = key[len(prefix):].split("/")[0]
        if row_chunk.isdigit() and int(row_chunk) >= first_outside:
            stale.append(key)
    await asyncio.gather(*(store.delete(k) for k in stale))


# -- writing ------------------------------------------------------------------------------------

class StoreWriter:
    """Appends commits to a store. Hold the store's `WriterLease` while using one."""

    def __init__(self, store: Store, root: zarr.Group, where: str):
        self.store, self.root, self.where = store, root, where
        self.attrs = dict(root.attrs["embedcache"])
        if self.attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"store {where!r} has schema_version {self.attrs.get('schema_version')}, made by an older embedcache: "
                f"it can be read but not extended; build into a new store"
            )
        arrays = root_arrays(root)
        self.index = read_index(root, where, self.attrs, arrays)
        faults = missing_objects(store, root, self.index, arrays)
        if faults:
            raise StoreError(f"store {where!r} is damaged, refusing to extend it: {faults[0]}" + (f" (and {len(faults) - 1} more)" if len(faults) > 1 else "") + "; run embedcache verify")
        self.head = self.index.log.head
        self.has_tokens = "tokens" in arrays
        self.has_pooled = "pooled" in arrays
        self.n_layers = arrays["layer"].shape[0]
        self.shard_tokens = shard_rows(arrays["tokens"]) if self.has_tokens else 0
        if self.has_tokens and self.index.shards is None:
            self._add_shard_digests()  # reads every kept token row once: checks them all
        elif self.has_tokens:
            self._check_changed_shards()
        self._arrays = {n: arrays[n]._async_array.with_config(_WRITE_CONFIG) for n in CHECKED_ARRAYS if n in arrays}
        self._pending: list[tuple[str, int, np.ndarray]] = []
        self.keys: dict[str, int] = {str(k): i for i, k in enumerate(self.index.content_keys.tolist()) if self.index.committed_content[i]}
        c = self.index.committed
        self.content_end, self.token_end = c.content, c.tokens
        drop_consolidated(store, where)  # stale from here on; the build writes a new one when it completes
        self._trim()

    @property
    def committed(self) -> Committed:
        return Committed(self.head.records, self.content_end, self.token_end)

    def _trim(self) -> None:
        """Cut arrays back to the committed sizes: leftovers of a killed build are never read or kept."""
        trim_log(self.root, self.head)
        self._resize_all(records=self.head.records, contents=self.content_end, tokens=self.token_end, grow_only=False)

    def _add_shard_digests(self) -> None:
        """A store written before shard digests gets them: each commit's token rows are read once, and
        must end at the crc32 they were committed with (so this also verifies them)."""
        group = self.root[COMMITS_GROUP]
        if SHARD_CRC not in group:
            create_shard_log(group)
        log, column = self.index.log, CHECKED_ARRAYS.index("tokens")
        shards = []
        for i, (t0, t1) in enumerate(log.spans("tokens")):
            if t1 > t0:
                digests = shard_digests(_read_rows({"tokens": self.root["tokens"]}, "tokens", t1, self.where, start=t0), t0, self.shard_tokens)
                if int(digests[-1]) != int(log.crc[i, column]):
                    raise StoreError(f"store {self.where!r}: token rows {t0}..{t1} (commit {i}) do not match the checksum they "
                                     f"were committed with: the data was changed after the build (run embedcache verify)")
                shards.append((t0 // self.shard_tokens, digests))
        write_shard_digests(self.root, shards)
        self.index = read_index(self.root, self.where, self.attrs)

    def _check_changed_shards(self) -> None:
        """Read and check each kept token shard whose object changed since the last completed build saw
        it (embedcache.shard_stamps): a damaged one stops the build before anything is written."""
        shards = self.index.shards
        now = current_stamps(self.store, self.root["tokens"], len(shards.lo))
        if now is None:  # a store that reports no stamps (memory://): nothing to compare
            return
        changed = np.flatnonzero((now != recorded_stamps(self.root, len(shards.lo))) & (shards.hi > shards.lo))
        tokens = self.root["tokens"]
        for s in changed.tolist():
            lo, hi = int(shards.lo[s]), int(shards.hi[s])
            try:
                fault = shards.fault(s, tokens[lo:hi], self.where)
            except _io_errors() + (ValueError, RuntimeError) as e:  # a chunk's crc32c fails: bytes changed
                fault = (f"store {self.where!r}: token shard {s} (rows {lo}..{hi}, commit {int(shards.commit[s])}) changed since "
                         f"the last build and cannot be read ({e})")
            if fault:
                raise StoreError(f"{fault}; refusing to extend the store (run embedcache verify)")

    async def _resize(self, name: str, rows: int) -> None:
        arr = self._arrays[name]
        before = arr.shape[0]
        # zarr's resize deletes every chunk position past the new end, present or not: for a shape edited
        # to 10^12 rows that list alone exhausts memory. Delete the objects that exist instead.
        await arr.resize((rows, *arr.shape[1:]), delete_outside_chunks=False)  # (zarr updates arr's metadata in place)
        if rows < before:
            await _delete_chunks_from(self.store, arr, rows)

    def reserve(self, *, records: int, contents: int, tokens: int = 0) -> None:
        """Grow the arrays to at least these rows before a build commits into them (array metadata is the
        client's): one round of metadata writes, rather than commits growing them on the way and completion
        trimming them back. Rows past the log are never read; `set_status("complete")` trims whatever was
        reserved but not committed."""
        self._resize_all(records=records, contents=contents, tokens=tokens, grow_only=True)

    def _resize_all(self, *, records: int, contents: int, tokens: int, grow_only: bool) -> None:
        """Every array of the store to its rows (record, content or token rows), concurrently: on an object
        store each resize is a request. `grow_only`: leave longer arrays as they are."""
        rows = {name: records for name in RECORD_ARRAYS}
        rows.update({name: contents for name in (*CONTENT_ARRAYS, *TOKEN_INDEX_ARRAYS, "pooled") if name in self._arrays})
        if self.has_tokens:
            rows["tokens"] = tokens
        now = {name: self._arrays[name].shape[0] for name in rows}
        wanted = [(name, n) for name, n in rows.items() if now[name] < n or (now[name] > n and not grow_only)]
        if not wanted:
            return

        async def resize_all() -> None:
            await asyncio.gather(*(self._resize(name, n) for name, n in wanted))

        sync(resize_all())

    def set_status(self, status: str, build_entry: dict | None = None) -> None:
        if status == "complete":
            # Drop the rows grown ahead of the log, so xarray sees exactly the committed arrays (the log's own
            # rows past the head, in _commits, are no array of xarray's, never count, and are trimmed on open).
            self._resize_all(records=self.head.records, contents=self.content_end, tokens=self.token_end, grow_only=False)
            if self.has_tokens:  # what the next build compares its listing with
                stamps = current_stamps(self.store, self.root["tokens"], -(-self.token_end // self.shard_tokens))
                if stamps is not None:
                    record_stamps(self.root, stamps)
        builds = [*self.head.builds, build_entry] if build_entry else self.head.builds
        self.head = self.head.with_status(status, builds)
        write_head(self.root, self.head)

    def _write(self, name: str, start: int, values: np.ndarray) -> None:
        self._pending.append((name, start, values))

    async def _write_one(self, name: str, start: int, values: np.ndarray) -> None:
        arr = self._arrays[name]
        end = start + len(values)
        if arr.shape[0] < end:
            # Past what `reserve` sized (a writer used without a plan): grow geometrically, in whole chunks,
            # so most commits write no array metadata. Rows past the log are never read; `set_status` trims them.
            step = arr.metadata.chunk_grid.chunk_shape[0]
            grown = max(end, math.ceil(arr.shape[0] * 1.5 / step) * step)
            await arr.resize((grown, *arr.shape[1:]))
            arr = (await self.root._async_group.getitem(name)).with_config(_WRITE_CONFIG)  # metadata as resized
            self._arrays[name] = arr
        await arr.setitem(slice(start, end), values)

    def _flush_writes(self) -> None:
        """Write the commit's arrays concurrently: on object stores each write is a round trip."""
        pending, self._pending = self._pending, []

        async def write_all() -> None:
            await asyncio.gather(*(self._write_one(*w) for w in pending))

        sync(write_all())

    def commit(self, contents: list[ContentResult], records: list[tuple[str, str]]) -> None:
        """Write new content rows and the records (id, content key) that use them, then commit.

        A record's key is either among `contents` or already in the store. Token rows start on a
        shard boundary, so one commit writes whole shards that no other commit touches.
        """
        t0 = t1 = self.token_end
        columns: dict[str, np.ndarray] = {}
        shards: list[tuple[int, np.ndarray]] = []
        if self.has_tokens and contents:
            t0 = math.ceil(self.token_end / self.shard_tokens) * self.shard_tokens
            lengths = np.array([len(r.tokens) for r in contents], np.int64)
            block = np.concatenate([_with_layer_axis(r.tokens, 3) for r in contents])  # (sum L, k, d)
            t1 = t0 + len(block)
            self._write("tokens", t0, block)
            shards.append((t0 // self.shard_tokens, shard_digests(block, t0, self.shard_tokens)))
            columns.update(token_offset=t0 + np.concatenate([[0], np.cumsum(lengths)[:-1]]), token_length=lengths)
        if contents:
            columns.update(_content_columns([r.key for r in contents], [r.residues for r in contents],
                                            [r.n_input_tokens for r in contents], [r.n_cropped for r in contents],
                                            [r.n_windows for r in contents]))  # fmt: skip
            if self.has_pooled:
                columns["pooled"] = np.stack([_with_layer_axis(r.pooled, 2) for r in contents]).astype(np.float32)
        c0 = self.content_end
        new_keys = {r.key: c0 + i for i, r in enumerate(contents)}
        index = [new_keys[k] if k in new_keys else self.keys[k] for _, k in records]
        self._commit(columns, (t0, t1), shards, [i for i, _ in records], index)

    def commit_unit(self, result) -> None:
        """Commit a unit a worker embedded: its token rows are already written (embedcache.partition)."""
        self.commit_units([result])

    def commit_units(self, results: list, records: tuple[list[str], list[str]] | None = None) -> None:
        """Commit units that finished together in one write of each array, one log row per unit and one
        head: the client's cost per commit, not per unit, so many workers do not queue behind it.
        `records`: (ids, content keys) of records to commit after the units in the same write (a build's
        last units and its first records: one write and one head fewer after the model's last batch)."""
        try:
            self._commit_units(results, records)
        except _io_errors() as e:
            raise StoreError(
                f"writing to store {self.where!r} failed: {type(e).__name__}: {e}; everything committed before it is "
                f"kept: run the same command again to resume"
            ) from e

    def _commit_units(self, results: list, records: tuple[list[str], list[str]] | None) -> None:
        c0 = self.content_end
        parts = []
        for result in results:
            columns = _content_columns(result.keys, result.residues, result.n_input_tokens, result.n_cropped, result.n_windows)
            if self.has_tokens:
                columns.update(token_offset=result.token_offset, token_length=result.token_length)
            if self.has_pooled:
                columns["pooled"] = result.pooled
            parts.append(columns)
        rows, crcs, start = [], [], c0
        shards: list[tuple[int, np.ndarray]] = []
        r = self.head.records
        for result, columns in zip(results, parts):
            n = len(columns["content"])
            crc = {"tokens": result.token_crc, **{name: crc_of(values) for name, values in columns.items()}}
            if result.token_end > result.token_start:
                shards.append((result.token_start // self.shard_tokens, result.shard_crc))
            rows.append((r, r, start, start + n, result.token_start, result.token_end))
            crcs.append([crc.get(name, 0) for name in CHECKED_ARRAYS])
            start += n
        for name in parts[0]:
            self._write(name, c0, np.concatenate([p[name] for p in parts]))
        added = {str(k): c0 + i for i, k in enumerate(np.concatenate([p["content"] for p in parts]).tolist())}
        token_end = max([self.token_end, *(res.token_end for res in results)])
        if records is not None:
            ids, keys = records
            crc = self._write_records(r, ids, [added[k] if k in added else self.keys[k] for k in keys])
            rows.append((r, r + len(ids), start, start, token_end, token_end))
            crcs.append([crc.get(name, 0) for name in CHECKED_ARRAYS])
        self._flush_writes()
        self.head = append_commits(self.root, self.head, rows, crcs, shards)
        self.content_end = start
        self.token_end = token_end
        self.keys.update(added)

    def commit_records(self, ids: list[str], content_rows: list[int]) -> None:
        """Commit records whose sequences the store already holds."""
        self._commit({}, (self.token_end, self.token_end), [], ids, content_rows)

    def _commit(self, columns: dict[str, np.ndarray], token_range: tuple[int, int], shards: list[tuple[int, np.ndarray]],
                ids: list[str], content_rows: list[int]) -> None:
        try:
            self._commit_rows(columns, token_range, shards, ids, content_rows)
        except _io_errors() as e:  # disk full, permission, an unreachable bucket: nothing of this commit counts
            raise StoreError(
                f"writing to store {self.where!r} failed: {type(e).__name__}: {e}; everything committed before it is "
                f"kept: run the same command again to resume"
            ) from e

    def _commit_rows(self, columns: dict[str, np.ndarray], token_range: tuple[int, int], shards: list[tuple[int, np.ndarray]],
                     ids: list[str], content_rows: list[int]) -> None:
        c0 = self.content_end
        n_new = len(columns["content"]) if "content" in columns else 0
        crc = {"tokens": int(shards[-1][1][-1]) if shards else 0}
        for name, values in columns.items():
            self._write(name, c0, values)
            crc[name] = crc_of(values)
        r0 = self.head.records
        if ids:
            crc.update(self._write_records(r0, ids, content_rows))
        self._flush_writes()
        t0, t1 = token_range
        row = (r0, r0 + len(ids), c0, c0 + n_new, t0, t1)
        self.head = append_commit(self.root, self.head, row, [crc.get(name, 0) for name in CHECKED_ARRAYS], shards)
        self.content_end, self.token_end = c0 + n_new, max(self.token_end, t1)
        if n_new:
            self.keys.update({str(k): c0 + i for i, k in enumerate(columns["content"].tolist())})

    def _write_records(self, r0: int, ids: list[str], content_rows: list[int]) -> dict[str, int]:
        """Queue record rows from r0 (ids and the content row each uses); their crc32s."""
        names, index = np.array(ids, dtype=object), np.asarray(content_rows, np.int64)
        self._write("sequence", r0, names)
        self._write("content_index", r0, index)
        return {"sequence": crc_of(names), "content_index": crc_of(index)}


def _content_columns(keys, residues, n_input_tokens, n_cropped, n_windows) -> dict[str, np.ndarray]:
    return {
        "content": np.array(keys, dtype=object),
        "residues": np.array(residues, dtype=object),
        "n_input_tokens": np.asarray(n_input_tokens, np.int64),
        "n_cropped": np.asarray(n_cropped, np.int64),
        "n_windows": np.asarray(n_windows, np.int32),
    }


def _with_layer_axis(x: np.ndarray, ndim: int) -> np.ndarray:
    """A single layer's (L, d) tokens or (d,) pooled vector gets its (size-1) layer axis."""
    return x if x.ndim == ndim else x[..., None, :]


def as_location(location: Location | str | Path) -> Location:
    return location if isinstance(location, Location) else Location.of(location)


def open_writer(location: Location | str | Path) -> StoreWriter:
    location = as_location(location)
    store, root = open_root(location, mode="r+")
    return StoreWriter(store, root, location.url)


def read_store_attrs(location: Location) -> dict:
    """The store's embedcache attrs (for fingerprint checks before planning)."""
    _, root = open_root(location, mode="r")
    return dict(root.attrs["embedcache"])
