"""Per-shard digests of the token rows: a shard file swapped with another, or replaced, has chunks
whose own crc32c holds, so only the commit log's shard digests tell. Every reader checks a shard on
its first read; verify names it; a store written before the digests gains them with its next build."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

import embedcache
from cli.embedcache_cli import main as embedcache_main
from embedcache import open_store
from embedcache.commits import crc_of, shard_digests
from embedcache.errors import StoreError

from .conftest import write_fasta
from .test_integrity_on_open import build_more, group, store  # noqa: F401  (store is a fixture)
from .test_store import esm2_config, run_build


def shard_files(path: Path) -> list[Path]:
    return sorted((path / "tokens" / "c").glob("*/*/*"), key=lambda p: int(p.parts[-3]))


def swap_two_shards(path: Path) -> tuple[int, int]:
    """Swap the files of two shards of the same size but other bytes; returns their shard numbers."""
    files = shard_files(path)
    by_size: dict[int, list[Path]] = {}
    for f in files:
        by_size.setdefault(f.stat().st_size, []).append(f)
    a, b = next(group for group in by_size.values() if len(group) > 1 and group[0].read_bytes() != group[1].read_bytes())[:2]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    return int(a.parts[-3]), int(b.parts[-3])


def record_in_shard(s, shard: int) -> str:
    rows = s._index.shards.rows
    for rid in s.ids:
        o, n = s.token_span(rid)
        if n and o // rows == shard:
            return rid
    raise AssertionError(f"no record starts in shard {shard}")


def test_shard_digests_continue_to_the_whole_blocks_crc():
    block = np.random.default_rng(0).standard_normal((23, 2, 3)).astype(np.float16)
    for start in (0, 5, 8, 16):  # on a boundary, inside a shard, ...
        digests = shard_digests(block, start, 8)
        assert len(digests) == -(-(start + 23) // 8) - start // 8
        assert int(digests[-1]) == crc_of(block)
        first_cut = -(-start // 8) * 8 - start or 8
        assert int(digests[0]) == zlib.crc32(np.ascontiguousarray(block[:first_cut]).view(np.uint8).reshape(-1))


def test_swapped_token_shard_files_are_refused_by_every_reader_and_named_by_verify(store, capsys):
    assert len(shard_files(store)) > 3
    a, b = swap_two_shards(store)
    s = open_store(store)  # opening reads no token rows: still cheap
    rid = record_in_shard(s, a)
    message = rf"token shard ({a}|{b}) \(rows \d+\.\.\d+, commit \d+\) does not hold the rows its commit wrote"
    with pytest.raises(StoreError, match=message):
        s.tokens(rid)
    with pytest.raises(StoreError, match=message):
        open_store(store).tokens_many([rid])
    out = np.zeros((1, 200, s.embed_dim), np.float16)
    with pytest.raises(StoreError, match=message):
        open_store(store).read_tokens_into([rid], out)
    with pytest.raises(StoreError, match=message):
        open_store(store).token_arrays()
    with pytest.raises(StoreError, match=message):
        embedcache.open_dataset(store).embedcache.tokens(rid).values
    assert embedcache_main(["verify", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"token shard {a} " in err and f"token shard {b} " in err, err


def test_a_checked_shard_is_read_once_and_intact_stores_read_as_before(store):
    s = open_store(store)
    reference = {rid: s.tokens(rid) for rid in s.ids}
    assert s._shards_checked == s._index.shards.covering([(0, s.committed.tokens)])
    again = open_store(store)
    assert all(np.array_equal(a, reference[rid]) for rid, a in zip(again.ids, again.tokens_many(again.ids)))


def test_an_edited_shard_digest_is_refused_on_open(store):
    arr = group(store)["_commits/shard_crc"]
    last = int(open_store(store)._index.shards.commit.max())
    s = open_store(store)
    shard = int(np.flatnonzero(s._index.shards.commit == last)[-1])  # a commit's last shard: tied to the log's crc
    arr[shard] = int(arr[shard]) + 1
    with pytest.raises(StoreError, match=rf"commit {last}'s last token shard digest .* is not its tokens checksum"):
        open_store(store)


def test_a_store_from_before_shard_digests_reads_and_gains_them_with_the_next_build(tmp_path, models, store):
    del group(store)["_commits/shard_crc"]
    s = open_store(store)
    assert s._index.shards is None and len(s.tokens(s.ids[0]))  # read as before, per chunk crc32c only
    run_build(esm2_config(models, shard_mb=0.02), [write_fasta(tmp_path / "b.fa", {"late": "MKVL" * 10})], store)
    s = open_store(store)
    assert s._index.shards is not None and s.ids[-1] == "late"
    assert all(len(t) for t in s.tokens_many(s.ids))  # every shard, old and new, checks


def test_a_build_adding_digests_to_an_old_store_refuses_swapped_shards(tmp_path, models, store, capsys):
    del group(store)["_commits/shard_crc"]
    swap_two_shards(store)
    code, err = build_more(tmp_path, models, store, capsys)
    assert code == 2 and "do not match the checksum they were committed with" in err and len(err.strip().splitlines()) == 1, err


def test_a_flipped_byte_in_a_kept_shard_stops_a_later_build(tmp_path, models, store, capsys):
    """A build reads only the kept shards whose object changed since the last build saw it
    (embedcache.shard_stamps): an edited one is read, fails its chunk's crc32c, and stops the build."""
    s = open_store(store)
    rid = record_in_shard(s, 1)
    shard = shard_files(store)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, err = build_more(tmp_path, models, store, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "token shard 1 " in err and "changed since the last build and cannot be read" in err and "refusing to extend" in err, err
    s = open_store(store)
    assert "new1" not in s.ids and s.complete  # nothing was written
    with pytest.raises(StoreError, match=r"array 'tokens' rows \d+\.\.\d+ \(token shards 1\.\.1\) cannot be read: .*checksum"):
        s.tokens(rid)
    assert embedcache_main(["verify", str(store)]) == 2
    assert "'tokens'" in capsys.readouterr().err


def test_a_swapped_pair_of_shards_stops_a_later_build(tmp_path, models, store, capsys):
    a, b = swap_two_shards(store)
    code, err = build_more(tmp_path, models, store, capsys)
    assert code == 2 and f"token shard {min(a, b)} " in err and "does not hold the rows its commit wrote" in err, err


def test_a_copied_store_is_checked_once_and_extended(tmp_path, models, store, capsys):
    """A copy has new modification times: the next build reads and checks every shard once, goes on,
    and records the new stamps, so the build after it reads none."""
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy, copy_function=shutil.copy)  # contents, not times
    code, err = build_more(tmp_path, models, copy, capsys)
    assert code == 0, err
    s = open_store(copy)
    assert "new1" in s.ids and s.complete and s.verify() == []
    stamps = group(copy)["_commits/shard_stamp"][:]
    assert len(stamps) == len(s._index.shards.lo) and (stamps != 0).all()
