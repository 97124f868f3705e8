"""Whole files written to a local disk past the page cache (O_DIRECT), for a build's token shards.

Why: a buffered write first gives every byte a page-cache page, and on a virtual machine the pages
the guest has not touched lately fault in from the host, so buffered writes range from a fraction
of the disk's speed to many times it with what the page cache held before; direct writes go at the
disk's own pace (benchmarks/README.md, bench_build_host). A build writes gigabytes it will not read
again soon, so caching them would only push out what was cached.

A file is written as zarr's LocalStore writes one: into `<name>.<uuid>.partial` beside it, renamed
over `<name>` when whole, so a reader never sees half a file. The buffer must start on a BLOCK
boundary (`aligned_empty`); its whole blocks go direct, the last partial block through the page
cache. Filesystems that refuse O_DIRECT (tmpfs, some network and FUSE filesystems) and systems
without it (macOS) get an ordinary buffered write, decided once per directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from pathlib import Path

import numpy as np

BLOCK = 4096  # alignment of buffer, offsets and lengths: every Linux block device's logical block or a multiple of it
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none
_refused: set[Path] = set()  # directories whose filesystem refused O_DIRECT


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` whose first byte sits on a BLOCK boundary."""
    raw = np.empty(nbytes + BLOCK, np.uint8)
    skip = -raw.ctypes.data % BLOCK
    return raw[skip : skip + nbytes]


def write_file(path: Path, data: np.ndarray) -> None:
    """Write `data` (contiguous uint8) as the file `path`, replacing it whole; O_DIRECT where the filesystem allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    direct = _O_DIRECT and path.parent not in _refused and data.ctypes.data % BLOCK == 0
    try:
        fd = _open(tmp, direct)
        if fd is None:  # refused: this directory's filesystem does not do O_DIRECT
            _refused.add(path.parent)
            direct, fd = False, _open(tmp, False)
        try:
            view = memoryview(data).cast("B")
            whole = 0
            if direct:
                whole = len(view) // BLOCK * BLOCK
                try:
                    _write_all(fd, view, 0, whole)
                except OSError as e:  # some filesystems take the flag at open and refuse the write
                    if e.errno != errno.EINVAL:
                        raise
                    _refused.add(path.parent)
                    whole = 0
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            _write_all(fd, view, whole, len(view))  # the last partial block (or all of it) through the page cache
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open(path: Path, direct: bool) -> int | None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | (_O_DIRECT if direct else 0)
    try:
        return os.open(path, flags, 0o666)
    except OSError as e:
        if direct and e.errno == errno.EINVAL:
            return None
        raise


def _write_all(fd: int, view: memoryview, start: int, end: int) -> None:
    while start < end:  # a write may take fewer bytes than asked (a signal, a full pipe); direct ones in whole blocks
        start += os.pwrite(fd, view[start:end], start)
