"""`embedcache verify`: read every committed chunk of every array and check it against the log.

Faults name the exact place: a chunk whose crc32c fails names the array and chunk; a chunk that
is missing names its key; a commit whose rows no longer match the crc32 they were written with
names the commit, the array and its rows.
"""

from __future__ import annotations

import numpy as np

from embedcache.commits import CHECKED_ARRAYS, CONTENT_ARRAYS, RECORD_ARRAYS, TOKEN_INDEX_ARRAYS, crc_of
from embedcache.store import _io_errors, missing_objects


def _spans_of(store, name: str) -> list[tuple[int, int]]:
    ranges = store.log.ranges.tolist()
    if name in RECORD_ARRAYS:
        return [(r0, r1) for r0, r1, *_ in ranges]
    if name == "tokens":
        return [(t0, t1) for *_, t0, t1 in ranges]
    return [(c0, c1) for _, _, c0, c1, _, _ in ranges]


def _read_chunks(store, name: str, lo: int, hi: int, faults: list[str]) -> np.ndarray | None:
    """Rows lo..hi of `name`, read inner chunk by inner chunk so that a bad one is named exactly."""
    arr = store.root[name]
    step = arr.chunks[0]
    parts = []
    for start in range(lo - lo % step, hi, step):
        a, b = max(start, lo), min(start + step, hi)
        try:
            parts.append(arr[a:b])
        except _io_errors() + (ValueError, RuntimeError) as e:
            idx = start // step
            faults.append(f"{store.path}: array {name!r} chunk {idx} (rows {start}..{start + step}) cannot be read: {e}")
            return None
    return np.concatenate(parts) if parts else arr[lo:lo]


def verify_store(store) -> list[str]:
    """Every fault of `store` (an EmbeddingStore), or [] when it is complete and intact."""
    where = store.path
    faults: list[str] = []
    if store.status != "complete":
        faults.append(f"{where}: status is {store.status!r}, not 'complete' (an interrupted build: run it again)")
    if len(set(store.ids)) != len(store.ids):
        faults.append(f"{where}: duplicate record ids")
    keys = [k for k, used in zip(store._index.content_keys.tolist(), store._index.committed_content) if used]
    if len(set(keys)) != len(keys):
        faults.append(f"{where}: a content key is stored twice")
    faults += [f"{where}: {f}" for f in missing_objects(store.store, store.root, store._index)]
    if store.schema_version == 1:
        return faults + _verify_legacy(store)
    names = [n for n in CHECKED_ARRAYS if n in store.root]
    crc_column = {name: i for i, name in enumerate(CHECKED_ARRAYS)}
    for name in names:
        for commit, (lo, hi) in enumerate(_spans_of(store, name)):
            if hi <= lo:
                continue
            values = _read_chunks(store, name, lo, hi, faults)
            if values is None:
                continue
            if name in ("pooled", "tokens") and not np.isfinite(values).all():
                faults.append(f"{where}: array {name!r} rows {lo}..{hi} (commit {commit}) hold non-finite values")
            expected = int(store.log.crc[commit, crc_column[name]])
            if crc_of(values) != expected:
                faults.append(
                    f"{where}: array {name!r} rows {lo}..{hi} (commit {commit}) do not match the checksum they were "
                    f"committed with: the data was changed after the build"
                )
    return faults


def _verify_legacy(store) -> list[str]:
    """Schema 1 stores have no checksums: read every committed row back and report what fails."""
    faults = []
    for name in (*RECORD_ARRAYS, *CONTENT_ARRAYS, *TOKEN_INDEX_ARRAYS, "pooled", "tokens"):
        if name not in store.root:
            continue
        for lo, hi in _spans_of(store, name) if name != "pooled" else [(0, store.committed.records)]:
            if hi > lo:
                _read_chunks(store, name, lo, hi, faults)
    faults.append(f"{store.path}: schema 1 store: chunks carry no checksums, so changed bytes cannot be detected; rebuild to get them")
    return faults
