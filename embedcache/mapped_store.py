"""A read-only LocalStore whose ranged reads are views of memory-mapped files, not copies.

A streamed training epoch reads ~1 MiB byte ranges (one inner chunk each) out of 32 MiB shard files.
zarr's `LocalStore` reads each range into a new bytes object: the kernel copies the page cache into
fresh memory, zarr checks the crc32c over that copy, then copies the rows once more into the batch.
Mapped, the range *is* the page cache: the crc32c and the copy into the batch read it in place, and
no chunk buffer is allocated, faulted in or freed. bench_fusion_data.py (2-core VM) measures it
against `LocalStore` side by side (the `stream-read` rows).

How a ranged read goes:
1. the shard file is mapped once and kept in a small LRU, keyed by path and checked against the
   file's inode, size and mtime on every read: a file replaced since (zarr writes by atomic rename)
   is mapped again, so a read never returns an old file's bytes;
2. the range is read ahead and its page tables filled (`load_range`: madvise WILLNEED, then
   MADV_POPULATE_READ) in zarr's thread pool, where `LocalStore` does its blocking reads: a cold
   range is read from disk there, not on zarr's event loop, and an I/O error comes back as an
   OSError (a StoreError to the caller) instead of a SIGBUS;
3. the buffer handed to zarr is a read-only view of the mapping; zarr decodes and copies out of it.

Whole-object reads (metadata, small arrays, whole shards in `embedcache verify`) stay `LocalStore`'s.
Linux only (MADV_POPULATE_READ, kernel 5.14+); elsewhere `open_location` keeps `LocalStore`. The one
caveat of any mapping: a file truncated in place while mapped raises SIGBUS on access; zarr and
embedcache never truncate in place (writes are atomic renames).

zarr-python ships no mapped store; its docs issue (zarr-developers/zarr-python#1245) sketches one as
a subclass of the local store, which is what this is.
"""

from __future__ import annotations

import asyncio
import functools
import mmap
import os
import sys
from collections import OrderedDict
from pathlib import Path

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # <linux/mman.h>; Python 3.11's mmap does not name it
MAX_MAPS = 64  # shard files kept mapped per store: 2 GiB of address space at 32 MiB shards, not memory


@functools.cache
def can_map() -> bool:
    """Whether this system populates mappings on request (Linux 5.14+): else reads stay copies."""
    if sys.platform != "linux":
        return False
    try:
        with mmap.mmap(-1, mmap.PAGESIZE) as probe:
            probe.madvise(MADV_POPULATE_READ, 0, mmap.PAGESIZE)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def byte_bounds(byte_range: ByteRequest, size: int) -> tuple[int, int]:
    """[start, stop) of a zarr byte request in a file of `size` bytes, clipped at its end as a read would be."""
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"unexpected byte_range, got {byte_range!r}")


def load_range(data: mmap.mmap, start: int, length: int) -> None:
    """Bring a mapped range into memory and into this process's page tables (blocking: run it in a thread).

    WILLNEED first: a cold range is then read from disk as one readahead of its whole length, not
    fault by fault in read-around steps of the device's read_ahead_kb (128 KiB by default); one
    thread's cold epochs, 60 genes, six alternating passes: 746 vs 718 MB/s without it, 664 with
    LocalStore's copies. POPULATE_READ then maps every page, so reading the view takes no page faults.
    """
    data.madvise(mmap.MADV_WILLNEED, start, length)
    data.madvise(MADV_POPULATE_READ, start, length)


class MappedLocalStore(LocalStore):
    """`LocalStore`, read-only, serving byte-range reads as views of mapped files (module docstring)."""

    def __init__(self, root: Path | str, *, read_only: bool = True, max_maps: int = MAX_MAPS) -> None:
        if not read_only:
            raise ValueError(f"MappedLocalStore({str(root)!r}) is read-only; write through LocalStore")
        super().__init__(root, read_only=True)
        self.max_maps = max_maps
        # key -> ((inode, size, mtime_ns), mapping); only zarr's event loop touches it
        self._maps: OrderedDict[str, tuple[tuple[int, int, int], mmap.mmap | bytes]] = OrderedDict()

    def with_read_only(self, read_only: bool = False) -> LocalStore:
        return MappedLocalStore(self.root, max_maps=self.max_maps) if read_only else LocalStore(self.root, read_only=False)

    def __getstate__(self) -> dict:  # mappings do not pickle; a copy maps its files again
        return {**self.__dict__, "_maps": OrderedDict()}

    def _mapping(self, key: str) -> mmap.mmap | bytes:
        """The file `key`, mapped (from the LRU when it is still the same file)."""
        path = self.root / key
        st = os.stat(path)
        seen = self._maps.get(key)
        if seen is not None and seen[0] == (st.st_ino, st.st_size, st.st_mtime_ns):
            self._maps.move_to_end(key)
            return seen[1]
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # the file actually opened, should it have been replaced since the stat
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
        self._maps[key] = ((st.st_ino, st.st_size, st.st_mtime_ns), data)
        self._maps.move_to_end(key)
        while len(self._maps) > self.max_maps:
            self._maps.popitem(last=False)  # unmapped once zarr drops its last view of it
        return data

    def _view(self, key: str, byte_range: ByteRequest) -> tuple[memoryview, tuple[mmap.mmap, int, int] | None]:
        """The requested bytes as a view, and the (mapping, start, length) to load before reading it (None when empty)."""
        data = self._mapping(key)
        start, stop = byte_bounds(byte_range, len(data))
        if stop <= start or not isinstance(data, mmap.mmap):
            return memoryview(b""), None
        first = start - start % mmap.PAGESIZE  # madvise takes page-aligned starts
        return memoryview(data)[start:stop], (data, first, stop - first)

    async def get(self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is None:
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        try:
            view, load = self._view(key, byte_range)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        if load is not None:
            await asyncio.to_thread(load_range, *load)
        return (prototype or default_buffer_prototype()).buffer.from_bytes(view)

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))
