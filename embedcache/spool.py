"""The build's spool: every input record, streamed once into the store, read back by position.

Planning reads the inputs once and keeps only fixed-size numbers per record (digests, lengths,
positions); the residues themselves go here, so that memory does not grow with the sequences.
Workers (in this process or on a Dask cluster) read the sequences of their unit from the spool;
the records pass reads it in order. It lives in the store under `_spool/` (through zarr's store
layer, so it is wherever the store is: a local disk, S3, ...) and is deleted when the build ends.

Each entry is `id \\t source \\t residues \\n` in UTF-8; entries are packed into parts of up to
`PART_BYTES`; an entry's locator is (part, offset, length).
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

SPOOL_PREFIX = "_spool"
PART_BYTES = 64 << 20


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
        blob = f"{record_id}\t{source}\t{residues}\n".encode()
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


def _decode(blob: bytes) -> SpoolEntry:
    record_id, source, residues = blob.decode().rstrip("\n").split("\t", 2)
    return SpoolEntry(record_id, source, residues)


async def _read_ranges(store: Store, locators: np.ndarray) -> list[bytes]:
    async def one(part: int, offset: int, length: int) -> bytes:
        request: ByteRequest = RangeByteRequest(int(offset), int(offset) + int(length))
        buf = await store.get(_key(int(part)), prototype=default_buffer_prototype(), byte_range=request)
        if buf is None:
            raise FileNotFoundError(f"spool part {_key(int(part))} is missing")
        return buf.to_bytes()

    return list(await asyncio.gather(*(one(*loc) for loc in locators)))


def read_entries(store: Store, locators: np.ndarray) -> list[SpoolEntry]:
    """The entries at `locators` ((n, 3) int64: part, offset, length), concurrently."""
    return [_decode(b) for b in sync(_read_ranges(store, locators))]


def iter_entries(store: Store, n_parts: int) -> Iterator[SpoolEntry]:
    """Every entry, in the order written (one part in memory at a time)."""
    for part in range(n_parts):
        buf = sync(store.get(_key(part), prototype=default_buffer_prototype()))
        if buf is None:
            raise FileNotFoundError(f"spool part {_key(part)} is missing")
        for line in buf.to_bytes().splitlines(keepends=True):
            yield _decode(line)


async def _delete(store: Store) -> None:
    keys = [k async for k in store.list_prefix(f"{SPOOL_PREFIX}/")]
    await asyncio.gather(*(store.delete(k) for k in keys))


def delete_spool(store: Store) -> None:
    sync(_delete(store))
    if isinstance(store, LocalStore):  # object stores have no directories; a local disk keeps an empty one
        shutil.rmtree(store.root / SPOOL_PREFIX, ignore_errors=True)
