"""The commit log of a store: which rows count, and the checksums they were written with.

    _commits/            group; its attrs hold the HEAD: {"n": commits, "records": rows, "status", "builds", "log_crc"}
    _commits/ranges      (commit, 6) int64  record_start, record_end, content_start, content_end, token_start, token_end
    _commits/crc         (commit, array) int64  zlib.crc32 of each array's rows in that commit (CHECKED_ARRAYS order)
    _commits/shard_crc   (shard,) int64  the commit's token crc32 as it stood at the end of each token shard

A commit appends one row to `ranges` and `crc` (rewriting one 4,096-row chunk of each) and then
writes the head: the head is ONE metadata object, so a commit is atomic on local disk and on object
stores alike, and its cost stays flat however many commits came before. Rows past the head's `n`
do not count; a writer trims them. Readers validate the whole log against the arrays before use.

The head's `log_crc` chains a crc32 over the counted log rows, so a head edited to count fewer (or
other) commits than were written is refused instead of silently dropping committed records.
Stores written before it have no `log_crc`; their first new commit adds it.

`shard_crc` lets a reader check each token shard on its first read, alone: shard s's rows continue
the crc32 from shard s-1's entry (0 at its commit's first shard), and the commit's last shard ends
at the commit's own `tokens` crc, which ties the digests to the log. A swapped or replaced shard file,
each of its chunks' crc32c intact, is then refused by the read that touches it, not only by verify.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.core.sync import sync

from embedcache.errors import StoreError

COMMITS_GROUP = "_commits"
LOG_CHUNK = 4096
RANGE_FIELDS = ("record_start", "record_end", "content_start", "content_end", "token_start", "token_end")
# Arrays whose committed rows carry a crc32 per commit: record rows, content rows, token rows.
RECORD_ARRAYS = ("sequence", "content_index")
CONTENT_ARRAYS = ("content", "residues", "n_input_tokens", "n_cropped", "n_windows")
TOKEN_INDEX_ARRAYS = ("token_offset", "token_length")
CHECKED_ARRAYS = (*RECORD_ARRAYS, *CONTENT_ARRAYS, "pooled", *TOKEN_INDEX_ARRAYS, "tokens")
STATUSES = ("empty", "incomplete", "complete")
# Written into _commits' attrs by stores whose heads carry log_crc: from then on a head without it is refused.
LOG_DIGEST = "crc32 of the counted (ranges | crc) rows, row by row"
SHARD_CRC = "shard_crc"


@dataclass
class Head:
    """The commit point: how many commits and record rows count, and the store's status."""

    n: int = 0
    records: int = 0
    status: str = "empty"
    builds: list[dict] = field(default_factory=list)
    log_crc: int | None = 0  # see log_digest; None only for a store written before heads carried it

    def to_attrs(self) -> dict:
        head = {"n": self.n, "records": self.records, "status": self.status, "builds": self.builds}
        return {"head": head if self.log_crc is None else {**head, "log_crc": self.log_crc}}

    def with_status(self, status: str, builds: list[dict]) -> "Head":
        return Head(self.n, self.records, status, builds, self.log_crc)

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> "Head":
        head = attrs.get("head")
        if not isinstance(head, dict):
            raise StoreError(f"store {where!r} was not completely created (no commit head): run the build again")
        n, records, status, builds = head.get("n"), head.get("records"), head.get("status"), head.get("builds", [])
        log_crc = head.get("log_crc")
        if not (isinstance(n, int) and n >= 0 and isinstance(records, int) and records >= 0):
            raise StoreError(f"store {where!r}: the commit head is malformed (n={n!r}, records={records!r})")
        if log_crc is not None and not isinstance(log_crc, int):
            raise StoreError(f"store {where!r}: the commit head's log_crc is {log_crc!r}, expected an integer")
        if status not in STATUSES:
            raise StoreError(f"store {where!r}: the commit head has status {status!r}, expected one of {list(STATUSES)}")
        if not isinstance(builds, list):
            raise StoreError(f"store {where!r}: the commit head's builds is {type(builds).__name__}, expected a list")
        return cls(n, records, status, builds, log_crc)


def log_digest(ranges: np.ndarray, crc: np.ndarray, start: int = 0) -> int:
    """crc32 of log rows, each row's 6 ranges then its checksums (int64), continuing from `start`:
    appending rows continues the digest of the rows before them without reading those again."""
    rows = np.concatenate([np.asarray(ranges, "<i8"), np.asarray(crc, "<i8")], axis=1)  # little-endian on any machine
    return zlib.crc32(np.ascontiguousarray(rows).view(np.uint8).reshape(-1), start)


def shard_digests(block: np.ndarray, token_start: int, shard_rows: int) -> np.ndarray:
    """The crc32 of `block` (token rows from `token_start`) as it stands at the end of each shard it
    covers: (shards,) int64. The last one is the crc32 of the whole block (`crc_of`)."""
    data = np.ascontiguousarray(block).view(np.uint8).reshape(len(block), -1)
    cuts = list(range(-(-token_start // shard_rows) * shard_rows, token_start + len(block), shard_rows))
    bounds = sorted({0, *(c - token_start for c in cuts if c > token_start), len(block)})
    digests, crc = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        crc = zlib.crc32(data[lo:hi].reshape(-1), crc)
        digests.append(crc)
    return np.asarray(digests, np.int64)


@dataclass(frozen=True)
class TokenShards:
    """Per token shard: the committed rows it holds and the digest they must give (see shard_crc).

    Built on open from the validated log: unused shards (between commits) have lo == hi."""

    rows: int  # token rows per shard
    lo: np.ndarray
    hi: np.ndarray
    start: np.ndarray  # the crc32 the shard's rows continue from
    expected: np.ndarray
    commit: np.ndarray

    def covering(self, spans) -> set[int]:
        """Shards holding committed rows of the (lo, hi) token spans."""
        out: set[int] = set()
        for lo, hi in spans:
            if hi > lo:
                out.update(s for s in range(lo // self.rows, (hi - 1) // self.rows + 1) if self.hi[s] > self.lo[s])
        return out

    def fault(self, s: int, values: np.ndarray, where: str) -> str | None:
        """Why shard s's committed rows `values` (all layers) are not those its commit wrote, or None."""
        got = zlib.crc32(np.ascontiguousarray(values).view(np.uint8).reshape(-1), int(self.start[s]))
        if got == int(self.expected[s]):
            return None
        return (f"store {where!r}: token shard {s} (rows {self.lo[s]}..{self.hi[s]}, commit {self.commit[s]}) does not hold "
                f"the rows its commit wrote (crc32 {got}, committed {int(self.expected[s])}): a shard file was replaced or "
                f"changed after the build")


def token_shards(log: CommitLog, shard_rows: int, where: str) -> TokenShards | None:
    """The shard map of a store's tokens, after checking each commit's last shard digest against the
    commit's tokens crc (which log_crc covers). None for a store written before shard digests."""
    if log.shard_crc is None:
        return None
    n = -(-log.token_end // shard_rows)
    if len(log.shard_crc) < n:
        raise StoreError(f"store {where!r}: the commit log holds {len(log.shard_crc)} shard digests, its token rows span {n} shards; "
                         f"the commit log was edited or damaged (run embedcache verify)")
    lo, hi = np.zeros(n, np.int64), np.zeros(n, np.int64)
    start, commit = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    expected = np.asarray(log.shard_crc[:n], np.int64)
    column = CHECKED_ARRAYS.index("tokens")
    for i, (t0, t1) in enumerate(log.spans("tokens")):
        if t1 <= t0:
            continue
        first, last = t0 // shard_rows, (t1 - 1) // shard_rows
        if int(expected[last]) != int(log.crc[i, column]):
            raise StoreError(f"store {where!r}: commit {i}'s last token shard digest ({int(expected[last])}) is not its tokens "
                             f"checksum ({int(log.crc[i, column])}); the commit log was edited or damaged (run embedcache verify)")
        shards = np.arange(first, last + 1)
        lo[shards] = np.maximum(shards * shard_rows, t0)
        hi[shards] = np.minimum((shards + 1) * shard_rows, t1)
        start[first + 1 : last + 1] = expected[first:last]
        commit[shards] = i
    return TokenShards(shard_rows, lo, hi, start, expected, commit)


def create_log(root: zarr.Group) -> None:
    """The empty log. Its head is written last by `create_store`: until then the store does not exist."""
    group = root.create_group(COMMITS_GROUP)
    group.create_array("ranges", shape=(0, len(RANGE_FIELDS)), chunks=(LOG_CHUNK, len(RANGE_FIELDS)), dtype="int64",
                       dimension_names=("commit", "field"))
    group.create_array("crc", shape=(0, len(CHECKED_ARRAYS)), chunks=(LOG_CHUNK, len(CHECKED_ARRAYS)), dtype="int64",
                       dimension_names=("commit", "array"))
    create_shard_log(group)
    group.attrs.update({"fields": list(RANGE_FIELDS), "crc_arrays": list(CHECKED_ARRAYS), "log_digest": LOG_DIGEST})


def create_shard_log(group: zarr.Group) -> zarr.Array:
    return group.create_array(SHARD_CRC, shape=(0,), chunks=(LOG_CHUNK,), dtype="int64", dimension_names=("shard",))


def crc_of(values: np.ndarray) -> int:
    """crc32 of an array's values as stored: raw bytes for numbers, NUL-joined UTF-8 for strings.

    Ids may hold a NUL, which would make joining ambiguous (["a\0b"] and ["a", "b"]): then each value
    is prefixed with its byte length instead. Values without a NUL keep the joined form stores were
    written with."""
    if values.dtype.kind in "OUT":
        texts = list(map(str, values.tolist()))
        if any("\0" in t for t in texts):
            encoded = [t.encode() for t in texts]
            return zlib.crc32(b"".join(len(b).to_bytes(8, "little") + b for b in encoded))
        return zlib.crc32("\0".join(texts).encode())
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8).reshape(-1))


@dataclass(frozen=True)
class CommitLog:
    """The validated log as read: head, and (n, 6) ranges and (n, A) crcs of the counted commits."""

    head: Head
    ranges: np.ndarray
    crc: np.ndarray
    shard_crc: np.ndarray | None = None  # (shards,) as stored; None for a store written before shard digests

    @property
    def content_end(self) -> int:
        return int(self.ranges[:, 3].max()) if len(self.ranges) else 0

    @property
    def token_end(self) -> int:
        return int(self.ranges[:, 5].max()) if len(self.ranges) else 0

    def committed_content(self, n_content: int) -> np.ndarray:
        """(n_content,) bool: the content rows some commit wrote."""
        mask = np.zeros(n_content, bool)
        for _, _, c0, c1, _, _ in self.ranges:
            mask[c0:c1] = True
        return mask

    def spans(self, name: str) -> list[tuple[int, int]]:
        """(lo, hi) of the rows of array `name` that each commit wrote, in commit order."""
        start = 0 if name in RECORD_ARRAYS else 4 if name == "tokens" else 2
        return [(lo, hi) for lo, hi in self.ranges[:, start : start + 2].tolist()]

    def first_changed(self, name: str, values: np.ndarray) -> tuple[int, int, int] | None:
        """(commit, lo, hi) of the first commit whose rows of array `name` no longer give the crc32 they
        were committed with; `values` holds the array's rows from 0 to the end of the last commit's."""
        column = CHECKED_ARRAYS.index(name)
        for i, (lo, hi) in enumerate(self.spans(name)):
            if hi > lo and crc_of(values[lo:hi]) != int(self.crc[i, column]):
                return i, lo, hi
        return None

    def check_rows(self, name: str, values: np.ndarray, where: str) -> None:
        """Refuse rows of `name` that some commit did not write as they are now (see first_changed)."""
        changed = self.first_changed(name, values)
        if changed is not None:
            i, lo, hi = changed
            raise StoreError(
                f"store {where!r}: array {name!r} rows {lo}..{hi} (commit {i}) do not match the checksum they were "
                f"committed with: the data was changed after the build (run embedcache verify)"
            )


def read_log(root: zarr.Group, where: str) -> CommitLog:
    """Read the log, checking its own shape and ranges (not yet against the data arrays)."""
    try:
        group = root[COMMITS_GROUP]
    except KeyError:
        raise StoreError(f"store {where!r} was not completely created (no commit log {COMMITS_GROUP}/): run the build again") from None
    attrs = dict(group.attrs)
    head = Head.from_attrs(attrs, where)
    ranges_arr, crc_arr = group["ranges"], group["crc"]
    if ranges_arr.shape[0] < head.n or crc_arr.shape[0] < head.n or ranges_arr.shape[1:] != (len(RANGE_FIELDS),) \
            or crc_arr.shape[1:] != (len(CHECKED_ARRAYS),):
        raise StoreError(
            f"store {where!r}: the commit head counts {head.n} commits but the log holds "
            f"{ranges_arr.shape} ranges and {crc_arr.shape} checksums"
        )
    ranges = ranges_arr[: head.n] if head.n else np.zeros((0, len(RANGE_FIELDS)), np.int64)
    crc = crc_arr[: head.n] if head.n else np.zeros((0, len(CHECKED_ARRAYS)), np.int64)
    _check_ranges(ranges, head, where)
    shard_crc = group[SHARD_CRC][:] if SHARD_CRC in group else None
    digest = log_digest(ranges, crc)
    if head.log_crc is None and "log_digest" in attrs:
        raise StoreError(f"store {where!r}: the commit head has no log_crc, which this store's heads carry; the head was edited")
    if head.log_crc is not None and head.log_crc != digest:
        raise StoreError(
            f"store {where!r}: the commit head (n={head.n}, records={head.records}) does not match the {head.n} log rows it "
            f"counts (log_crc {head.log_crc}, rows give {digest}): the log or its head was edited or rewound; nothing is "
            f"read or written until it is repaired (run embedcache verify)"
        )
    # A store from before log_crc gets it with its next head.
    return CommitLog(Head(head.n, head.records, head.status, head.builds, digest), ranges, crc, shard_crc)


def _check_ranges(ranges: np.ndarray, head: Head, where: str) -> None:
    def bad(i: int, why: str) -> StoreError:
        row = dict(zip(RANGE_FIELDS, ranges[i].tolist()))
        return StoreError(f"store {where!r}: commit {i} {row} {why}; the commit log was edited or damaged (run embedcache verify)")

    r0, r1, c0, c1, t0, t1 = ranges.T
    broken = np.flatnonzero((ranges.min(1) < 0) | (r1 < r0) | (c1 < c0) | (t1 < t0))
    if len(broken):
        raise bad(int(broken[0]), "has a negative or reversed range")
    expected_start = np.concatenate([[0], r1[:-1]])  # records are appended: each commit starts where the last ended
    gap = np.flatnonzero(r0 != expected_start)
    if len(gap):
        i = int(gap[0])
        raise bad(i, f"starts at record {r0[i]}, but the commits before it end at {expected_start[i]}")
    covered = int(r1[-1]) if len(ranges) else 0
    if covered != head.records:
        raise StoreError(f"store {where!r}: the commits cover {covered} records, the head says {head.records}")
    for lo, hi, name in ((2, 3, "content"), (4, 5, "token")):
        order = np.argsort(ranges[:, lo], kind="stable")
        spans = ranges[order][:, [lo, hi]]
        spans = spans[spans[:, 1] > spans[:, 0]]
        if len(spans) > 1 and (spans[1:, 0] < spans[:-1, 1]).any():
            raise StoreError(f"store {where!r}: two commits claim the same {name} rows; the commit log was edited or damaged")


def append_commit(root: zarr.Group, head: Head, row: tuple[int, ...], crc: list[int], shards: list[tuple[int, np.ndarray]] = ()) -> Head:
    """Write one commit: its log row first, then the head (the single write that makes it count)."""
    return append_commits(root, head, [row], [crc], shards)


def append_commits(root: zarr.Group, head: Head, rows: list[tuple[int, ...]], crcs: list[list[int]],
                   shards: list[tuple[int, np.ndarray]] = ()) -> Head:
    """Write several log rows (e.g. the units that finished together), then ONE head for all of them.

    `shards`: (first shard, shard_digests) of each commit that wrote token rows. Returns the new head.
    Cost: the log chunks the rows fall in and one head object, whatever `head.n`.
    """
    group = root[COMMITS_GROUP]
    n, k = head.n, len(rows)

    async def write_log() -> None:
        await asyncio.gather(_write_rows(group, "ranges", n, np.asarray(rows, np.int64)),
                             _write_rows(group, "crc", n, np.asarray(crcs, np.int64)), _write_shards(group, shards))

    sync(write_log())
    digest = log_digest(np.asarray(rows, np.int64), np.asarray(crcs, np.int64), head.log_crc or 0)
    new = Head(n + k, int(rows[-1][1]), "incomplete", head.builds, digest)
    write_head(root, new)
    return new


def write_shard_digests(root: zarr.Group, shards: list[tuple[int, np.ndarray]]) -> None:
    """Write (first shard, shard_digests) entries alone: for commits already counted (see StoreWriter)."""
    sync(_write_shards(root[COMMITS_GROUP], shards))


async def _write_shards(group: zarr.Group, shards: list[tuple[int, np.ndarray]]) -> None:
    for first, digests in shards:  # one after another: each may grow the same array
        await _write_rows(group, SHARD_CRC, first, np.asarray(digests, np.int64))


async def _write_rows(group: zarr.Group, name: str, at: int, values: np.ndarray) -> None:
    arr = await group._async_group.getitem(name)
    end = at + len(values)
    if arr.shape[0] < end:  # grown ahead in whole chunks; rows past the head never count
        await arr.resize((max(end, (end // LOG_CHUNK + 1) * LOG_CHUNK), *arr.shape[1:]))
        arr = await group._async_group.getitem(name)
    await arr.setitem(slice(at, end), values)


def write_head(root: zarr.Group, head: Head) -> None:
    group = root[COMMITS_GROUP]
    extra = {"log_digest": LOG_DIGEST} if "log_digest" not in group.attrs else {}  # a store from before log_crc: from now on
    group.attrs.update({**head.to_attrs(), **extra})


def trim_log(root: zarr.Group, head: Head) -> None:
    """Drop log rows past the head (left by a build killed between writing them and the head)."""
    group = root[COMMITS_GROUP]
    for name in ("ranges", "crc"):
        arr = group[name]
        if arr.shape[0] != head.n:
            arr.resize((head.n, arr.shape[1]))
