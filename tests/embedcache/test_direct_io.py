"""embedcache.direct_io: whole files written past the page cache hold exactly the bytes given, replace what
was there whole, fall back to buffered writes where the filesystem refuses O_DIRECT, and leave nothing behind
when they fail."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from embedcache import direct_io
from embedcache.direct_io import BLOCK, aligned_empty, write_file

pytestmark = pytest.mark.skipif(not direct_io.AVAILABLE, reason="no O_DIRECT on this platform: shards go through zarr")


@pytest.fixture(autouse=True)
def fresh_refusals(monkeypatch):
    monkeypatch.setattr(direct_io, "_refused", set())  # what one test's filesystem refused is not the next one's


def _data(n: int, offset: int = 0) -> np.ndarray:
    data = aligned_empty(n + offset)[offset:]
    data[...] = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    return data


def _watch_writes(monkeypatch, fail=None) -> list[bool]:
    """Record, for every os.pwrite, whether its file was open with O_DIRECT; `fail(direct, call)` may raise."""
    real, seen = os.pwrite, []

    def pwrite(fd, data, offset):
        seen.append(bool(direct_io.fcntl.fcntl(fd, direct_io.fcntl.F_GETFL) & os.O_DIRECT))
        if fail is not None:
            fail(seen[-1], len(seen))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return seen


@pytest.mark.parametrize("n", [1, 100, BLOCK + 1, 3 * BLOCK])
def test_aligned_buffers_start_on_a_block(n):
    assert aligned_empty(n).ctypes.data % BLOCK == 0 and aligned_empty(n).nbytes == n


@pytest.mark.parametrize("n", [0, 1, BLOCK, 3 * BLOCK + 17, (1 << 20) + 5])
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "unaligned"])
def test_a_file_holds_exactly_the_bytes_given(tmp_path, n, offset):
    data = _data(n, offset)
    write_file(tmp_path / "c" / "0" / "shard", data)
    assert (tmp_path / "c" / "0" / "shard").read_bytes() == data.tobytes()
    assert [p.name for p in (tmp_path / "c" / "0").iterdir()] == ["shard"]  # no .partial left


def test_whole_blocks_go_direct_and_the_tail_through_the_page_cache(tmp_path, monkeypatch):
    seen = _watch_writes(monkeypatch)
    write_file(tmp_path / "shard", _data(3 * BLOCK + 5))
    if direct_io._refused:
        pytest.skip("this filesystem refuses O_DIRECT: the fallback tests cover it")
    assert seen[0] and not seen[-1]
    assert (tmp_path / "shard").read_bytes() == _data(3 * BLOCK + 5).tobytes()


def test_a_file_is_replaced_whole(tmp_path):
    path = tmp_path / "shard"
    write_file(path, _data(5 * BLOCK + 9))
    write_file(path, _data(BLOCK + 1))  # shorter: nothing of the first may remain
    assert path.read_bytes() == _data(BLOCK + 1).tobytes()


class _RefusingFcntl:
    """fcntl as a filesystem without O_DIRECT answers it: setting the flag fails with EINVAL."""

    real = direct_io.fcntl
    F_GETFL, F_SETFL = real.F_GETFL, real.F_SETFL

    def fcntl(self, fd, cmd, arg=0):
        if cmd == self.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return self.real.fcntl(fd, cmd, arg)


def test_a_filesystem_that_refuses_o_direct_gets_a_buffered_write_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "fcntl", _RefusingFcntl())
    for i in range(2):  # each shard has its own directory: the refusal is remembered per filesystem
        write_file(tmp_path / "c" / str(i) / "shard", _data(2 * BLOCK + i))
        assert (tmp_path / "c" / str(i) / "shard").read_bytes() == _data(2 * BLOCK + i).tobytes()
    assert direct_io._refused == {os.stat(tmp_path).st_dev}
    assert sorted(p.name for p in (tmp_path / "c" / "1").iterdir()) == ["shard"]


def test_a_direct_write_refused_midway_is_written_again_buffered(tmp_path, monkeypatch):
    def fail(direct, call):
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")

    _watch_writes(monkeypatch, fail)
    write_file(tmp_path / "shard", _data(4 * BLOCK + 3))
    assert (tmp_path / "shard").read_bytes() == _data(4 * BLOCK + 3).tobytes()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch, error):
    path = tmp_path / "shard"
    write_file(path, _data(BLOCK))

    def fail(direct, call):
        if call == 2:  # midway: something of the new file is written
            raise error

    _watch_writes(monkeypatch, fail)
    with pytest.raises(type(error)):
        write_file(path, _data(3 * BLOCK + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard"]
    assert path.read_bytes() == _data(BLOCK).tobytes()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm (tmpfs) here")
def test_memory_filesystems_get_the_same_bytes():
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        path = Path(tmp) / "shard"
        write_file(path, _data(3 * BLOCK + 5))
        assert path.read_bytes() == _data(3 * BLOCK + 5).tobytes()
