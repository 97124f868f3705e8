"""MappedLocalStore: byte-range reads as views of mapped files, answering exactly as LocalStore does."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from embedcache import open_store
from embedcache.mapped_store import MappedLocalStore, can_map

from .conftest import write_fasta
from .test_parity import AA, random_seqs
from .test_store import esm2_config, run_build

pytestmark = pytest.mark.skipif(not can_map(), reason="local stores are read mapped on Linux only")

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes: more than two pages, so ranges start inside a page


def put(root, key: str, data: bytes) -> None:
    sync(LocalStore(root).set(key, default_buffer_prototype().buffer.from_bytes(data)))


def get(store, key: str, byte_range=None) -> bytes | None:
    buf = sync(store.get(key, default_buffer_prototype(), byte_range))
    return None if buf is None else buf.to_bytes()


REQUESTS = [
    None,
    RangeByteRequest(0, 16),
    RangeByteRequest(4097, 9000),  # starts inside the second page
    RangeByteRequest(10_000, 20_000),  # runs past the end: clipped, as a read is
    RangeByteRequest(20_000, 30_000),  # starts past the end: empty
    OffsetByteRequest(5000),
    SuffixByteRequest(20),
    SuffixByteRequest(1 << 20),  # longer than the file: the whole file
]


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_reads_answer_as_local_store_does(tmp_path, request_):
    put(tmp_path, "c/0", PAYLOAD)
    put(tmp_path, "empty", b"")
    mapped, local = MappedLocalStore(tmp_path), LocalStore(tmp_path, read_only=True)
    for key in ("c/0", "empty", "absent", "c"):  # a file, an empty file, nothing, a directory
        assert get(mapped, key, request_) == get(local, key, request_), key
    parts = sync(mapped.get_partial_values(default_buffer_prototype(), [("c/0", request_), ("absent", request_)]))
    assert parts[1] is None and parts[0].to_bytes() == get(local, "c/0", request_)


def test_a_replaced_file_is_mapped_again(tmp_path):
    """zarr writes by atomic rename: a store that mapped the old file reads the new one."""
    put(tmp_path, "c/0", PAYLOAD)
    mapped = MappedLocalStore(tmp_path)
    old = sync(mapped.get("c/0", default_buffer_prototype(), RangeByteRequest(0, 100)))
    put(tmp_path, "c/0", PAYLOAD[::-1])
    assert get(mapped, "c/0", RangeByteRequest(0, 100)) == PAYLOAD[::-1][:100]
    assert old.to_bytes() == PAYLOAD[:100]  # a view handed out before still holds the old file's bytes


def test_mappings_are_bounded_and_views_outlive_them(tmp_path):
    for i in range(6):
        put(tmp_path, f"c/{i}", bytes([i]) * 5000)
    mapped = MappedLocalStore(tmp_path, max_maps=2)
    views = [sync(mapped.get(f"c/{i}", default_buffer_prototype(), RangeByteRequest(100, 4200))) for i in range(6)]
    assert list(mapped._maps) == ["c/4", "c/5"]
    for i, view in enumerate(views):  # evicted mappings stay valid while zarr holds a view
        assert view.to_bytes() == bytes([i]) * 4100
        assert not view.as_numpy_array().flags.writeable  # the page cache itself: nobody writes into it


def test_threads_reading_on_loops_of_their_own_share_the_mappings_safely(tmp_path):
    """Batch threads read a mapped store on event loops of their own (embedcache.reader.run_reads): the
    LRU is shared, and thrashing it from several threads at once must neither raise nor mix files up."""
    import asyncio
    import sys
    import threading

    for i in range(8):
        put(tmp_path, f"c/{i}", bytes([i]) * 5000)
    mapped, errors = MappedLocalStore(tmp_path, max_maps=2), []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in rng.integers(0, 8, 300):
                buf = asyncio.run(mapped.get(f"c/{i}", default_buffer_prototype(), RangeByteRequest(10, 20)))
                assert buf.to_bytes() == bytes([i]) * 10
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the LRU's bookkeeping too
    try:
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert len(mapped._maps) <= 2


def test_mapped_reads_run_in_the_asking_thread_and_the_rest_on_zarrs_loop(tmp_path):
    """run_reads: a mapped store's reads on the caller's own loop (batch threads decode on their own
    cores); other stores, and a caller already inside a loop (a Jupyter kernel), on zarr's loop."""
    import asyncio
    import threading

    from embedcache.reader import run_reads

    put(tmp_path, "c/0", PAYLOAD)
    mapped, local = MappedLocalStore(tmp_path), LocalStore(tmp_path, read_only=True)

    async def read(store):
        buf = await store.get("c/0", default_buffer_prototype(), RangeByteRequest(0, 4))
        return buf.to_bytes(), threading.current_thread()

    here = threading.current_thread()
    assert run_reads(mapped, read(mapped)) == (PAYLOAD[:4], here)
    mine = asyncio.new_event_loop()  # a loop the caller set for this thread stays set
    asyncio.set_event_loop(mine)
    try:
        assert run_reads(mapped, read(mapped)) == (PAYLOAD[:4], here) and asyncio.get_event_loop() is mine
    finally:
        asyncio.set_event_loop(None)
        mine.close()
    data, thread = run_reads(local, read(local))
    assert data == PAYLOAD[:4] and thread is not here  # zarr's event-loop thread

    async def in_a_running_loop():
        return run_reads(mapped, read(mapped))

    data, thread = asyncio.run(in_a_running_loop())
    assert data == PAYLOAD[:4] and thread is not here


def test_it_is_read_only_and_pickles(tmp_path):
    put(tmp_path, "c/0", PAYLOAD)
    with pytest.raises(ValueError, match="is read-only"):
        MappedLocalStore(tmp_path, read_only=False)
    mapped = MappedLocalStore(tmp_path)
    assert get(mapped, "c/0", SuffixByteRequest(4)) == PAYLOAD[-4:]
    writable = mapped.with_read_only(False)
    assert type(writable) is LocalStore and not writable.read_only
    copy = pickle.loads(pickle.dumps(mapped))
    assert copy == mapped and not copy._maps and get(copy, "c/0", SuffixByteRequest(4)) == PAYLOAD[-4:]


def test_stores_open_mapped_and_read_the_same_rows(tmp_path, models, monkeypatch):
    """open_store reads local stores through MappedLocalStore; rows equal LocalStore's, batch by batch."""
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [40, 70, 25, 90], seed=5))
    path = tmp_path / "s.zarr"
    run_build(esm2_config(models, shard_mb=0.01), [fasta], path)
    s = open_store(path)
    assert isinstance(s.store, MappedLocalStore)
    local = LocalStore(path, read_only=True)
    tokens = zarr.open_array(store=local, path="tokens", mode="r")
    out = np.zeros((len(s.ids), 100, s.embed_dim), np.float16)
    s.read_tokens_into(s.ids, out)
    for row, rid in zip(out, s.ids):
        o, n = s.token_span(rid)
        np.testing.assert_array_equal(row[:n], tokens[o : o + n, 0])
    monkeypatch.setenv("EMBEDCACHE_MMAP", "0")  # the way out, for a filesystem that maps badly
    assert type(open_store(path).store) is LocalStore


def test_threads_making_the_first_read_at_once_all_open_it(tmp_path):
    """The first reads of a fresh store, from several threads at once (each on a loop of its own, as
    fusion's batch threads): one opens it, none is told "store is already open"."""
    import asyncio
    import threading

    put(tmp_path, "c/0", PAYLOAD)
    for _ in range(30):
        mapped, start, errors = MappedLocalStore(tmp_path), threading.Barrier(6), []

        def reader() -> None:
            start.wait()
            try:
                asyncio.run(mapped.get("c/0", default_buffer_prototype(), RangeByteRequest(0, 10)))
            except BaseException as e:  # re-raised below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
