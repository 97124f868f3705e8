"""Which token shard objects changed since a build last saw them: one listing, no data read.

A build keeps token rows it never reads: reading them would make adding one record cost a read of
the whole store. So a completed build records each shard object's stamp (size and modification
time on a local disk; size and ETag, an MD5 of the bytes, on S3; what the filesystem reports
elsewhere) in `_commits/shard_stamp`, and the next build lists the shards once. A shard whose stamp
changed (edited in place, swapped with another, restored from a copy) or was never recorded (a
killed build's) is read and checked against its digest (embedcache.commits.TokenShards) before
anything is written. Bytes that rot under an unchanged stamp are left to `embedcache verify`.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from embedcache.commits import COMMITS_GROUP, LOG_CHUNK

SHARD_STAMP = "shard_stamp"
# Fields of an fsspec listing that change when an object's bytes do, most specific first.
_REMOTE_FIELDS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime", "last_modified", "created")


def current_stamps(store: Store, tokens: zarr.Array, n_shards: int) -> np.ndarray | None:
    """(n_shards,) int64 stamp of each shard object as it is now (0 where it is absent), or None for
    a store that reports no stamps (memory://)."""
    keys = [f"{tokens.path}/{tokens.metadata.encode_chunk_key((s, *(0,) * (tokens.ndim - 1)))}" for s in range(n_shards)]
    if isinstance(store, LocalStore):
        return np.array([_local_stamp(os.path.join(str(store.root), key)) for key in keys], np.int64)
    if isinstance(store, FsspecStore):
        infos = sync(store.fs._find(f"{store.path}/{tokens.path}", detail=True))
        by_key = {path[len(store.path) :].lstrip("/"): info for path, info in infos.items()}
        stamps = [_remote_stamp(by_key.get(key)) for key in keys]
        return None if any(s is None for s in stamps) else np.array(stamps, np.int64)
    return None


def recorded_stamps(root: zarr.Group, n_shards: int) -> np.ndarray:
    """The stamps the last completed build recorded: 0 for shards it did not see."""
    group = root[COMMITS_GROUP]
    out = np.zeros(n_shards, np.int64)
    if SHARD_STAMP in group:
        stored = group[SHARD_STAMP][: min(n_shards, group[SHARD_STAMP].shape[0])]
        out[: len(stored)] = stored
    return out


def record_stamps(root: zarr.Group, stamps: np.ndarray) -> None:
    group = root[COMMITS_GROUP]
    if SHARD_STAMP not in group:
        group.create_array(SHARD_STAMP, shape=(0,), chunks=(LOG_CHUNK,), dtype="int64", dimension_names=("shard",))
    arr = group[SHARD_STAMP]
    arr.resize((len(stamps),))
    if len(stamps):
        arr[:] = stamps


def _local_stamp(path: str) -> int:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    return _digest(f"{st.st_size}:{st.st_mtime_ns}")


def _remote_stamp(info: dict | None) -> int | None:
    if info is None:
        return 0
    for name in _REMOTE_FIELDS:
        if info.get(name) is not None:
            return _digest(f"{info.get('size')}:{name}={info[name]}")
    return None


def _digest(text: str) -> int:
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
    return value or 1  # 0 means "not recorded"
