"""Whole token shards laid out by embedcache.shard_image: the bytes zarr writes for the same rows (one
layer), the same values through zarr (several layers), and zarr's own writes where the layout differs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from embedcache.shard_image import ShardImage, ShardLayout

SHARD, CHUNK, D = 64, 16, 8


def _tokens(path: Path, k: int, compressors=(Crc32cCodec(),), dtype: str = "float16", d: int = D) -> zarr.Array:
    """An array shaped and encoded like a store's `tokens` (embedcache.store.create_store)."""
    return zarr.create_array(path, shape=(3 * SHARD, k, d), chunks=(CHUNK, 1, d), shards=(SHARD, k, d), dtype=dtype,
                             compressors=compressors, fill_value=0, config={"write_empty_chunks": True})  # fmt: skip


def _shard_file(array_path: Path, shard: int) -> bytes:
    return (array_path / "c" / str(shard) / "0" / "0").read_bytes()


@pytest.mark.parametrize("n", [SHARD, 50], ids=["whole", "short"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("d", [D, 64], ids=["within-a-block", "several-blocks"])  # 64: the file's whole blocks go direct
def test_one_layer_shards_are_the_bytes_zarr_writes(tmp_path, n, dtype, d):
    ours, zarrs = _tokens(tmp_path / "a", 1, dtype=dtype, d=d), _tokens(tmp_path / "b", 1, dtype=dtype, d=d)
    rows = np.random.default_rng(0).standard_normal((n, 1, d)).astype(dtype)
    ShardImage(ShardLayout.of(ours)).write(ours, 1, rows)
    zarrs[SHARD : SHARD + n] = rows
    assert _shard_file(tmp_path / "a", 1) == _shard_file(tmp_path / "b", 1)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a")[SHARD : SHARD + n], rows)


def test_several_layers_read_back_through_zarr_and_a_reused_image_leaves_nothing_behind(tmp_path):
    """Chunks are in C order (zarr's writer uses Morton order): other bytes, the same values. The second,
    short shard is written from the same buffer: its rows past the end are zero, not the first shard's
    (every chunk is written, as the store writes empty chunks; zarr's partial write leaves them out)."""
    ours, zarrs = _tokens(tmp_path / "a", 3), _tokens(tmp_path / "b", 3)
    rng = np.random.default_rng(1)
    full, short = (rng.standard_normal((n, 3, D)).astype(np.float16) for n in (SHARD, 20))
    image = ShardImage(ShardLayout.of(ours))
    image.write(ours, 0, full)
    image.write(ours, 1, short)
    zarrs[:SHARD], zarrs[SHARD : SHARD + 20] = full, short
    again = zarr.open_array(tmp_path / "a")
    np.testing.assert_array_equal(again[: 2 * SHARD], zarrs[: 2 * SHARD])
    assert not again[SHARD + 20 : 2 * SHARD].any()


def test_a_flipped_byte_in_a_laid_out_shard_fails_zarrs_checksum(tmp_path):
    ours = _tokens(tmp_path / "a", 1)
    ShardImage(ShardLayout.of(ours)).write(ours, 0, np.ones((SHARD, 1, D), np.float16))
    path = tmp_path / "a" / "c" / "0" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[CHUNK * D * 2 + 4 + 3] ^= 1  # inside the second chunk
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(tmp_path / "a")[CHUNK : 2 * CHUNK]


def test_other_layouts_are_left_to_zarr(tmp_path):
    lz4 = (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec())
    assert ShardLayout.of(_tokens(tmp_path / "lz4", 1, compressors=lz4)) is None
    unsharded = zarr.create_array(tmp_path / "u", shape=(8, 1, D), chunks=(4, 1, D), dtype="float16", compressors=(Crc32cCodec(),))
    assert ShardLayout.of(unsharded) is None
    assert ShardLayout.of(_tokens(tmp_path / "ok", 2)) == ShardLayout(SHARD, CHUNK, 2, D, np.dtype("float16"))


def test_an_array_inside_a_group_under_a_relative_root_is_written_where_zarr_reads_it(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    monkeypatch.chdir(tmp_path)
    group = zarr.open_group(LocalStore("rel"), mode="w")
    array = group.create_array("x/tokens", shape=(3 * SHARD, 1, 64), chunks=(CHUNK, 1, 64), shards=(SHARD, 1, 64), dtype="float16",
                               compressors=(Crc32cCodec(),), fill_value=0, config={"write_empty_chunks": True})  # fmt: skip
    rows = np.random.default_rng(2).standard_normal((SHARD, 1, 64)).astype(np.float16)
    ShardImage(ShardLayout.of(array)).write(array, 1, rows)
    assert (tmp_path / "rel" / "x" / "tokens" / "c" / "1" / "0" / "0").is_file()
    np.testing.assert_array_equal(zarr.open_array(LocalStore("rel"), path="x/tokens", mode="r")[SHARD : 2 * SHARD], rows)
