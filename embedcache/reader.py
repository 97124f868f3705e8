"""Read access to a store: `embedcache.open_store(path_or_url)`. The only reader `fusion` uses.

Opening validates what can be checked cheaply before any data is trusted: the commit log against
the arrays, sizes against each other, and that every chunk holding committed rows exists (one
listing of the store). Reading then checks each chunk's crc32c as zarr decodes it.
The same store as a lazy xarray Dataset indexed by record id: `embedcache.open_dataset`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.sync import sync

from embedcache.commits import CommitLog, Head
from embedcache.errors import StoreError
from embedcache.location import Location
from embedcache.mapped_store import MappedLocalStore
from embedcache.store import (
    LEGACY_BUILD_GROUP,
    SCHEMA_VERSION,
    Committed,
    StoreIndex,
    _io_errors,
    missing_objects,
    open_root,
    read_index,
)


T = TypeVar("T")
SHARDS_AT_ONCE = 4  # token shards read together for their first check: ~4 x 32 MiB at the default --shard-mb


def run_reads(store: Store, reads: Coroutine[Any, Any, T]) -> T:
    """Run zarr reads of `store` to the end: in this thread, on an event loop of its own, when the
    store's reads are views of mapped files and no loop runs here; otherwise on zarr's loop (`sync`).

    zarr runs every synchronous call on its one event-loop thread, and decodes there: two threads
    making batches (fusion.data._prefetch) queued their reads on one core. A `MappedLocalStore`'s read
    waits on no I/O thread (the copy that touches a page not in memory reads it), so the whole read is
    CPU work the asking thread can do itself, each batch thread on its own core. bench_fusion_data.py's
    one-loader `stream` path, 200 genes, 4 alternating pairs on the 2-core VM: 1.44x cold, 1.37x warm,
    the same CPU per GB. Other stores stay on zarr's loop (fsspec's async filesystems, S3 and GCS,
    bind their sessions to it), as does a thread that runs a loop already (a Jupyter kernel's).
    """
    if isinstance(store, MappedLocalStore):
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop runs here: run one for these reads
            with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:  # a factory: the thread's current loop stays as it was
                return runner.run(reads)
    return sync(reads)


class EmbeddingStore:
    """A store opened for reading.

    >>> store = open_store("proteins.zarr")          # or "s3://bucket/proteins.zarr", storage_options={...}
    >>> store.ids[:3], store.embed_dim, store.layers
    >>> store.pooled(["P1", "P2"]).shape             # (2, d) float32
    >>> store.tokens("P1").shape                     # (L, d): real token positions only, special tokens stripped
    >>> open_store("esm.zarr", layer=6).tokens("P1") # a store built with --layer 6 -1 holds layers [6, L]: pick one

    """

    def __init__(self, location: str | Path | Location, storage_options: dict[str, Any] | None = None, layer: int | None = None):
        self.location = location if isinstance(location, Location) else Location.of(location, storage_options)
        self.path = self.location.url  # kept for messages and older callers
        self.store, self.root = open_root(self.location, mode="r")
        self.attrs: dict = dict(self.root.attrs["embedcache"])
        self.schema_version: int = self.attrs["schema_version"]
        try:
            self._index = read_index(self.root, self.path, self.attrs) if self.schema_version == SCHEMA_VERSION \
                else _read_legacy_index(self.root, self.path, self.attrs)
        except _io_errors() as e:
            raise StoreError(f"store {self.path!r}: cannot read its index: {e}") from e
        faults = missing_objects(self.store, self.root, self._index)
        if faults:
            raise StoreError(f"store {self.path!r} is damaged: {faults[0]}" + (f" (and {len(faults) - 1} more)" if len(faults) > 1 else "") + "; run embedcache verify")
        head = self._index.log.head
        self.status: str = head.status
        self.builds: list[dict] = head.builds
        self.committed: Committed = self._index.committed
        self.ids: list[str] = [str(i) for i in self._index.ids]
        self._row = {rid: i for i, rid in enumerate(self.ids)}
        self._content_index = self._index.content_index
        self.has_tokens = "tokens" in self.root
        self.has_pooled = "pooled" in self.root
        # Opened once: looking an array up in the group costs ~0.5 ms, as much as a small read.
        self._tokens = self.root["tokens"] if self.has_tokens else None
        self._offset = self._index.offsets
        self._length = self._index.lengths
        self.layers: list[int] = self.root["layer"][:].tolist() if "layer" in self.root else [self.attrs["provenance"].get("layer", -1)]
        # The layer reads return when they name none: the one asked for here, else the store's only layer.
        self.layer: int | None = self.layers[0] if len(self.layers) == 1 else None
        if layer is not None:
            self.layer = self.layers[self.layer_position(layer)]
        self._pooled_cache: np.ndarray | None = None
        self._shards_checked: set[int] = set()  # token shards whose digest this object has checked

    # -- provenance ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def n_commits(self) -> int:
        return self._index.log.head.n

    @property
    def log(self) -> CommitLog:
        return self._index.log

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._row

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({self.path!r}, encoder={self.attrs['config']['encoder']!r}, "
            f"records={len(self)}, dim={self.embed_dim}, layers={self.layers}, status={self.status!r})"
        )

    # -- data ---------------------------------------------------------------------------------
    def rows(self, ids: list[str]) -> np.ndarray:
        """Record rows of `ids`; unknown ids raise StoreError naming examples and the count."""
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise StoreError(f"{len(missing)} of {len(ids)} ids are not in store {self.path!r}, e.g. {missing[:5]}")
        return np.fromiter((self._row[i] for i in ids), np.int64, len(ids))

    def layer_position(self, layer: int | None) -> int:
        """Position of hidden-state `layer` on the store's layer axis; None = the store's selected layer.

        Negative indices count from the model's last hidden state (-1 = last), as `--layer` does.
        """
        if layer is None:
            if self.layer is None:
                raise StoreError(f"store {self.path!r} holds layers {self.layers}; choose one (open_store(..., layer=I) or layer=I)")
            layer = self.layer
        n_layers = self.attrs.get("provenance", {}).get("n_layers")
        if layer < 0 and isinstance(n_layers, int) and -(n_layers + 1) <= layer:
            layer %= n_layers + 1
        if layer not in self.layers:
            raise StoreError(f"store {self.path!r} holds layers {self.layers}, not layer {layer}")
        return self.layers.index(layer)

    def _read(self, name: str, selection) -> np.ndarray:
        try:
            return self.root[name][selection] if name != "tokens" else self._tokens[selection]
        except _io_errors() + (ValueError, RuntimeError) as e:  # checksum or codec failure while decoding
            raise StoreError(f"store {self.path!r}: array {name!r} at {selection} cannot be read: {e}; run embedcache verify") from e

    def check_token_rows(self, spans: Iterable[tuple[int, int]]) -> None:
        """Check each token shard holding rows of the (lo, hi) `spans` against its digest in the commit
        log, on its first read in this object: the shard's committed rows (every layer) are read whole
        once, SHARDS_AT_ONCE at a time, so a shard file swapped with another or replaced is refused
        even though each of its chunks' crc32c holds. Later reads of a checked shard cost nothing."""
        shards = self._index.shards
        if shards is None:  # no tokens, or a store written before shard digests (its next build adds them)
            return
        todo = sorted(shards.covering(spans) - self._shards_checked)
        array = self._tokens._async_array
        for i in range(0, len(todo), SHARDS_AT_ONCE):
            group = todo[i : i + SHARDS_AT_ONCE]

            async def read_group() -> list[np.ndarray]:
                return await asyncio.gather(*(array.getitem(slice(int(shards.lo[s]), int(shards.hi[s]))) for s in group))

            try:
                values = run_reads(self._tokens.store, read_group())
            except _io_errors() + (ValueError, RuntimeError) as e:  # checksum or codec failure while decoding
                rows = f"{int(shards.lo[group[0]])}..{int(shards.hi[group[-1]])}"
                raise StoreError(f"store {self.path!r}: array 'tokens' rows {rows} (token shards {group[0]}..{group[-1]}) cannot be "
                                 f"read: {e}; run embedcache verify") from e
            for s, v in zip(group, values):
                fault = shards.fault(s, v, self.path)
                if fault:
                    raise StoreError(f"{fault} (run embedcache verify)")
            self._shards_checked.update(group)

    def pooled(self, ids: list[str] | None = None, layer: int | None = None) -> np.ndarray:
        """(n, d) float32 pooled embeddings of `ids` (all records, in `self.ids` order, when None)."""
        return self.pooled_at(np.arange(len(self)) if ids is None else self.rows(ids), layer)

    def pooled_at(self, rows: np.ndarray, layer: int | None = None) -> np.ndarray:
        """(n, d) float32 pooled embeddings of the records at positions `rows` of `self.ids`."""
        if not self.has_pooled:
            raise StoreError(f"store {self.path!r} was built with --pooling none")
        pos = self.layer_position(layer)
        if self._pooled_cache is None:  # pooled arrays are small: load once, committed rows only
            if self.schema_version == 1:
                n = self.committed.records
                self._pooled_cache = self._read("pooled", slice(0, n))[:, None, :] if n else np.zeros((0, 1, self.embed_dim), np.float32)
            else:
                n = self.committed.content
                self._pooled_cache = self._read("pooled", slice(0, n)) if n else np.zeros((0, len(self.layers), self.embed_dim), np.float32)
                self.log.check_rows("pooled", self._pooled_cache, self.path)  # read whole: each commit's crc32 too
        at = rows if self.schema_version == 1 else self._content_index[rows]
        return self._pooled_cache[at, pos]

    def token_span(self, record_id: str) -> tuple[int, int]:
        """(offset, length) of the record's rows in the flat `tokens` array."""
        if not self.has_tokens:
            raise StoreError(f"store {self.path!r} was built with --no-tokens")
        c = self._content_index[self.rows([record_id])[0]]
        return int(self._offset[c]), int(self._length[c])

    def tokens(self, record_id: str, layer: int | None = None) -> np.ndarray:
        """(L, d) per-token embeddings of one record, in the stored dtype."""
        offset, length = self.token_span(record_id)
        self.check_token_rows([(offset, offset + length)])
        if self.schema_version == 1:
            return self._read("tokens", slice(offset, offset + length))
        return self._read("tokens", (slice(offset, offset + length), self.layer_position(layer)))

    def tokens_many(self, record_ids: list[str], layer: int | None = None) -> list[np.ndarray]:
        """(L_i, d) per-token rows of each record, in the stored dtype, read in ONE zarr call.

        The reads run concurrently on one event loop (`run_reads`; up to `zarr.config` async.concurrency
        at a time), each chunk checked against its crc32c as it is decoded; a repeated id is read once.
        """
        spans = {i: self.token_span(i) for i in dict.fromkeys(record_ids)}
        self.check_token_rows([(o, o + n) for o, n in spans.values()])
        pos = None if self.schema_version == 1 else self.layer_position(layer)
        array = self._tokens._async_array
        # A one-layer slice, not an integer: codec pipelines that cannot drop an axis (zarrs) then stay on their fast path.
        pick = (lambda o, n: slice(o, o + n)) if pos is None else (lambda o, n: (slice(o, o + n), slice(pos, pos + 1)))

        async def read_all() -> list[np.ndarray]:
            rows = await asyncio.gather(*(array.getitem(pick(o, n)) for o, n in spans.values()))
            return rows if pos is None else [r[:, 0] for r in rows]  # (L, 1, d) -> (L, d) views

        try:
            rows = dict(zip(spans, run_reads(self._tokens.store, read_all())))
        except _io_errors() + (ValueError, RuntimeError) as e:  # checksum or codec failure while decoding
            raise StoreError(f"store {self.path!r}: array 'tokens' rows of {len(spans)} records cannot be read: {e}; run embedcache verify") from e
        return [rows[i] for i in record_ids]

    def token_rows(self, lo: int, hi: int, layer: int | None = None) -> np.ndarray:
        """(hi - lo, d) rows lo..hi of the flat `tokens` array (`token_span` gives each record's), in one read:
        for passes over many records stored side by side (fusion.reduced reads a block of records so)."""
        self.check_token_rows([(lo, hi)])
        if self.schema_version == 1:
            return self._read("tokens", slice(lo, hi))
        return self._read("tokens", (slice(lo, hi), self.layer_position(layer)))

    def read_tokens_into(self, record_ids: list[str | None], out: np.ndarray, layer: int | None = None) -> None:
        """Write each record's (L_i, d) per-token rows straight into out[i, :L_i], in ONE zarr call.

        `out` is (len(record_ids), >= max L_i, d) in the stored dtype (a padded batch); a None id leaves
        its row untouched and a repeated id is read once. zarr decodes each chunk straight into `out`
        (no array per record to copy afterwards); every chunk's crc32c is checked as in `tokens_many`.
        """
        pos = None if self.schema_version == 1 else self.layer_position(layer)
        array = self._tokens._async_array
        first: dict[str, int] = {}
        for i, rid in enumerate(record_ids):
            if rid is not None and rid not in first:
                first[rid] = i
        spans = {rid: self.token_span(rid) for rid in first}
        self.check_token_rows([(o, o + n) for o, n in spans.values()])
        reads = []
        for rid, i in first.items():
            o, n = spans[rid]
            if pos is None:
                reads.append(array.get_orthogonal_selection(slice(o, o + n), out=NDBuffer.from_numpy_array(out[i, :n])))
            else:  # a one-layer slice keeps the layer axis (size 1): out's row viewed with it
                view = out[i, :n, None, :]  # (n, 1, d) view of out[i, :n]
                reads.append(array.get_orthogonal_selection((slice(o, o + n), slice(pos, pos + 1)), out=NDBuffer.from_numpy_array(view)))

        async def read_all() -> None:
            await asyncio.gather(*reads)

        try:
            run_reads(self._tokens.store, read_all())
        except _io_errors() + (ValueError, RuntimeError) as e:  # checksum or codec failure while decoding
            raise StoreError(f"store {self.path!r}: array 'tokens' rows of {len(first)} records cannot be read: {e}; run embedcache verify") from e
        for i, rid in enumerate(record_ids):
            if rid is not None and first[rid] != i:
                n = self.token_span(rid)[1]
                out[i, :n] = out[first[rid], :n]

    def token_arrays(self, layer: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All per-token data at once: (flat (T, d), offset per record into flat, length per record).

        Reads each commit's token rows in one go and skips the unused rows between commits (each
        commit starts on a shard boundary); for data that fits in memory.
        """
        if not self.has_tokens:
            raise StoreError(f"store {self.path!r} was built with --no-tokens")
        pos = None if self.schema_version == 1 else self.layer_position(layer)
        spans = sorted({(t0, t1) for *_, t0, t1 in self._index.log.ranges.tolist() if t1 > t0})
        if not spans:
            return np.zeros((0, self.embed_dim), self.attrs["stored_dtype"]["tokens"]), np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.check_token_rows(spans)
        pick = (lambda t0, t1: slice(t0, t1)) if pos is None else (lambda t0, t1: (slice(t0, t1), pos))
        flat = np.concatenate([self._read("tokens", pick(t0, t1)) for t0, t1 in spans])  # (T_used, d)
        starts = np.array([t0 for t0, _ in spans])
        packed = np.cumsum([0] + [t1 - t0 for t0, t1 in spans[:-1]])  # where each span begins in `flat`
        offsets = self._offset[self._content_index]
        span = np.searchsorted(starts, offsets, side="right") - 1
        return flat, offsets - starts[span] + packed[span], self._length[self._content_index]

    def sequences(self, ids: list[str]) -> list[str]:
        """The residues of `ids` as embedded (upper-cased, before any crop)."""
        content = self._content_index[self.rows(ids)]
        if not len(content):
            return []
        lo, hi = int(content.min()), int(content.max()) + 1
        block = self._read("residues", slice(lo, hi))
        return [str(block[c - lo]) for c in content]

    def sequence(self, record_id: str) -> str:
        return self.sequences([record_id])[0]

    def record_info(self, record_id: str) -> dict:
        c = int(self._content_index[self.rows([record_id])[0]])
        info = {name: int(self._read(name, c)) for name in ("n_input_tokens", "n_cropped", "n_windows")}
        info["content_key"] = str(self._index.content_keys[c])
        if self.has_tokens:
            info["n_tokens"] = int(self._length[c])
        return info

    # -- summaries ----------------------------------------------------------------------------
    def size_on_disk(self) -> int:
        return int(sync(self.store.getsize_prefix("")))

    def info(self) -> dict:
        cfg = self.attrs["config"]
        committed = self._index.committed_content
        n_content = int(committed.sum())
        cropped = self._read("n_cropped", slice(0, self.committed.content)) if self.committed.content else np.zeros(0)
        n_tokens = int(self._length[committed].sum()) if self.has_tokens else 0
        layers = f", layers {self.layers}" if len(self.layers) > 1 else ""
        return {
            "path": self.path,
            "schema_version": self.schema_version,
            "status": self.status,
            "encoder": cfg["encoder"],
            "model": cfg["model"],
            "fingerprint": self.fingerprint,
            "records": len(self),
            "unique_sequences": n_content,
            "tokens": n_tokens,
            "embed_dim": self.embed_dim,
            "layers": self.layers,
            "pooled": f"({n_content}, {len(self.layers)}, {self.embed_dim}) float32, pooling={cfg['pooling']}{layers}" if self.has_pooled else None,
            "per_token": f"({n_tokens}, {len(self.layers)}, {self.embed_dim}) {cfg['dtype']}" if self.has_tokens else None,
            "sequences_cropped": int((cropped[committed] > 0).sum()) if len(cropped) else 0,
            "commits": self.n_commits,
            "size_on_disk_bytes": self.size_on_disk(),
            "first_ids": self.ids[:5],
            "provenance": self.attrs["provenance"],
            "builds": self.builds,
        }

    def verify(self) -> list[str]:
        """Every fault found, each naming the array and chunk or commit (see embedcache.verify)."""
        from embedcache.verify import verify_store

        return verify_store(self)


def _read_legacy_index(root: zarr.Group, where: str, attrs: dict) -> StoreIndex:
    """Schema 1: the commit log was `_build` attrs ({committed, groups, status, builds}); no checksums."""
    try:
        build = dict(root[LEGACY_BUILD_GROUP].attrs)
        committed = build["committed"]
        groups = build["groups"]
        head = Head(n=len(groups), records=int(committed["records"]), status=build["status"], builds=build.get("builds", []))
        rows, prev_r, prev_c = [], 0, 0
        for r_end, c_end, t0, t1 in groups:
            rows.append((prev_r, int(r_end), prev_c, int(c_end), int(t0), int(t1)))
            prev_r, prev_c = int(r_end), int(c_end)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"store {where!r} (schema 1): its commit log in {LEGACY_BUILD_GROUP}/ is malformed ({e!r})") from e
    ranges = np.asarray(rows, np.int64).reshape(-1, 6)
    log = CommitLog(head, ranges, np.zeros((len(rows), 0), np.int64))
    r, c = head.records, log.content_end
    ids = root["sequence"][:r].tolist() if r else []
    content_index = root["content_index"][:r].astype(np.int64) if r else np.zeros(0, np.int64)
    keys = root["content"][:c] if c else np.zeros(0, object)
    offsets = lengths = None
    if "tokens" in root:
        offsets = root["token_offset"][:c].astype(np.int64) if c else np.zeros(0, np.int64)
        lengths = root["token_length"][:c].astype(np.int64) if c else np.zeros(0, np.int64)
    return StoreIndex(log, ids, content_index, keys, log.committed_content(c), offsets, lengths)


def open_store(
    location: str | Path | Location, storage_options: dict[str, Any] | None = None, layer: int | None = None
) -> EmbeddingStore:
    """Open an embedding store (a path or a URL such as s3://bucket/x.zarr) for reading.

    `layer`: the hidden state that reads return when they name none; needed for a store built with
    several layers (`--layer 6 -1`), optional otherwise. Negative values count from the last layer.
    """
    return EmbeddingStore(location, storage_options, layer)


def describe(info: dict) -> str:
    """Human-readable `embedcache info` text."""
    lines = [f"{k:>18}: {v}" for k, v in info.items() if k not in ("provenance", "builds")]
    lines.append(f"{'provenance':>18}: {json.dumps(info['provenance'], sort_keys=True)}")
    for b in info["builds"]:
        lines.append(f"{'build':>18}: {json.dumps(b, sort_keys=True)}")
    return "\n".join(lines)

