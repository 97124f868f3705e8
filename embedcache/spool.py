"""The build's spool: every input record, streamed once into the store, read back by position.

Planning reads the inputs once and keeps only fixed-size numbers per record (digests, lengths,
positions); the residues themselves go here, so that memory does not grow with the sequences.
Workers (in this process or on a Dask cluster) read the sequences of their unit from the spool;
the records pass reads it in order. It lives in the store under `_spool/` (through zarr's store
layer, so it is wherever the store is: a local disk, S3, ...) and is deleted when the build ends.

Each entry is binary, so that no byte of an id, a file name or a sequence (a tab, a newline, a NUL)
can move a field: a header of four little-endian integers (the byte lengths of the id, the source
and the residues as uint64, and the crc32 of those bytes as uint32), then the three fields, each
UTF-8 with `surrogatepass` (a file name that is not valid UTF-8 reaches Python as lone surrogates,
and round-trips). Entries are packed into parts of up to `PART_BYTES`; an entry's locator is (part,
offset, length). Every read checks the lengths and the crc32, so a damaged or truncated part is an
error naming it, never a shifted record. The spool is rewritten by every build, so such an error
goes away when the build runs again.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from zarr.abc.store import RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from embedcache.errors import SpoolError

SPOOL_PREFIX = "_spool"
PART_BYTES = 64 << 20
GAP = 64 << 10  # entries closer than this in a part are read by one request: a request costs about as much
MAX_REQUEST = 8 << 20  # bytes one request may span, so a unit's scattered entries never pull a whole part
_HEADER = struct.Struct("<QQQI")  # id, source, residues: byte lengths; crc32 of the three fields' bytes
_ENCODING, _ERRORS = "utf-8", "surrogatepass"  # any Python str round-trips, lone surrogates included


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    id: str
    source: str
    residues: str


def _key(part: int) -> str:
    return f"{SPOOL_PREFIX}/part-{part:06d}"


class SpoolWriter:
    """Appends entries, one part object at a time; `locate()` is each entry's (part, offset, length)."""

    def __init__(self, store: Store):
        self.store = store
        self.part = 0
        self.buffer = bytearray()

    def append(self, record_id: str, source: str, residues: str) -> tuple[int, int, int]:
        blob = encode_entry(record_id, source, residues)
        if self.buffer and len(self.buffer) + len(blob) > PART_BYTES:
            self.flush()
        offset = len(self.buffer)
        self.buffer += blob
        return self.part, offset, len(blob)

    def flush(self) -> None:
        if self.buffer:
            sync(self.store.set(_key(self.part), default_buffer_prototype().buffer.from_bytes(bytes(self.buffer))))
            self.part += 1
            self.buffer = bytearray()


def encode_entry(record_id: str, source: str, residues: str) -> bytes:
    """One entry: the header, then the three fields (module docstring)."""
    fields = [f.encode(_ENCODING, _ERRORS) for f in (record_id, source, residues)]
    body = b"".join(fields)
    return _HEADER.pack(*map(len, fields), zlib.crc32(body)) + body


def _decode_at(data: bytes | memoryview, offset: int, where: str) -> tuple[SpoolEntry, int]:
    """The entry starting at `offset` of `data` and the offset after it; `where` names the part in errors."""
    if offset + _HEADER.size > len(data):
        raise SpoolError(f"spool {where}: entry at byte {offset} is cut short ({len(data) - offset} bytes, its header alone is {_HEADER.size})")
    n_id, n_source, n_residues, crc = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    end = start + n_id + n_source + n_residues
    if end > len(data):
        raise SpoolError(f"spool {where}: entry at byte {offset} claims {end - start} bytes of fields, but only {len(data) - start} follow")
    body = bytes(data[start:end])
    if zlib.crc32(body) != crc:
        raise SpoolError(f"spool {where}: entry at byte {offset} does not match its crc32 (the spool was changed or damaged)")
    a, b = n_id, n_id + n_source
    text = [body[:a], body[a:b], body[b:]]
    return SpoolEntry(*(t.decode(_ENCODING, _ERRORS) for t in text)), end


def _decode(blob: bytes, where: str) -> SpoolEntry:
    """Exactly one entry: a locator whose length is not one whole entry is an error, not a partial read."""
    entry, end = _decode_at(blob, 0, where)
    if end != len(blob):
        raise SpoolError(f"spool {where}: the entry is {end} bytes, its locator says {len(blob)}")
    return entry


def _missing(key: str) -> str:
    # The build wrote every part before any unit ran: a part this process cannot find is in a store it
    # does not see as the build does (a worker on another machine, a path that is not shared), or was
    # removed by another build. Running the same command again cannot help with the first.
    return (f"spool part {key} is missing: every worker must see the store the build writes (a shared filesystem "
            f"or object storage, not a path local to one machine or a memory:// store)")


async def _read_ranges(store: Store, locators: np.ndarray) -> list[tuple[bytes, str]]:
    """The bytes of each locator's entry (and where they are, for errors), in the order of `locators`:
    entries whose bytes lie within GAP of each other in one part are fetched by one request (of at most
    MAX_REQUEST bytes, or one entry)."""
    async def one(part: int, start: int, end: int) -> bytes:
        buf = await store.get(_key(part), prototype=default_buffer_prototype(), byte_range=RangeByteRequest(start, end))
        if buf is None:
            raise SpoolError(_missing(_key(part)))
        return buf.to_bytes()

    part, offset, length = (locators[:, i].astype(np.int64) for i in range(3))
    order = np.lexsort((offset, part)).tolist()
    part, offset, end = part.tolist(), offset.tolist(), (offset + length).tolist()
    groups: list[list[int]] = []  # runs of entries, in (part, offset) order, read by one request each
    reach = 0  # the end of the last group's bytes
    for i in order:
        if groups and part[i] == part[groups[-1][0]] and offset[i] - reach < GAP and end[i] - offset[groups[-1][0]] <= MAX_REQUEST:
            groups[-1].append(i)
        else:
            groups.append([i])
        reach = max(reach, end[i]) if len(groups[-1]) > 1 else end[i]
    blobs = await asyncio.gather(*(one(part[g[0]], offset[g[0]], max(end[i] for i in g)) for g in groups))
    out: list[tuple[bytes, str] | None] = [None] * len(order)
    for g, blob in zip(groups, blobs):
        first = offset[g[0]]
        for i in g:
            out[i] = (blob[offset[i] - first : end[i] - first], f"{_key(part[i])} bytes {offset[i]}..{end[i]}")
    return out  # type: ignore[return-value]


def read_entries(store: Store, locators: np.ndarray) -> list[SpoolEntry]:
    """The entries at `locators` ((n, 3) int64: part, offset, length), in their order."""
    if len(locators) == 0:
        return []
    return [_decode(blob, where) for blob, where in sync(_read_ranges(store, np.asarray(locators)))]


def iter_entries(store: Store, n_parts: int) -> Iterator[SpoolEntry]:
    """Every entry, in the order written (one part in memory at a time)."""
    for part in range(n_parts):
        buf = sync(store.get(_key(part), prototype=default_buffer_prototype()))
        if buf is None:
            raise SpoolError(_missing(_key(part)))
        data, offset = memoryview(buf.to_bytes()), 0
        while offset < len(data):
            entry, offset = _decode_at(data, offset, _key(part))
            yield entry


async def _delete(store: Store) -> None:
    keys = [k async for k in store.list_prefix(f"{SPOOL_PREFIX}/")]
    await asyncio.gather(*(store.delete(k) for k in keys))


def delete_spool(store: Store) -> None:
    sync(_delete(store))
    if isinstance(store, LocalStore):  # object stores have no directories; a local disk keeps an empty one
        shutil.rmtree(store.root / SPOOL_PREFIX, ignore_errors=True)
