"""A read-only LocalStore whose ranged reads are views of memory-mapped files, not copies.

A streamed training epoch reads ~1 MiB byte ranges (one inner chunk each) out of 32 MiB shard files.
zarr's `LocalStore` reads each range into a new bytes object: the kernel copies the page cache into
fresh memory, zarr checks the crc32c over that copy, then copies the rows once more into the batch.
Mapped, the range *is* the page cache: the crc32c and the copy into the batch read it in place, and
no chunk buffer is allocated, faulted in or freed. bench_fusion_data.py (2-core VM) measures it
against `LocalStore` side by side (the `stream-read` rows).

How a ranged read goes, all on the event loop that runs the read (zarr's, or the reading thread's
own: `embedcache.reader.run_reads`):
1. the shard file is mapped once and kept in a small LRU, keyed by path and checked against the
   file's inode, size and mtime on every read: a file replaced since (zarr writes by atomic rename)
   is mapped again, so a read does not return an old file's bytes;
2. zarr gets a read-only view of the range, checks its crc32c and copies the rows into the batch
   straight from it; a page not yet in memory is read there, with the kernel's readahead for mappings.
(Handing reads to a thread pool, or madvise before them, measured slower; the history is in git.)

Whole-object reads (metadata, small arrays, whole shards in `embedcache verify`) are plain reads in
zarr's thread pool, as `LocalStore`'s are.

A local store may hold only regular files (docs/reliability.md): opening a store refuses one holding a
symlink or a FIFO (`embedcache.location.check_local_files`), and every read here opens its file
without following a symlink at any step (`open_regular`: each directory opened relative to the last
with O_NOFOLLOW), so a symlink made after the store was opened is refused too, naming it, instead of
serving another file's bytes (another store's shard, /etc/passwd) as the store's.
Linux only (where it is measured), and `EMBEDCACHE_MMAP=0` turns it off (say, for a network
filesystem that maps badly); otherwise `open_location` keeps `LocalStore`. What any memory
mapping implies (np.memmap, and the Arrow files of HF `datasets`, do the same): a disk error while a
page is read, or a file truncated in place while mapped, is a SIGBUS rather than an exception (the
CLIs enable `faulthandler`, so the stacks are printed); zarr and embedcache never truncate in place.

zarr-python ships no mapped store; its docs issue (zarr-developers/zarr-python#1245) sketches one as
a subclass of the local store, which is what this is.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from embedcache.errors import StoreError

MAX_MAPS = 64  # shard files kept mapped per store: 2 GiB of address space at 32 MiB shards, not memory


def can_map() -> bool:
    """Whether local stores are read mapped here: on Linux, where this is measured and tested, unless EMBEDCACHE_MMAP=0."""
    return sys.platform == "linux" and os.environ.get("EMBEDCACHE_MMAP", "1") != "0"


def byte_bounds(byte_range: ByteRequest, size: int) -> tuple[int, int]:
    """[start, stop) of a zarr byte request in a file of `size` bytes, clipped at its end as a read would be."""
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"unexpected byte_range, got {byte_range!r}")


def file_identity(st: os.stat_result) -> tuple[int, int, int]:
    """(inode, size, mtime_ns): what changes when a file is replaced or rewritten."""
    return st.st_ino, st.st_size, st.st_mtime_ns


# POSIX flags (this store is used on Linux only, `can_map`; the module still imports elsewhere)
_NO_FOLLOW = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; fstat refuses it after.
_FILE_FLAGS = _NO_FOLLOW | getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = _NO_FOLLOW | getattr(os, "O_DIRECTORY", 0)

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def file_kind(mode: int) -> str:
    """What a file that is neither regular nor a directory is, in words ("a symlink", "a FIFO", ...)."""
    return "a symlink" if stat.S_ISLNK(mode) else _KINDS.get(stat.S_IFMT(mode), f"of mode {stat.filemode(mode)}")


def link_target(path: str | Path) -> str:
    """Where a symlink points, for messages."""
    try:
        return os.readlink(path)
    except OSError as e:  # replaced again since: say what went wrong rather than fail to say anything
        return f"? ({e.strerror})"


def _refusal(root: Path, key: str) -> StoreError | None:
    """The first component of `key` under `root` that is a symlink, a FIFO, a socket or a device, as the
    error to raise; None when there is none (a missing file, or a file where a directory belongs, is
    zarr's "no such key", not this)."""
    path = root
    for i, part in enumerate(parts := key.split("/")):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            what = f"a symlink (-> {link_target(path)})" if stat.S_ISLNK(mode) else file_kind(mode)
            return StoreError(f"store {str(root)!r}: {'/'.join(parts[: i + 1])} is {what}; a local store may hold only "
                              f"regular files, and its reads follow no symlink")
    return None


def open_regular(root: Path, key: str) -> int:
    """A read-only descriptor of the regular file `key` under `root`, reached without following a symlink.

    Every directory on the way is opened relative to the last with O_NOFOLLOW, so a symlink anywhere
    inside the store (`tokens/c -> /elsewhere`, or the file itself) is refused, not read through, even
    one made after the store was opened and checked. The store's root itself may be a symlink.
    A missing key is FileNotFoundError (or IsADirectoryError / NotADirectoryError), as zarr's
    LocalStore raises; a symlink, FIFO, socket or device is StoreError naming it.
    """
    parts = key.split("/")
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        child = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP (a symlink), ENOTDIR (a symlink or a file where a directory belongs), ...
        refused = _refusal(root, key)
        if refused is not None:
            raise refused from e
        raise
    finally:
        os.close(fd)
    mode = os.fstat(child).st_mode
    if not stat.S_ISREG(mode):
        os.close(child)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{key} is a directory")
        raise _refusal(root, key) or StoreError(f"store {str(root)!r}: {key} is {file_kind(mode)}; a local store may hold only regular files")
    return child


def read_regular(root: Path, key: str) -> bytes:
    """The whole file `key` under `root`, read without following a symlink (`open_regular`)."""
    with os.fdopen(open_regular(root, key), "rb") as f:
        return f.read()


class MappedLocalStore(LocalStore):
    """`LocalStore`, read-only, serving byte-range reads as views of mapped files (module docstring)."""

    def __init__(self, root: Path | str, *, read_only: bool = True, max_maps: int = MAX_MAPS) -> None:
        if not read_only:
            raise ValueError(f"MappedLocalStore({str(root)!r}) is read-only; write through LocalStore")
        super().__init__(root, read_only=True)
        self.max_maps = max_maps
        # key -> ((inode, size, mtime_ns), mapping); batch threads reading on loops of their own
        # (embedcache.reader.run_reads) share it, under the lock
        self._maps: OrderedDict[str, tuple[tuple[int, int, int], mmap.mmap | bytes]] = OrderedDict()
        self._lock = threading.Lock()

    async def _open(self, *, mode=None) -> None:
        # Batch threads may each make the first read at once, on loops of their own (run_reads): the
        # first opens the store, the others find it open (zarr's own check-then-set would tell them
        # "store is already open").
        with self._lock:
            if not self._is_open:
                await super()._open(mode=mode)

    def with_read_only(self, read_only: bool = False) -> LocalStore:
        return MappedLocalStore(self.root, max_maps=self.max_maps) if read_only else LocalStore(self.root, read_only=False)

    def __getstate__(self) -> dict:  # mappings and locks do not pickle; a copy maps its files again
        return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _maps=OrderedDict(), _lock=threading.Lock())

    def mapped(self, key: str) -> mmap.mmap | bytes:
        """The file `key`, mapped (from the LRU when it is still the same file); b"" for an empty file."""
        path = self.root / key
        with self._lock:
            seen = self._maps.get(key)
            # lstat: a file replaced by a symlink (even to itself, moved away) is another file, opened anew and refused
            if seen is not None and seen[0] == file_identity(os.lstat(path)):
                self._maps.move_to_end(key)
                return seen[1]
            with os.fdopen(open_regular(self.root, key), "rb") as f:
                identity = file_identity(os.fstat(f.fileno()))  # the file actually opened, should it have been replaced since
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if identity[1] else b""
            self._maps[key] = (identity, data)
            self._maps.move_to_end(key)
            while len(self._maps) > self.max_maps:
                self._maps.popitem(last=False)  # unmapped once zarr drops its last view of it
            return data

    async def get(self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        if byte_range is None:  # a whole object (metadata, a small array's chunk): read in zarr's thread pool, as LocalStore does
            try:
                data = await asyncio.to_thread(read_regular, self.root, key)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            return (prototype or default_buffer_prototype()).buffer.from_bytes(data)
        try:  # no hand-off to zarr's thread pool: a view costs a stat (module docstring)
            data = self.mapped(key)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        start, stop = byte_bounds(byte_range, len(data))
        return (prototype or default_buffer_prototype()).buffer.from_bytes(memoryview(data)[start:stop])

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))
