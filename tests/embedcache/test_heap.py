"""keep_freed_memory: glibc reuses freed chunk-sized read buffers instead of faulting their pages in again.

Each case runs in a fresh interpreter: malloc's thresholds are per process and cannot be unset.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from embedcache.heap import is_glibc

pytestmark = pytest.mark.skipif(not is_glibc(), reason="tunes glibc's malloc only")

ROUNDS, BUFFERS, MIB = 40, 10, 1 << 20
PAGES_READ = ROUNDS * BUFFERS * MIB // os.sysconf("SC_PAGE_SIZE")

# what a streamed batch does to memory: ~10 chunks of 1 MiB read in zarr's reader thread, decoded, freed
READS = f"""
import os, resource, sys, threading
from embedcache.heap import keep_freed_memory
if sys.argv[1] == "keep-after-dask":  # what dask's Nanny does before it spawns a worker: glibc never sees it here
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
kept = keep_freed_memory() if sys.argv[1].startswith("keep") else None

def read_chunks():
    with open(sys.argv[2], "rb") as f:
        for _ in range({ROUNDS}):
            chunks = []
            for i in range({BUFFERS}):
                f.seek(i * {MIB})
                chunks.append(f.read({MIB}))
            del chunks

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
reader = threading.Thread(target=read_chunks)
reader.start()
reader.join()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(tmp_path, mode: str, **env: str) -> tuple[str, int]:
    chunks = tmp_path / "chunks.bin"
    if not chunks.exists():
        chunks.write_bytes(os.urandom(BUFFERS * MIB))
    # glibc's defaults unless a case sets its own (this process's os.environ may hold dask's MALLOC_TRIM_THRESHOLD_)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", READS, mode, str(chunks)], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept, int(faults)


def test_freed_chunk_buffers_are_reused_not_faulted_in_again(tmp_path):
    kept, faults = page_faults(tmp_path, "keep")
    assert kept == "True"
    assert faults < PAGES_READ / 10, f"{faults} page faults for {PAGES_READ} pages read"  # ~2,600 vs ~102,000 here


def test_the_default_heap_is_what_it_fixes(tmp_path):
    """The cost it removes, on this machine's glibc: most pages of every read faulted in again."""
    _, faults = page_faults(tmp_path, "default")
    _, kept_faults = page_faults(tmp_path, "keep")
    assert faults > 5 * kept_faults, (faults, kept_faults)


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_a_users_own_malloc_settings_are_left_alone(tmp_path, env):
    kept, faults = page_faults(tmp_path, "keep", **env)
    assert kept == "False"
    assert faults > PAGES_READ / 2  # the user's 128 KiB trim threshold stands


def test_malloc_settings_put_in_os_environ_later_do_not_count(tmp_path):
    """glibc reads MALLOC_* once, at start-up: a variable set afterwards (dask's Nanny sets one) tunes nothing."""
    kept, faults = page_faults(tmp_path, "keep-after-dask")
    assert kept == "True"
    assert faults < PAGES_READ / 10
