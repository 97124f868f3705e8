"""What every reader and a later build check on open: the commit log against its head, and each
commit's rows of the small arrays (ids, content_index, content keys, token offsets/lengths, pooled)
against the crc32 they were committed with, so a change whose chunks still pass their own crc32c
is refused too (verify names the same faults)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from cli.embedcache_cli import main as embedcache_main
from embedcache import open_store
from embedcache.errors import StoreError

from .conftest import write_fasta
from .test_parity import random_seqs
from .test_store import esm2_config, run_build

AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture
def store(tmp_path, models) -> Path:
    """A complete store of 40 proteins in several commits (small units)."""
    path = tmp_path / "s.zarr"
    run_build(esm2_config(models, shard_mb=0.02), [write_fasta(tmp_path / "a.fa", random_seqs(AA, [30 + i for i in range(40)]))], path)
    assert open_store(path).n_commits > 2
    return path


def group(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r+", zarr_format=3, use_consolidated=False)


def head_file(path: Path) -> Path:
    return path / "_commits" / "zarr.json"


def edit_head(path: Path, **changes) -> None:
    doc = json.loads(head_file(path).read_text())
    doc["attributes"]["head"].update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del doc["attributes"]["head"][key]
    head_file(path).write_text(json.dumps(doc))


def build_more(tmp_path: Path, models, path: Path, capsys) -> tuple[int, str]:
    more = write_fasta(tmp_path / "more.fa", {"new1": "MKV" * 20, "new2": "ACD" * 15})
    code = embedcache_main(["build", str(more), "-o", str(path), "--encoder", "esm2", "--model", str(models["esm2"]), "--no-progress"])
    return code, capsys.readouterr().err


def test_swapped_content_index_values_are_refused_by_readers_and_a_later_build(tmp_path, models, store, capsys):
    arr = group(store)["content_index"]
    a, b = int(arr[0]), int(arr[5])
    arr[0], arr[5] = b, a  # both chunks are rewritten with valid crc32c: only the commit's crc32 tells
    with pytest.raises(StoreError, match=r"array 'content_index' rows 0\.\.\d+ \(commit \d+\) do not match the checksum"):
        open_store(store)
    code, err = build_more(tmp_path, models, store, capsys)
    assert code == 2 and "content_index" in err and len(err.strip().splitlines()) == 1, err
    assert embedcache_main(["verify", str(store)]) == 2  # verify names the same fault


def test_an_overwritten_pooled_row_is_refused_when_pooled_vectors_are_read(store):
    arr = group(store)["pooled"]
    arr[3] = arr[3] + 1.0
    s = open_store(store)  # the per-token path does not read pooled: opening stays cheap
    with pytest.raises(StoreError, match=r"array 'pooled' rows .* do not match the checksum"):
        s.pooled()
    import embedcache

    ds = embedcache.open_dataset(store)  # xarray's view reads pooled vectors through the same check
    with pytest.raises(StoreError, match=r"array 'pooled' rows .* do not match the checksum"):
        ds.pooled.sel(sequence=s.ids[0]).values


def test_overwritten_token_offsets_are_refused(store):
    arr = group(store)["token_length"]
    arr[2] = int(arr[2]) - 1  # still inside its commit's token rows: only the checksum tells
    with pytest.raises(StoreError, match=r"array 'token_length' rows .* do not match the checksum"):
        open_store(store)


def test_a_rewound_head_is_refused_and_a_later_build_keeps_the_records(tmp_path, models, store, capsys):
    before = open_store(store)
    ranges = before.log.ranges
    edit_head(store, n=len(ranges) - 1, records=int(ranges[-2][1]))  # one commit fewer, consistent ranges
    with pytest.raises(StoreError, match=r"the commit head \(n=\d+, records=\d+\) does not match .* edited or rewound"):
        open_store(store)
    code, err = build_more(tmp_path, models, store, capsys)
    assert code == 2 and "rewound" in err, err
    edit_head(store, n=len(ranges), records=before.committed.records)  # put back: nothing was lost
    assert open_store(store).ids == before.ids


def test_a_head_stripped_of_its_log_crc_is_refused(store):
    edit_head(store, log_crc=None)
    with pytest.raises(StoreError, match="has no log_crc"):
        open_store(store)


def test_an_edited_commit_checksum_row_is_refused(store):
    crc = group(store)["_commits/crc"]
    row = crc[1]
    row[0] += 1
    crc[1] = row
    with pytest.raises(StoreError, match="does not match the .* log rows it counts"):
        open_store(store)


def test_a_store_from_before_log_crc_opens_and_gains_it_with_the_next_build(tmp_path, models, store):
    doc = json.loads(head_file(store).read_text())
    del doc["attributes"]["head"]["log_crc"], doc["attributes"]["log_digest"]
    head_file(store).write_text(json.dumps(doc))
    ids = open_store(store).ids
    run_build(esm2_config(models, shard_mb=0.02), [write_fasta(tmp_path / "b.fa", {"late": "MKVL" * 10})], store)
    assert open_store(store).ids == [*ids, "late"]
    assert "log_crc" in json.loads(head_file(store).read_text())["attributes"]["head"]


def test_text_checksums_tell_a_nul_inside_an_id_from_two_ids():
    from embedcache.commits import crc_of

    assert crc_of(np.array(["a\0b"], dtype=object)) != crc_of(np.array(["a", "b"], dtype=object))
    assert crc_of(np.array(["a", "b"], dtype=object)) == __import__("zlib").crc32(b"a\0b")  # stores written before keep theirs


def set_rows(path: Path, array: str, rows: int) -> None:
    meta = path / array / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"][0] = rows
    meta.write_text(json.dumps(doc))


def test_a_complete_store_whose_shape_was_edited_is_refused_before_any_allocation(tmp_path, models, store, capsys):
    set_rows(store, "tokens", 10**12)
    with pytest.raises(StoreError, match=r"array 'tokens' has 1000000000000 rows, but the commit log of this complete store counts \d+"):
        open_store(store)
    code, err = build_more(tmp_path, models, store, capsys)
    assert code == 2 and "1000000000000 rows" in err and len(err.strip().splitlines()) == 1, err


def test_an_interrupted_store_grown_to_an_absurd_shape_is_trimmed_by_the_next_build(tmp_path, models, store):
    ids = open_store(store).ids
    edit_head(store, status="incomplete")  # as a killed build leaves it: rows past the log are allowed
    set_rows(store, "tokens", 10**12)
    run_build(esm2_config(models, shard_mb=0.02), [write_fasta(tmp_path / "b.fa", {"late": "MKVL" * 10})], store)
    s = open_store(store)
    assert s.ids == [*ids, "late"] and s.status == "complete"
    assert s.root["tokens"].shape[0] == s.committed.tokens


def test_chunks_a_killed_build_wrote_past_the_log_are_deleted_by_the_next_build(tmp_path, models, store):
    from embedcache.store import RECORD_CHUNK

    committed = len(open_store(store).ids)
    edit_head(store, status="incomplete")  # as a killed build leaves it, with rows of an uncommitted chunk
    arr = group(store)["content_index"]
    arr.resize((3 * RECORD_CHUNK,))
    arr[2 * RECORD_CHUNK :] = 7
    assert (store / "content_index" / "c" / "2").exists()
    run_build(esm2_config(models, shard_mb=0.02), [write_fasta(tmp_path / "b.fa", {"late": "MKVL" * 10})], store)
    s = open_store(store)
    assert len(s.ids) == committed + 1 and s.root["content_index"].shape[0] == committed + 1
    assert sorted(p.name for p in (store / "content_index" / "c").iterdir()) == ["0"]


def test_readers_opening_while_a_build_commits_never_see_its_temporary_files(tmp_path, models):
    """zarr writes each object to a temporary `.partial` file and renames it: a reader listing the store
    meanwhile may see a name that is gone when it looks closer. Every open must either succeed (seeing
    some committed prefix) or fail only because the store is not yet created."""
    import os
    import subprocess
    import sys
    import time

    records = random_seqs(AA, [40 + (i * 37) % 200 for i in range(80)], seed=12)
    fasta = write_fasta(tmp_path / "in.fa", records)
    store = tmp_path / "racing.zarr"
    args = ["build", str(fasta), "-o", str(store), "--encoder", "esm2", "--model", str(models["esm2"]), "--shard-mb", "0.02",
            "--unit-mb", "0.02", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "cli.embedcache_cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    opens, seen = 0, set()
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        try:
            s = open_store(store)
        except StoreError as e:
            assert "no embedcache store" in str(e) or "not completely created" in str(e), e
            continue
        opens += 1
        seen.add(s.n_commits)
        assert all(s.tokens(rid).shape[0] > 0 for rid in s.ids[-3:])
    assert proc.wait() == 0, proc.stderr.read()
    assert opens > 20 and len(seen) > 2, (opens, seen)  # it really raced a build that committed (commit counts seen)
    assert len(open_store(store).ids) == 80


def test_a_reader_opening_a_complete_store_as_a_build_starts_extending_it_sees_the_committed_store(store, monkeypatch):
    """A build marks the store incomplete and then sizes its arrays for what it will add; a reader that read
    the head just before (complete: exact sizes expected) reads it again rather than call the store damaged."""
    import embedcache.store as store_module
    from embedcache.store import open_writer

    ids = open_store(store).ids
    real = store_module.read_log

    def extended_meanwhile(root, where):
        log = real(root, where)
        monkeypatch.setattr(store_module, "read_log", real)
        writer = open_writer(store)  # what the next build does right after planning
        writer.set_status("incomplete")
        writer.reserve(records=writer.committed.records + 3, contents=writer.content_end + 3, tokens=writer.token_end + 50)
        return log

    monkeypatch.setattr(store_module, "read_log", extended_meanwhile)
    assert open_store(store).ids == ids
