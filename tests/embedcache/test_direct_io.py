"""embedcache.direct_io: whole files written past the page cache hold exactly the bytes given, replace what
was there whole, and leave nothing behind when they fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedcache.direct_io import BLOCK, aligned_empty, write_file


def _data(n: int, offset: int = 0) -> np.ndarray:
    data = aligned_empty(n + offset)[offset:]
    data[...] = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    return data


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


def test_a_file_is_replaced_whole(tmp_path):
    path = tmp_path / "shard"
    write_file(path, _data(5 * BLOCK + 9))
    write_file(path, _data(BLOCK + 1))  # shorter: nothing of the first may remain
    assert path.read_bytes() == _data(BLOCK + 1).tobytes()


def test_a_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "c").write_text("a file where a directory should be")
    with pytest.raises(OSError):
        write_file(tmp_path / "c" / "shard", _data(2 * BLOCK))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm (tmpfs) here")
def test_memory_filesystems_get_the_same_bytes(tmp_path_factory):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        path = Path(tmp) / "shard"
        write_file(path, _data(3 * BLOCK + 5))
        assert path.read_bytes() == _data(3 * BLOCK + 5).tobytes()
