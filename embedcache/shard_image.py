"""A whole token shard's bytes, laid out as zarr's sharding codec lays them out, written in one store call.

Why not `array[a:b] = rows`: zarr encodes a shard on its one event-loop thread and copies every byte
into fresh buffers three times (the bytes codec, crc32c, the shard's concatenation); fresh 32 MiB
buffers fault in their pages at ~0.7 GB/s, which made zarr's encoding the build's slowest host step
(benchmarks/bench_build_host.py). A build's token shards are whole (plan.cut_units gives each unit
whole shards) and its chunks are uncompressed, so every chunk has the same size and the shard index
is the same for every shard: each chunk's rows and crc32c are copied into a buffer that is reused
from shard to shard, the index appended, and the bytes handed to the store (any zarr store: a local
disk, S3, ...); a local directory's file is written past the page cache (embedcache.direct_io).
Only the layout `embedcache.store` creates qualifies (`ShardLayout.of`); anything else (lz4 chunks,
rows that do not start on a shard boundary) goes through zarr. Every chunk is
written, the rows past a short shard's end as zeros (zarr leaves chunks beyond the array's extent
out; both read the same). Tests compare the bytes with zarr's own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import google_crc32c  # zarr's own crc32c implementation (its Crc32cCodec)
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from embedcache import direct_io

_PLAIN = (BytesCodec(endian="little"), Crc32cCodec())  # raw little-endian bytes, then the crc32c
_CRC = 4  # bytes of a crc32c, after what it covers


@dataclass(frozen=True)
class ShardLayout:
    """The token array's shard geometry: (shard_rows, k, d) shards of (chunk_rows, 1, d) chunks."""

    shard_rows: int
    chunk_rows: int
    k: int
    d: int
    dtype: np.dtype

    @classmethod
    def of(cls, array: zarr.Array) -> "ShardLayout | None":
        """The layout when `array`'s shards can be written whole here, else None (zarr writes them)."""
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        if (tuple(sharding.codecs) != _PLAIN or tuple(sharding.index_codecs) != _PLAIN
                or sharding.index_location != ShardingCodecIndexLocation.end):  # fmt: skip
            return None
        shard, chunk = array.metadata.chunk_grid.chunk_shape, sharding.chunk_shape
        if len(shard) != 3 or chunk[1] != 1 or chunk[2] != shard[2] or shard[0] % chunk[0]:
            return None
        dtype = np.dtype(array.dtype)
        if sys.byteorder != "little" or dtype.byteorder == ">" or array.fill_value != 0:  # chunks are written as memory holds them
            return None
        return cls(int(shard[0]), int(chunk[0]), int(shard[1]), int(shard[2]), dtype)

    @property
    def n_chunks(self) -> int:
        return self.shard_rows // self.chunk_rows * self.k

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.d * self.dtype.itemsize


class ShardImage:
    """A reusable buffer holding one encoded shard. `write(array, shard, rows)` lays out `rows` (n <= shard_rows,
    k, d) as shard number `shard` of `array` (rows past n are the fill value, zero) and stores it.

    Chunks are in C order of their (row block, layer) coordinates; zarr's own writer uses Morton order, the
    same as C order when k = 1. Readers follow the index, so either order reads the same."""

    def __init__(self, layout: ShardLayout):
        self.layout = layout
        slot = layout.chunk_bytes + _CRC
        index = np.empty((layout.n_chunks, 2), "<u8")  # (offset, nbytes) of each chunk: the same for every shard
        index[:, 0] = np.arange(layout.n_chunks, dtype=np.uint64) * slot
        index[:, 1] = slot
        index_bytes = index.view(np.uint8).reshape(-1)
        self.index_at = layout.n_chunks * slot
        self.buffer = direct_io.aligned_empty(self.index_at + len(index_bytes) + _CRC)  # aligned for direct writes
        self.buffer[self.index_at : -_CRC] = index_bytes
        self.buffer[-_CRC:] = _crc32c(index_bytes)
        self.bodies = self.buffer[: self.index_at].reshape(layout.n_chunks, slot)[:, : layout.chunk_bytes]  # (chunks, bytes)
        # (row block, layer) -> that chunk's rows (chunk_rows, d), in the buffer itself
        self.chunks = self.bodies.view(layout.dtype).reshape(layout.n_chunks // layout.k, layout.k, layout.chunk_rows, layout.d)
        if not np.shares_memory(self.chunks, self.buffer):  # reshape copies where it cannot view; this layout never needs to
            raise AssertionError(f"the chunks of {layout} are not a view of the shard buffer")

    def write(self, array: zarr.Array, shard: int, rows: np.ndarray) -> None:
        layout = self.layout
        n = len(rows)
        if n > layout.shard_rows or rows.shape[1:] != (layout.k, layout.d) or rows.dtype != layout.dtype:
            raise AssertionError(f"rows {rows.shape} {rows.dtype} do not fit a shard of {layout}")
        for c in range(len(self.chunks)):
            lo, hi = c * layout.chunk_rows, min(n, (c + 1) * layout.chunk_rows)
            for j in range(layout.k):
                into = self.chunks[c, j]
                if hi > lo:
                    into[: hi - lo] = rows[lo:hi, j]
                into[max(hi - lo, 0) :] = 0
                self._seal(c * layout.k + j)
        where = array.store_path / array.metadata.encode_chunk_key((shard, 0, 0))
        store = where.store
        if direct_io.AVAILABLE and type(store) is LocalStore and not store.read_only:  # the file LocalStore would write
            direct_io.write_file(store.root / where.path, self.buffer)
            return
        # zarr's MemoryStore keeps the buffer it is given rather than writing it anywhere: give it its own
        data = self.buffer.copy() if isinstance(store, MemoryStore) else self.buffer
        sync(where.set(default_buffer_prototype().buffer.from_array_like(data)))

    def _seal(self, slot: int) -> None:
        """Write chunk `slot`'s crc32c after its bytes."""
        at = slot * (self.layout.chunk_bytes + _CRC) + self.layout.chunk_bytes
        self.buffer[at : at + _CRC] = _crc32c(self.bodies[slot])


def _crc32c(data: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.uint32(google_crc32c.value(data)).astype("<u4").tobytes(), np.uint8)
