"""The embedding store: a Zarr v3 group on disk. Its schema is the contract with `fusion`.

Layout (dimension names are Zarr v3 `dimension_names`, so `xarray.open_zarr` reads it):

    sequence       (sequence,)          str      record ids, one per input record (the dimension's coordinate)
    content_index  (sequence,)          int64    row of the record's unique sequence in the content arrays
    pooled         (sequence, feature)  float32  pooled embedding per record            [pooling != none]
    content        (content,)           str      sha256 of the residues: the content address (coordinate)
    residues       (content,)           str      the sequence as embedded (upper-cased, before any crop)
    n_input_tokens (content,)           int64    tokens of the whole sequence
    n_cropped      (content,)           int64    tokens removed by an explicit --crop (0 otherwise)
    n_windows      (content,)           int32    model calls the sequence took
    token_offset   (content,)           int64    first row of the sequence in `tokens`    [per-token on]
    token_length   (content,)           int64    rows of the sequence in `tokens`         [per-token on]
    tokens         (token, feature)     float16  per-token embeddings, flat ("contiguous ragged array")

Identical sequences under different ids share one content row (computed once); `pooled` is
per record so that xarray can index it by id: `xr.open_zarr(path).pooled.sel(sequence="P12345")`.

Writes come in groups. Each group starts `tokens` at a shard boundary and so writes whole
shards that no other group touches. The `_build` subgroup's attrs are the commit log: a group
counts only once its entry is there, and that attrs write is an atomic rename. Readers see the
committed rows only; a writer first trims anything past the log (the leftovers of a killed build).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from embedcache.errors import FingerprintMismatch, StoreError

FORMAT = "embedcache-store"
BUILD_GROUP = "_build"
CHUNK_BYTES = 1 << 20  # ~1 MiB inner chunks: small enough for one-sequence reads
RECORD_CHUNK = 4096  # rows per chunk of the per-record / per-content arrays
RESIDUE_CHUNK = 256  # strings per chunk of `residues` (an Enformer window is 196 kb)

# fp16 embeddings barely compress (store-design.md: 1.08-1.10x with any codec); lz4 with bitshuffle
# is the fastest to decode, which is what the fusion loader pays for on every epoch.
_TOKEN_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
_TEXT_CODEC = ZstdCodec(level=3)

CONTENT_ARRAYS = ("content", "residues", "n_input_tokens", "n_cropped", "n_windows")
TOKEN_INDEX_ARRAYS = ("token_offset", "token_length")


@dataclass
class ContentResult:
    """One embedded unique sequence, on its way to the store."""

    key: str
    residues: str
    tokens: np.ndarray | None  # (L, d) in the stored dtype, or None when per-token output is off
    pooled: np.ndarray | None  # (d,) float32, or None when pooling is off
    n_input_tokens: int
    n_cropped: int
    n_windows: int


@dataclass(frozen=True)
class Committed:
    records: int = 0
    content: int = 0
    tokens: int = 0  # one past the last token row in use


def token_chunking(embed_dim: int, itemsize: int, shard_mb: float, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """(tokens per inner chunk, tokens per shard) for ~1 MiB chunks and ~shard_mb shards.

    A shard smaller than a chunk makes the chunk the whole shard (tests use tiny shards to get
    many commit groups from little data).
    """
    row = embed_dim * itemsize
    shard_bytes = shard_mb * (1 << 20)
    chunk = max(1, int(min(chunk_bytes, shard_bytes) // row))
    per_shard = max(1, round(shard_bytes / (chunk * row)))
    return chunk, chunk * per_shard


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _array(group: zarr.Group, name: str, dims: tuple[str, ...], dtype, width: int | None = None, **kw) -> zarr.Array:
    shape = (0,) if width is None else (0, width)
    chunks = kw.pop("chunks", (RECORD_CHUNK,) if width is None else (RECORD_CHUNK, width))
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims, **kw)


def create_store(
    path: str | Path,
    *,
    attrs: dict,
    embed_dim: int,
    pooled: bool,
    tokens: bool,
    token_dtype: str,
    shard_mb: float,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Create an empty store with all arrays at length 0 and an empty commit log.

    It is made in a sibling temp directory and renamed into place (atomic on POSIX), so a build
    killed while creating leaves either no store or a whole empty one, never a half-made group.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # left by a build killed while creating
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
    _create_arrays(tmp, attrs=attrs, embed_dim=embed_dim, pooled=pooled, tokens=tokens, token_dtype=token_dtype, shard_mb=shard_mb, chunk_bytes=chunk_bytes)
    try:
        os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"cannot create store {str(path)!r}: {e}") from e


def _create_arrays(
    path: Path, *, attrs: dict, embed_dim: int, pooled: bool, tokens: bool, token_dtype: str, shard_mb: float, chunk_bytes: int
) -> None:
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    _array(root, "sequence", ("sequence",), str, compressors=_TEXT_CODEC)
    _array(root, "content_index", ("sequence",), "int64")
    if pooled:
        _array(root, "pooled", ("sequence", "feature"), "float32", width=embed_dim, chunks=(1024, embed_dim))
    _array(root, "content", ("content",), str, compressors=_TEXT_CODEC)
    _array(root, "residues", ("content",), str, chunks=(RESIDUE_CHUNK,), compressors=_TEXT_CODEC)
    for name in ("n_input_tokens", "n_cropped"):
        _array(root, name, ("content",), "int64")
    _array(root, "n_windows", ("content",), "int32")
    if tokens:
        for name in TOKEN_INDEX_ARRAYS:
            _array(root, name, ("content",), "int64")
        chunk, shard = token_chunking(embed_dim, np.dtype(token_dtype).itemsize, shard_mb, chunk_bytes)
        root.create_array(
            "tokens",
            shape=(0, embed_dim),
            chunks=(chunk, embed_dim),
            shards=(shard, embed_dim),
            dtype=token_dtype,
            dimension_names=("token", "feature"),
            compressors=_TOKEN_CODEC,
        )
    root.attrs.update({"embedcache": attrs})
    build = root.create_group(BUILD_GROUP)
    build.attrs.update({"status": "empty", "committed": Committed().__dict__, "groups": [], "builds": []})


def _open_root(path: str | Path, mode: str) -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"no embedcache store at {str(path)!r} (no zarr.json)")
    try:
        root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a truncated or overwritten zarr.json
        raise StoreError(f"{path / 'zarr.json'}: not valid JSON ({e}); the store's metadata is damaged") from e
    meta = root.attrs.get("embedcache")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{str(path)!r} is a Zarr group but not an embedcache store (no embedcache attrs)")
    return root


def check_fingerprint(path: str | Path, store_attrs: dict, expected: str, expected_fields: dict) -> None:
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
        f"store {str(path)!r} has fingerprint {actual} but this build has fingerprint {expected}; "
        f"differences: {'; '.join(diffs) or 'none listed'}. Build into a new store, or use the store's settings."
    )


def read_index(root: zarr.Group) -> tuple[dict[str, int], dict[str, int]]:
    """The committed index: content key -> content row, and record id -> content row."""
    c = Committed(**root[BUILD_GROUP].attrs["committed"])
    keys = {k: i for i, k in enumerate(root["content"][: c.content].tolist())} if c.content else {}
    ids = root["sequence"][: c.records].tolist() if c.records else []
    content_index = root["content_index"][: c.records].tolist() if c.records else []
    return keys, dict(zip(ids, content_index))


class StoreWriter:
    """Appends committed groups to a store. One writer per store at a time."""

    def __init__(self, root: zarr.Group, shard_tokens: int | None = None):
        self.root = root
        self.build = root[BUILD_GROUP]
        c = self.build.attrs["committed"]
        self.committed = Committed(**c)
        self.has_tokens = "tokens" in root
        self.has_pooled = "pooled" in root
        self.shard_tokens = root["tokens"].shards[0] if self.has_tokens else 0
        self._trim()
        self.keys, self.record_content = read_index(root)

    def _trim(self) -> None:
        """Cut every array back to the committed sizes: leftovers of a killed build are never read."""
        c = self.committed
        for name in ("sequence", "content_index", "pooled"):
            if name in self.root:
                a = self.root[name]
                a.resize((c.records, *a.shape[1:]))
        for name in (*CONTENT_ARRAYS, *TOKEN_INDEX_ARRAYS):
            if name in self.root:
                self.root[name].resize((c.content,))
        if self.has_tokens:
            self.root["tokens"].resize((c.tokens, self.root["tokens"].shape[1]))

    def pooled_of_contents(self, indices: list[int]) -> np.ndarray:
        """(n, d) pooled vectors already stored for existing content rows (read once: pooled is small)."""
        r = self.committed.records
        content_index = self.root["content_index"][:r]
        first_row = {}
        for row, c in enumerate(content_index.tolist()):
            first_row.setdefault(c, row)
        return self.root["pooled"][:r][[first_row[c] for c in indices]]

    def set_status(self, status: str, **extra) -> None:
        attrs = dict(self.build.attrs)
        attrs["status"] = status
        attrs.update(extra)
        self.build.attrs.update(attrs)

    def commit(self, contents: list[ContentResult], records: list[tuple[str, str]]) -> None:
        """Write a group of new content rows and the records that use them, then log the commit.

        `records` are (id, content key); a key is either among `contents` or already in the store.
        """
        c = self.committed
        new_keys = {r.key: c.content + i for i, r in enumerate(contents)}
        # 1. per-token rows, starting on a shard boundary so the group writes whole shards only
        t_start = c.tokens
        offsets = np.zeros(len(contents), np.int64)
        lengths = np.zeros(len(contents), np.int64)
        if self.has_tokens and contents:
            t_start = math.ceil(c.tokens / self.shard_tokens) * self.shard_tokens
            lengths[:] = [len(r.tokens) for r in contents]
            offsets[:] = t_start + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            block = np.concatenate([r.tokens for r in contents])  # (sum L, d)
            tokens = self.root["tokens"]
            tokens.resize((t_start + len(block), tokens.shape[1]))
            tokens[t_start : t_start + len(block)] = block
        t_end = t_start + int(lengths.sum()) if self.has_tokens and contents else c.tokens
        # 2. content rows
        n_content = c.content + len(contents)
        if contents:
            columns = {
                "content": np.array([r.key for r in contents], dtype=object),
                "residues": np.array([r.residues for r in contents], dtype=object),
                "n_input_tokens": np.array([r.n_input_tokens for r in contents], np.int64),
                "n_cropped": np.array([r.n_cropped for r in contents], np.int64),
                "n_windows": np.array([r.n_windows for r in contents], np.int32),
            }
            if self.has_tokens:
                columns.update(token_offset=offsets, token_length=lengths)
            for name, values in columns.items():
                self.root[name].resize((n_content,))
                self.root[name][c.content : n_content] = values
        # 3. record rows
        n_records = c.records + len(records)
        if records:
            index = np.array([new_keys[k] if k in new_keys else self.keys[k] for _, k in records], np.int64)
            self.root["sequence"].resize((n_records,))
            self.root["sequence"][c.records : n_records] = np.array([i for i, _ in records], dtype=object)
            self.root["content_index"].resize((n_records,))
            self.root["content_index"][c.records : n_records] = index
            if self.has_pooled:
                by_key = {r.key: r.pooled for r in contents}
                old = [self.keys[k] for _, k in records if k not in by_key]
                if old:
                    by_key.update(zip((k for _, k in records if k not in by_key), self.pooled_of_contents(old)))
                rows = np.stack([by_key[k] for _, k in records])
                pooled = self.root["pooled"]
                pooled.resize((n_records, pooled.shape[1]))
                pooled[c.records : n_records] = rows
        # 4. the commit itself: one atomic metadata write
        self.committed = Committed(records=n_records, content=n_content, tokens=t_end)
        groups = list(self.build.attrs["groups"])
        groups.append([n_records, n_content, t_start, t_end])
        self.build.attrs.update({"committed": self.committed.__dict__, "groups": groups})
        self.keys.update(new_keys)
        for (rid, _), i in zip(records, index if records else []):
            self.record_content[rid] = int(i)


class EmbeddingStore:
    """Read access to a store: `embedcache.open_store(path)`.

    >>> store = open_store("proteins.zarr")
    >>> store.ids[:3], store.embed_dim
    >>> store.pooled(["P1", "P2"]).shape      # (2, d) float32
    >>> store.tokens("P1").shape              # (L, d): real token positions only, special tokens stripped
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.root = _open_root(self.path, mode="r")
        self.attrs: dict = dict(self.root.attrs["embedcache"])
        build = dict(self.root[BUILD_GROUP].attrs)
        self.status: str = build["status"]
        self.committed = Committed(**build["committed"])
        self.groups: list[list[int]] = build["groups"]
        self.builds: list[dict] = build.get("builds", [])
        n = self.committed.records
        self.ids: list[str] = self.root["sequence"][:n].tolist() if n else []
        self._row = {rid: i for i, rid in enumerate(self.ids)}
        self._content_index = self.root["content_index"][:n] if n else np.zeros(0, np.int64)
        self.has_tokens = "tokens" in self.root
        self.has_pooled = "pooled" in self.root
        # Opened once: looking an array up in the group costs ~0.5 ms, as much as a small read.
        self._tokens = self.root["tokens"] if self.has_tokens else None
        if self.has_tokens:
            nc = self.committed.content
            self._offset = self.root["token_offset"][:nc] if nc else np.zeros(0, np.int64)
            self._length = self.root["token_length"][:nc] if nc else np.zeros(0, np.int64)
        self._pooled_cache: np.ndarray | None = None

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

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._row

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, encoder={self.attrs['config']['encoder']!r}, "
            f"records={len(self)}, dim={self.embed_dim}, status={self.status!r})"
        )

    # -- data ---------------------------------------------------------------------------------
    def rows(self, ids: list[str]) -> np.ndarray:
        """Record rows of `ids`; unknown ids raise KeyError naming examples and the count."""
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(ids)} ids are not in store {str(self.path)!r}, e.g. {missing[:5]}"
            )
        return np.fromiter((self._row[i] for i in ids), np.int64, len(ids))

    def pooled(self, ids: list[str] | None = None) -> np.ndarray:
        """(n, d) float32 pooled embeddings of `ids` (all records, in `self.ids` order, when None)."""
        if not self.has_pooled:
            raise StoreError(f"store {str(self.path)!r} was built with --pooling none")
        if self._pooled_cache is None:  # pooled arrays are small: load once
            n = self.committed.records
            self._pooled_cache = self.root["pooled"][:n] if n else np.zeros((0, self.embed_dim), np.float32)
        return self._pooled_cache if ids is None else self._pooled_cache[self.rows(ids)]

    def token_span(self, record_id: str) -> tuple[int, int]:
        """(offset, length) of the record's rows in the flat `tokens` array."""
        if not self.has_tokens:
            raise StoreError(f"store {str(self.path)!r} was built with --no-tokens")
        c = self._content_index[self.rows([record_id])[0]]
        return int(self._offset[c]), int(self._length[c])

    def tokens(self, record_id: str) -> np.ndarray:
        """(L, d) per-token embeddings of one record, in the stored dtype."""
        offset, length = self.token_span(record_id)
        return self._tokens[offset : offset + length]

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All per-token data at once: (flat (T, d), offset per record into flat, length per record).

        Reads each commit group's rows sequentially and skips the unused rows between groups
        (each group starts on a shard boundary); for data that fits in memory.
        """
        spans = [(t0, t1) for _, _, t0, t1 in self.groups if t1 > t0]
        if not spans:
            return np.zeros((0, self.embed_dim), self.attrs["stored_dtype"]["tokens"]), np.zeros(0, np.int64), np.zeros(0, np.int64)
        flat = np.concatenate([self._tokens[t0:t1] for t0, t1 in spans])  # (T_used, d)
        starts = np.array([t0 for t0, _ in spans])
        packed = np.cumsum([0] + [t1 - t0 for t0, t1 in spans[:-1]])  # where each group begins in `flat`
        c = self._content_index
        offsets = self._offset[c]
        group = np.searchsorted(starts, offsets, side="right") - 1
        return flat, offsets - starts[group] + packed[group], self._length[c]

    def sequence(self, record_id: str) -> str:
        c = int(self._content_index[self.rows([record_id])[0]])
        return str(self.root["residues"][c])

    def record_info(self, record_id: str) -> dict:
        c = int(self._content_index[self.rows([record_id])[0]])
        info = {name: int(self.root[name][c]) for name in ("n_input_tokens", "n_cropped", "n_windows")}
        info["content_key"] = str(self.root["content"][c])
        if self.has_tokens:
            info["n_tokens"] = int(self._length[c])
        return info

    # -- summaries ----------------------------------------------------------------------------
    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def info(self) -> dict:
        cfg = self.attrs["config"]
        n_cropped = int((self.root["n_cropped"][: self.committed.content] > 0).sum()) if self.committed.content else 0
        return {
            "path": str(self.path),
            "status": self.status,
            "encoder": cfg["encoder"],
            "model": cfg["model"],
            "fingerprint": self.fingerprint,
            "records": len(self),
            "unique_sequences": self.committed.content,
            "tokens": int(self._length.sum()) if self.has_tokens else 0,
            "embed_dim": self.embed_dim,
            "pooled": f"({len(self)}, {self.embed_dim}) float32, pooling={cfg['pooling']}" if self.has_pooled else None,
            "per_token": f"({int(self._length.sum())}, {self.embed_dim}) {cfg['dtype']}" if self.has_tokens else None,
            "sequences_cropped": n_cropped,
            "groups": len(self.groups),
            "size_on_disk_bytes": self.size_on_disk(),
            "first_ids": self.ids[:5],
            "provenance": self.attrs["provenance"],
            "builds": self.builds,
        }

    def verify(self) -> list[str]:
        """Every fault found: status, index consistency, and every committed shard read back."""
        faults = []
        where = str(self.path)
        if self.status != "complete":
            faults.append(f"{where}: status is {self.status!r}, not 'complete' (an interrupted build: run it again)")
        c = self.committed
        for name in ("sequence", "content_index", "pooled"):
            if name in self.root and self.root[name].shape[0] != c.records:
                faults.append(f"{where}: array {name!r} has {self.root[name].shape[0]} rows, log says {c.records}")
        for name in (*CONTENT_ARRAYS, *(TOKEN_INDEX_ARRAYS if self.has_tokens else ())):
            if self.root[name].shape[0] != c.content:
                faults.append(f"{where}: array {name!r} has {self.root[name].shape[0]} rows, log says {c.content}")
        if len(set(self.ids)) != len(self.ids):
            faults.append(f"{where}: duplicate record ids")
        if len(self._content_index) and (self._content_index.min() < 0 or self._content_index.max() >= c.content):
            faults.append(f"{where}: a record points outside the {c.content} content rows")
        keys = self.root["content"][: c.content].tolist() if c.content else []
        if len(set(keys)) != len(keys):
            faults.append(f"{where}: a content key is stored twice")
        if self.has_tokens and c.content:
            end = self._offset + self._length
            bad = np.flatnonzero((self._offset < 0) | (end > c.tokens))
            if len(bad):
                faults.append(f"{where}: {len(bad)} sequences point outside the {c.tokens} token rows, e.g. {keys[bad[0]]}")
        faults += self._read_back(where)
        return faults

    def _read_back(self, where: str) -> list[str]:
        faults = []
        if self.has_pooled and len(self):
            try:
                p = self.pooled()
                if not np.isfinite(p).all():
                    faults.append(f"{where}: pooled holds non-finite values at rows {np.flatnonzero(~np.isfinite(p).all(1))[:5].tolist()}")
            except Exception as e:  # any codec / IO failure is a fault to report, not a crash
                faults.append(f"{where}: pooled cannot be read: {e}")
        if self.has_tokens:
            tokens = self.root["tokens"]
            for g, (_, _, t0, t1) in enumerate(self.groups):
                if t1 <= t0:
                    continue
                try:
                    block = tokens[t0:t1]
                except Exception as e:
                    faults.append(f"{where}: group {g} (token rows {t0}..{t1}) cannot be read: {e}")
                    continue
                if not np.isfinite(block).all():
                    faults.append(f"{where}: group {g} (token rows {t0}..{t1}) holds non-finite values")
        return faults


def open_store(path: str | Path) -> EmbeddingStore:
    """Open an embedding store for reading."""
    return EmbeddingStore(path)


def open_writer(path: str | Path) -> StoreWriter:
    return StoreWriter(_open_root(path, mode="r+"))


def read_store_index(path: str | Path) -> tuple[dict, dict[str, int], dict[str, int]]:
    """(embedcache attrs, content keys, record ids) without modifying the store (for planning)."""
    root = _open_root(path, mode="r")
    return dict(root.attrs["embedcache"]), *read_index(root)


def describe(info: dict) -> str:
    """Human-readable `embedcache info` text."""
    lines = [f"{k:>18}: {v}" for k, v in info.items() if k not in ("provenance", "builds")]
    lines.append(f"{'provenance':>18}: {json.dumps(info['provenance'], sort_keys=True)}")
    for b in info["builds"]:
        lines.append(f"{'build':>18}: {json.dumps(b, sort_keys=True)}")
    return "\n".join(lines)
