"""`embedcache verify`: read every committed chunk of every array and check it against the log.

Faults name the exact place: a chunk whose crc32c fails names the array and chunk (once, with the
commits whose rows it holds); a chunk that is missing names its key; a commit whose rows no longer
match the crc32 they were written with names the commit, the array and its rows. A local store
holding a symlink or another non-regular file is one fault per kind, with the count and the first
few named, and nothing is read through them.
"""

from __future__ import annotations

import numpy as np

from embedcache.commits import CHECKED_ARRAYS, CONTENT_ARRAYS, RECORD_ARRAYS, TOKEN_INDEX_ARRAYS, crc_of, shard_digests
from embedcache.location import local_file_faults
from embedcache.store import _io_errors, missing_objects


class ChunkFaults:
    """Unreadable chunks, each named ONCE with every commit whose rows it holds.

    Content and record chunks hold rows of many commits (a residues chunk: 256 sequences), so one
    bad chunk would otherwise be reported once per commit: hundreds of lines for one fault.
    """

    def __init__(self) -> None:
        self.bad: dict[tuple[str, int], tuple[str, list[int]]] = {}

    def read(self, store, name: str, lo: int, hi: int, commit: int | None) -> np.ndarray | None:
        """Rows lo..hi of `name`, read inner chunk by inner chunk so that a bad one is named exactly."""
        arr = store.root[name]
        step = arr.chunks[0]
        parts, whole = [], True
        for start in range(lo - lo % step, hi, step):
            idx = start // step
            known = self.bad.get((name, idx))
            if known is not None:
                known[1].append(commit)
                whole = False
                continue
            try:
                parts.append(arr[max(start, lo) : min(start + step, hi)])
            except _io_errors() + (ValueError, RuntimeError) as e:
                self.bad[(name, idx)] = (f"{store.path}: array {name!r} chunk {idx} (rows {start}..{start + step}) cannot be read: {e}", [commit])
                whole = False
        if not whole:
            return None
        return np.concatenate(parts) if parts else arr[lo:lo]

    def lines(self) -> list[str]:
        out = []
        for text, commits in self.bad.values():
            used = sorted({c for c in commits if c is not None})
            out.append(text + (f" (rows of {len(used)} commit{'s' * (len(used) > 1)}: {_spans(used)})" if used else ""))
        return out


def _spans(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8": a long list of commits in a few characters."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def verify_store(store) -> list[str]:
    """Every fault of `store` (an EmbeddingStore), or [] when it is complete and intact."""
    where = store.path
    faults: list[str] = []
    if store.location.is_local:  # opening refused these; checked again for a store changed since it was opened
        faults += [f"{where}: {f}" for f in local_file_faults(store.location.local_path)]
        if faults:  # reading through a symlink or from a FIFO is what must not happen: stop here
            return faults
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
    chunks = ChunkFaults()
    for name in names:
        for commit, (lo, hi) in enumerate(store.log.spans(name)):
            if hi <= lo:
                continue
            values = chunks.read(store, name, lo, hi, commit)
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
            if name == "tokens" and store._index.shards is not None:
                faults += _shard_faults(store, lo, values)
    return faults + chunks.lines()


def _shard_faults(store, lo: int, values) -> list[str]:
    """Each token shard of one commit's rows (starting at row `lo`) whose digest readers would refuse."""
    shards = store._index.shards
    first = lo // shards.rows
    got = shard_digests(values, lo, shards.rows)
    bad = [first + j for j in range(len(got)) if int(got[j]) != int(shards.expected[first + j])]
    return [f"{store.path}: token shard {s} (rows {shards.lo[s]}..{shards.hi[s]}, commit {shards.commit[s]}) does not match "
            f"its shard digest in the commit log" for s in bad]


def _verify_legacy(store) -> list[str]:
    """Schema 1 stores have no checksums: read every committed row back and report what fails."""
    chunks = ChunkFaults()
    for name in (*RECORD_ARRAYS, *CONTENT_ARRAYS, *TOKEN_INDEX_ARRAYS, "pooled", "tokens"):
        if name not in store.root:
            continue
        for lo, hi in store.log.spans(name) if name != "pooled" else [(0, store.committed.records)]:
            if hi > lo:
                chunks.read(store, name, lo, hi, None)
    faults = chunks.lines()
    faults.append(f"{store.path}: schema 1 store: chunks carry no checksums, so changed bytes cannot be detected; rebuild to get them")
    return faults
