"""Whole files written to a local disk past the page cache (O_DIRECT), for a build's token shards.

Why: a buffered write first gives every byte a page-cache page, and on a virtual machine the pages
the guest has not touched lately fault in from the host, so buffered writes range from a fraction
of the disk's speed to many times it with what the page cache held before; direct writes go at the
disk's own pace (benchmarks/README.md, bench_build_host). A build writes gigabytes it will not read
again soon, so caching them would only push out what was cached.

A file is written as zarr's LocalStore writes one: into `<name>.<uuid>.partial` beside it, renamed
over `<name>` when whole, so a reader never sees half a file. The buffer must start on a BLOCK
boundary (`aligned_empty`); its whole blocks go direct, the last partial block through the page
cache. A filesystem that refuses O_DIRECT (ramfs, tmpfs before Linux 6.6, some network and FUSE
filesystems) gets an ordinary buffered write, decided once per filesystem. `AVAILABLE` is False
where the platform has no O_DIRECT (macOS, Windows): callers then write as they would without this.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

BLOCK = 4096  # alignment of buffer, offsets and lengths: every Linux block device's logical block or a multiple of it
_O_DIRECT = getattr(os, "O_DIRECT", 0)
AVAILABLE = bool(_O_DIRECT) and fcntl is not None
_refused: set[int] = set()  # devices (st_dev) whose filesystem refused O_DIRECT


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` whose first byte sits on a BLOCK boundary."""
    raw = np.empty(nbytes + BLOCK, np.uint8)
    skip = -raw.ctypes.data % BLOCK
    return raw[skip : skip + nbytes]


def write_file(path: Path, data: np.ndarray) -> None:
    """Write `data` (contiguous uint8) as the file `path`, replacing it whole; past the page cache where the
    filesystem allows (needs AVAILABLE)."""
    if not AVAILABLE:
        raise RuntimeError("direct writes need O_DIRECT and fcntl, which this platform lacks (check AVAILABLE)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    view = memoryview(data).cast("B")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            done = 0
            if data.ctypes.data % BLOCK == 0 and _set_direct(fd, True):
                try:
                    done = _write_all(fd, view, 0, len(view) // BLOCK * BLOCK)
                except OSError as e:  # some filesystems take the flag and refuse the write: all of it buffered
                    if e.errno != errno.EINVAL:
                        raise
                    _refused.add(os.fstat(fd).st_dev)
                    done = 0
                _set_direct(fd, False)
            _write_all(fd, view, done, len(view))  # the last partial block (or all of it) through the page cache
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False where its filesystem refuses it (remembered per device)."""
    if on and os.fstat(fd).st_dev in _refused:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError as e:
        if not on or e.errno != errno.EINVAL:
            raise
        _refused.add(os.fstat(fd).st_dev)
        return False
    return True


def _write_all(fd: int, view: memoryview, start: int, end: int) -> int:
    """Write view[start:end] at offset `start`; returns `end`."""
    while start < end:  # a write may take fewer bytes than asked (a signal); direct ones in whole blocks
        n = os.pwrite(fd, view[start:end], start)
        if n == 0:
            raise OSError(errno.EIO, f"a write of {end - start} bytes wrote none")
        start += n
    return end
