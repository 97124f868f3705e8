"""Keep glibc's malloc from handing chunk buffers back to the kernel between reads.

zarr reads each chunk into a new bytes object (~1 MiB for per-token rows) and frees it once the
chunk is decoded. glibc serves that size from a heap, but gives the free memory at the top of a heap
back to the kernel once it exceeds the trim threshold, which glibc's dynamic rule sets to twice the
largest buffer freed so far: ~2 MiB here, less than the ~10 chunk buffers a batch keeps in flight.
Each read then faults its buffer's pages in again, and a streamed epoch spends more time in the
kernel than in Python.

`keep_freed_memory()` sets both thresholds to the state glibc's own dynamic rule reaches after one
32 MiB buffer is freed: buffers up to 32 MiB (its maximum on 64-bit) come from the heaps, and up to
64 MiB of free memory stays at the top of each heap for the next reads (`--workers` processes inherit
it). bench_fusion_data.py's *-default-malloc rows measure the difference (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, the highest its dynamic rule goes
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what the dynamic rule pairs with it

# a user's own settings win: glibc reads these at start-up, and mallopt would overwrite them
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def is_glibc() -> bool:
    """Whether this process runs on glibc (the C library's own answer, not a scan of the executable)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (musl, macOS)
        return False


def startup_environment() -> dict[str, str]:
    """The environment this process started with: what glibc read its malloc settings from.

    Not os.environ, which also holds later changes that glibc never sees: dask's Nanny, for one, puts
    its own MALLOC_TRIM_THRESHOLD_ there for the workers it spawns.
    """
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:  # no /proc: os.environ is the best guess
        return dict(os.environ)
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc malloc's thresholds so freed chunk buffers are reused, not faulted in again; once per process.

    True when set. False, changing nothing, on other C libraries (macOS, musl) or when the process
    started with malloc tuned already (MALLOC_*_ variables, or glibc.malloc in GLIBC_TUNABLES). Forked
    processes (DataLoader workers) inherit the setting.
    """
    if not is_glibc():
        return False
    environ = startup_environment()
    if any(v in environ for v in _USER_SETTINGS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already uses
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
