"""`open_dataset`: a store as a lazy xarray Dataset of ONE layer, indexed by record id.

    >>> ds = embedcache.open_dataset("esm2.zarr", layer=-1)      # or "s3://...", storage_options={...}
    >>> ds.pooled.sel(sequence="P1").values                      # (feature,) float32: record P1's pooled vector
    >>> ds.embedcache.tokens("P1").values                        # (token, feature): its per-token rows
    >>> ds.pooled.sel(sequence=["P1", "P2"]).chunk()             # dask, if wanted (or open_dataset(..., chunks={}))

The store keeps `pooled` once per unique sequence and a flat per-token array with every layer;
this view resolves both: each per-record variable is on the `sequence` dimension (coordinate:
the record ids), the chosen layer is a scalar coordinate, and `tokens` holds the committed
per-token rows only (the unused rows between commits are left out), with `token_offset` /
`token_length` per record pointing into it. Only committed records appear (the commit log
decides, never consolidated metadata). Nothing is read on open beyond the index `open_store`
validates; each variable reads only the rows an indexing asks for (xarray's lazy backend arrays),
except `pooled`, which is read whole on first use and checked against its commits' crc32, as
`EmbeddingStore.pooled` reads it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from embedcache.errors import StoreError
from embedcache.reader import EmbeddingStore, run_reads
from embedcache.store import RECORD_CHUNK, _io_errors

# Per-content arrays shown per record (content row -> record row through `content_index`).
CONTENT_VARIABLES = ("residues", "n_input_tokens", "n_cropped", "n_windows")


def _read_error(where: str, name: str, e: BaseException) -> StoreError:
    return StoreError(f"store {where!r}: array {name!r} cannot be read: {e}; run embedcache verify")


def _as_index(key: Any, n: int) -> tuple[np.ndarray, bool]:
    """(positions, scalar?) of one axis' key: an int, a slice or an integer array."""
    if isinstance(key, slice):
        return np.arange(*key.indices(n)), False
    positions = np.asarray(key, np.int64)
    return positions.reshape(-1), positions.ndim == 0


class _RowsArray(BackendArray):
    """A (sequence, *tail) view of a zarr array: row i is the array's row `rows[i]`, at one layer
    when the array has a `layer` axis (its second)."""

    def __init__(self, array: zarr.Array, rows: np.ndarray, layer_pos: int | None, where: str):
        self.array, self.rows, self.layer_pos, self.where = array, rows, layer_pos, where
        tail = array.shape[2:] if layer_pos is not None else array.shape[1:]
        self.shape = (len(rows), *tail)
        self.dtype = np.dtype(object) if array.dtype.kind in "OTU" else array.dtype  # strings as Python str

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._getitem)

    def _getitem(self, key: tuple) -> np.ndarray:
        positions, scalar = _as_index(key[0], self.shape[0])
        rows = self.rows[positions]
        # Each stored row once, in order (records sharing a sequence share its row), then spread back.
        unique, inverse = np.unique(rows, return_inverse=True)
        first = unique if len(unique) else slice(0, 0)
        selection = (first, *((self.layer_pos,) if self.layer_pos is not None else ()), *key[1:])
        try:
            block = self.array.get_orthogonal_selection(selection)
        except _io_errors() + (ValueError, RuntimeError) as e:  # checksum or codec failure while decoding
            raise _read_error(self.where, self.array.basename, e) from e
        out = np.asarray(block)[inverse]
        out = out.astype(object) if self.dtype == object else out
        return out[0] if scalar else out


class _TokenRows(BackendArray):
    """(token, feature) of one layer: the committed token rows of the store, packed (each commit's
    rows follow the previous commit's; the unused rows between commits are not part of it)."""

    def __init__(self, store: EmbeddingStore, array: zarr.Array, spans: list[tuple[int, int]], layer_pos: int | None, where: str):
        self.store, self.array, self.layer_pos, self.where = store, array, layer_pos, where
        self.starts = np.array([t0 for t0, _ in spans], np.int64)  # where each span is in the store
        lengths = np.array([t1 - t0 for t0, t1 in spans], np.int64)
        self.packed = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # where each span is here
        self.shape = (int(self.packed[-1]), array.shape[-1])
        self.dtype = array.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._getitem)

    def _runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Store rows of packed rows lo..hi, as contiguous (start, end) runs: one per span they cross."""
        runs = []
        for j in range(max(0, int(np.searchsorted(self.packed, lo, side="right")) - 1), len(self.starts)):
            p0, p1 = int(self.packed[j]), int(self.packed[j + 1])
            if p0 >= hi:
                break
            a, b = max(lo, p0), min(hi, p1)
            if a < b:
                runs.append((int(self.starts[j]) + a - p0, int(self.starts[j]) + b - p0))
        return runs

    def _getitem(self, key: tuple) -> np.ndarray:
        first, rest = key[0], key[1:]
        layer = (self.layer_pos,) if self.layer_pos is not None else ()
        array = self.array._async_array
        if isinstance(first, slice) and first.indices(self.shape[0])[2] == 1:
            lo, hi, _ = first.indices(self.shape[0])
            runs = self._runs(lo, hi)
            self.store.check_token_rows(runs)  # each shard against its commit's digest, on its first read
            reads = [array.get_orthogonal_selection((slice(a, b), *layer, *rest)) for a, b in runs]
            inverse, scalar = None, False
        else:  # scattered rows: map each to its store row, read each once
            positions, scalar = _as_index(first, self.shape[0])
            span = np.searchsorted(self.packed, positions, side="right") - 1
            unique, inverse = np.unique(self.starts[span] + positions - self.packed[span], return_inverse=True)
            self.store.check_token_rows([(r, r + 1) for r in unique.tolist()])
            reads = [array.get_orthogonal_selection((unique if len(unique) else slice(0, 0), *layer, *rest))]

        async def read_all() -> list:
            return await asyncio.gather(*reads)

        try:
            parts = run_reads(self.array.store, read_all())
        except _io_errors() + (ValueError, RuntimeError) as e:  # checksum or codec failure while decoding
            raise _read_error(self.where, "tokens", e) from e
        if not parts:  # an empty selection: read nothing, shape it as zarr would
            parts = [np.asarray(self.array.get_orthogonal_selection((slice(0, 0), *layer, *rest)))]
        out = np.concatenate([np.asarray(p) for p in parts]) if len(parts) > 1 else np.asarray(parts[0])
        if inverse is not None:
            out = out[inverse]
        return out[0] if scalar else out


class _PooledRows(BackendArray):
    """(sequence, feature) pooled vectors through the store's reader, which reads them whole on first use
    and checks each commit's rows against the crc32 they were committed with (one row per sequence:
    the array every reader of pooled vectors loads whole anyway)."""

    def __init__(self, store: EmbeddingStore, layer: int):
        self.store, self.layer = store, layer
        self.shape = (len(store), store.embed_dim)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._getitem)

    def _getitem(self, key: tuple) -> np.ndarray:
        positions, scalar = _as_index(key[0], self.shape[0])
        out = self.store.pooled_at(positions, self.layer)[:, key[1]]
        return out[0] if scalar else out


def _variable(dims: tuple[str, ...], data: BackendArray | np.ndarray, **attrs: Any) -> xr.Variable:
    lazy = indexing.LazilyIndexedArray(data) if isinstance(data, BackendArray) else data
    # dask chunks (`chunks={}`) of whole record chunks, and of whole shards of token rows
    token_rows = (data.array.shards or data.array.chunks)[0] if isinstance(data, _TokenRows) else 0
    preferred = {"sequence": RECORD_CHUNK, "token": token_rows}
    encoding = {"preferred_chunks": {d: preferred[d] for d in dims if preferred.get(d)}}
    return xr.Variable(dims, lazy, attrs=attrs, encoding=encoding)


def _has_layer_axis(array: zarr.Array) -> bool:
    return "layer" in (array.metadata.dimension_names or ())


def store_dataset(store: EmbeddingStore, layer: int | None = None, drop_variables: Iterable[str] = ()) -> xr.Dataset:
    """The Dataset of an opened store at one layer (None: the store's last layer); see `open_dataset`."""
    if not store.layers:
        raise StoreError(f"store {store.path!r} names no layers")
    pos = store.layer_position(store.layers[-1] if layer is None else layer)
    chosen = int(store.layers[pos])
    where, root, index = store.path, store.root, store._index
    content_rows = index.content_index
    n_records = len(store)
    variables: dict[str, xr.Variable] = {}
    if store.has_pooled:
        variables["pooled"] = _variable(("sequence", "feature"), _PooledRows(store, chosen),
                                        description="pooled embedding of each record", pooling=store.attrs.get("pooling", ""))
    if store.has_tokens:
        tokens = root["tokens"]
        spans = sorted({(t0, t1) for *_, t0, t1 in index.log.ranges.tolist() if t1 > t0})
        rows = _TokenRows(store, tokens, spans, pos if _has_layer_axis(tokens) else None, where)
        variables["tokens"] = _variable(("token", "feature"), rows, description="per-token embeddings, flat: a record's rows are "
                                        "tokens[token_offset : token_offset + token_length] (ds.embedcache.tokens(id))")
        offsets = index.offsets[content_rows]
        span = np.searchsorted(rows.starts, offsets, side="right") - 1
        packed = offsets - rows.starts[span] + rows.packed[span] if len(offsets) and len(spans) else np.zeros_like(offsets)
        variables["token_offset"] = _variable(("sequence",), packed.astype(np.int64), description="first row of the record in `tokens`")
        variables["token_length"] = _variable(("sequence",), index.lengths[content_rows].astype(np.int64),
                                              description="rows of the record in `tokens` (special tokens stripped)")
    for name in CONTENT_VARIABLES:
        if name in root:
            variables[name] = _variable(("sequence",), _RowsArray(root[name], content_rows, None, where))
    dropped = set([drop_variables] if isinstance(drop_variables, str) else drop_variables or ())
    variables = {k: v for k, v in variables.items() if k not in dropped}
    coords = {
        "sequence": ("sequence", np.array(store.ids, dtype=object), {"description": "record id"}),
        "content": ("sequence", np.array([str(k) for k in index.content_keys[content_rows].tolist()], dtype=object),
                    {"description": "sha256 of the residues: records with one sequence share it"}),
        "layer": ((), chosen, {"description": "hidden-state index of the variables' layer (-1 resolved)"}),
    }
    attrs = {**store.attrs, "store": where, "status": store.status, "layers": list(store.layers), "n_records": n_records}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


class EmbedcacheBackend(BackendEntrypoint):
    """xarray engine for embedcache stores: `xr.open_dataset(STORE, engine=EmbedcacheBackend, layer=-1)`."""

    open_dataset_parameters = ("filename_or_obj", "drop_variables", "layer", "storage_options")
    description = "embedcache embedding stores, one layer, indexed by record id"

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None, layer: int | None = None,
                     storage_options: dict[str, Any] | None = None) -> xr.Dataset:  # fmt: skip
        if not isinstance(filename_or_obj, (str, Path)):
            raise StoreError(f"open_dataset takes a store path or URL, not {type(filename_or_obj).__name__}")
        store = EmbeddingStore(filename_or_obj, storage_options)
        return store_dataset(store, layer, drop_variables or ())

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return False  # only when named: never guessed for other Zarr groups


def open_dataset(
    store: str | Path,
    *,
    layer: int | None = None,
    storage_options: dict[str, Any] | None = None,
    chunks: int | str | dict | None = None,
) -> xr.Dataset:
    """A store as a lazy xarray Dataset of one layer, indexed by record id.

    `layer`: the hidden state, as everywhere in embedcache (`-1` = the model's last, `0` = the
    embeddings, `i` after block `i`); default the store's last stored layer. `chunks`: as in
    `xarray.open_dataset` (None: lazy backend arrays, read on access; `{}`: dask arrays).

    Dimensions: `sequence` (committed records, input order), `feature` (embed_dim), `token` (committed
    per-token rows, packed). Coordinates: `sequence` (record ids, the index), `content` (sequence,)
    the sha256 content key, and scalar `layer` (the resolved hidden-state index). Variables:

        pooled        (sequence, feature)  float32   pooled embedding        [unless --pooling none]
        tokens        (token, feature)     float16   per-token rows, flat    [unless --no-tokens]
        token_offset  (sequence,)          int64     first row of the record in `tokens`
        token_length  (sequence,)          int64     its rows (special tokens stripped)
        residues      (sequence,)          str       the sequence as embedded
        n_input_tokens, n_cropped, n_windows (sequence,) int

    A record's per-token rows: `ds.embedcache.tokens("P1")`, i.e. `ds.tokens[o : o + n]` with
    o, n = its `token_offset`, `token_length`. Records sharing a sequence share its rows.
    Attrs: the store's `embedcache` attrs (fingerprint, config, provenance, ...) plus `store`,
    `status`, `layers` (all stored layers) and `n_records`.
    """
    return xr.open_dataset(store, engine=EmbedcacheBackend, chunks=chunks, layer=layer, storage_options=storage_options)


@xr.register_dataset_accessor("embedcache")
class EmbedcacheAccessor:
    """`ds.embedcache.tokens(record_id)`: one record's per-token rows of an `open_dataset` Dataset."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def tokens(self, record_id: str) -> xr.DataArray:
        """(token, feature) rows of `record_id`, lazily (only they are read)."""
        ds = self._ds
        if "tokens" not in ds:
            raise StoreError(f"store {ds.attrs.get('store', '?')!r} has no per-token rows (built with --no-tokens)")
        if record_id not in ds.indexes["sequence"]:
            raise StoreError(f"record {record_id!r} is not in store {ds.attrs.get('store', '?')!r}")
        record = ds.sel(sequence=record_id)
        offset, length = int(record.token_offset), int(record.token_length)
        return ds.tokens.isel(token=slice(offset, offset + length)).assign_coords(sequence=record_id)
