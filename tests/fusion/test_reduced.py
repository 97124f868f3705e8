"""Reduce once (fusion.reduced): the array equals the per-batch reduction it replaces, is reused, is made
anew when its store changes, refuses damage, and feeds batches on the device equal to host-made ones."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import fusion.reduced as reduced_module
from embedcache import open_store
from embedcache.store import ContentResult, create_store, open_writer
from fusion.data import DataConfig, ReducedTokens, StoreBatches, StreamedReducedTokens, _pad, open_batches
from fusion.reduced import ReducedError, ReductionConfig, reduced_array

DIM = 8
LENGTHS = {"a": 1, "b": 3, "c": 5, "d": 8, "e": 40, "f": 17, "g": 2}
ATTRS = {
    "format": "embedcache-store", "schema_version": 2, "fingerprint": "test", "embed_dim": DIM,
    "config": {"encoder": "test", "model": "synthetic", "pooling": "mean", "dtype": "float16"},
    "provenance": {}, "stored_dtype": {"tokens": "float16", "pooled": "float32"},
}  # fmt: skip


def _commit(path: Path, lengths: dict[str, int], seed: int) -> None:
    writer = open_writer(path)
    rng = np.random.default_rng(seed)
    results = []
    for key, n in lengths.items():
        rows = (rng.standard_normal((n, DIM)) * 3).astype(np.float16)
        results.append(ContentResult(key=f"k{key}", residues="A" * n, tokens=rows, pooled=rows.mean(0).astype(np.float32),
                                     n_input_tokens=n, n_cropped=0, n_windows=1))  # fmt: skip
    writer.commit(results, [(key, f"k{key}") for key in lengths])
    writer.set_status("complete")


@pytest.fixture
def store_path(tmp_path) -> Path:
    path = tmp_path / "tokens.zarr"
    create_store(path, attrs=ATTRS, embed_dim=DIM, pooled=True, tokens=True, token_dtype="float16", shard_mb=1.0)
    _commit(path, LENGTHS, seed=0)
    return path


def _reduce(store, max_tokens: int, cache: Path, log=lambda m: None):
    return reduced_array(store, ReductionConfig.of(store, max_tokens), cache, log=log)


@pytest.mark.parametrize("max_tokens", [1, 3, 5, 100])
def test_reduced_rows_are_the_per_batch_reduction_in_fp16(store_path, tmp_path, max_tokens):
    """Bit for bit: what `_pad` made of the stored rows every batch (float32 group means), rounded to fp16."""
    store = open_store(store_path)
    keys = list(LENGTHS)
    array = _reduce(store, max_tokens, tmp_path / "cache")
    batch = ["e", None, "a", "d", "b", "e", "c", "f"]  # an absent sample, a repeated record, every length
    per_batch = _pad([None if k is None else torch.from_numpy(store.tokens(k)) for k in batch], DIM, max_tokens)
    for features in (ReducedTokens(store, keys, array), StreamedReducedTokens(store, keys, array)):
        got = features.gather(batch)
        assert got.x.dtype == torch.float16 and torch.equal(got.present, per_batch.present)
        width = per_batch.x.shape[1]
        assert torch.equal(got.mask[:, :width], per_batch.mask) and not got.mask[:, width:].any()
        assert torch.equal(got.x[:, :width], per_batch.x.half()) and not got.x[:, width:].any()


def test_made_once_then_reused_and_made_anew_when_the_store_changes(store_path, tmp_path):
    cache = tmp_path / "cache"
    said = []
    first = _reduce(open_store(store_path), 4, cache, log=said.append)
    assert len(said) == 1 and "reducing" in said[0]
    again = _reduce(open_store(store_path), 4, cache, log=said.append)
    assert len(said) == 1 and again.path == first.path  # nothing read from the store again
    assert _reduce(open_store(store_path), 5, cache, log=said.append).path != first.path  # another max_tokens: another array

    _commit(store_path, {"h": 9}, seed=1)  # the store gains a commit: its old reduction no longer describes it
    store = open_store(store_path)
    extended = _reduce(store, 4, cache, log=said.append)
    assert extended.path != first.path and len(said) == 3
    rows = ReducedTokens(store, ["h"], extended).gather(["h"])
    assert rows.mask.sum().item() == 4


def test_an_array_that_does_not_describe_its_store_is_refused(store_path, tmp_path):
    store = open_store(store_path)
    array = _reduce(store, 4, tmp_path / "cache")
    meta_file = array.path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["fusion_reduced"]["source"]["commits"] = 7
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ReducedError, match=r"reduced array .* holds .*'commits': 7.* needs .*delete it"):
        _reduce(store, 4, tmp_path / "cache")


def test_a_float32_store_is_reduced_in_float32(tmp_path):
    """Rows built in float32 keep their precision: the reduction is `_pad`'s float32 group means, exactly."""
    path = tmp_path / "fp32.zarr"
    create_store(path, attrs={**ATTRS, "stored_dtype": {"tokens": "float32", "pooled": "float32"}}, embed_dim=DIM, pooled=True,
                 tokens=True, token_dtype="float32", shard_mb=1.0)  # fmt: skip
    writer = open_writer(path)
    rows = {k: np.random.default_rng(n).standard_normal((n, DIM)).astype(np.float32) * 1e-4 + 1 for k, n in LENGTHS.items()}
    writer.commit([ContentResult(key=f"k{k}", residues="A" * len(r), tokens=r, pooled=r.mean(0), n_input_tokens=len(r), n_cropped=0,
                                 n_windows=1) for k, r in rows.items()], [(k, f"k{k}") for k in rows])  # fmt: skip
    writer.set_status("complete")
    store = open_store(path)
    array = _reduce(store, 4, tmp_path / "cache")
    assert array.dtype == np.float32
    got = ReducedTokens(store, list(LENGTHS), array).gather(list(LENGTHS))
    want = _pad([torch.from_numpy(store.tokens(k)) for k in LENGTHS], DIM, 4)
    assert got.x.dtype == torch.float32 and torch.equal(got.x, want.x) and torch.equal(got.mask, want.mask)
    streamed = StreamedReducedTokens(store, list(LENGTHS), array)
    streamed.lead(list(range(array.n_blocks)))
    assert torch.equal(streamed.gather(list(LENGTHS)).x, want.x)


def test_a_lost_lengths_file_is_refused_not_read_as_zero_lengths(store_path, tmp_path):
    store = open_store(store_path)
    array = _reduce(store, 4, tmp_path / "cache")
    (array.path / "lengths" / "c" / "0").unlink()  # zarr would read every length as 0: every sample absent
    with pytest.raises(ReducedError, match=r"lengths and block digests have crc32 .* a file was changed or lost; delete the array"):
        _reduce(store, 4, tmp_path / "cache")


def test_swapped_blocks_are_refused_naming_the_block(store_path, tmp_path, monkeypatch):
    monkeypatch.setattr(reduced_module, "BLOCK_BYTES", 2 * 4 * DIM * 2)  # 2 records a block: 4 blocks
    store = open_store(store_path)
    array = _reduce(store, 4, tmp_path / "cache")
    assert array.block_rows == 2
    a, b = array.path / "rows" / "c" / "0" / "0" / "0", array.path / "rows" / "c" / "1" / "0" / "0"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b), b.write_bytes(data_a)
    reopened = _reduce(store, 4, tmp_path / "cache")
    with pytest.raises(ReducedError, match=r"block 0 \(records 0\.\.1\) has crc32"):
        reopened.load()
    with pytest.raises(ReducedError, match=r"block 1 \(records 2\.\.3\)"):
        StreamedReducedTokens(store, list(LENGTHS), reopened).gather(["c"])


def test_reading_ahead_checks_the_next_blocks_and_a_bad_one_fails_the_batch_that_needs_it(store_path, tmp_path, monkeypatch):
    monkeypatch.setattr(reduced_module, "BLOCK_BYTES", 4 * DIM * 2)  # one record a block: 7 blocks
    store = open_store(store_path)
    array = _reduce(store, 4, tmp_path / "cache")
    (array.path / "rows" / "c" / "5" / "0" / "0").unlink()
    reopened = _reduce(store, 4, tmp_path / "cache")
    streamed, ids = StreamedReducedTokens(store, list(LENGTHS), reopened), store.ids  # ids[k]: record k, in block k
    checked_on, verify = {}, reopened._verify

    def recording(b, future):
        checked_on[b] = threading.current_thread().name
        verify(b, future)

    monkeypatch.setattr(reopened, "_verify", recording)
    streamed.lead([2, 3, 4, 5, 6, 0, 1])
    streamed.gather([ids[2]])  # block 2 read; 3 and 4 read ahead
    for b in (3, 4):
        reopened.block(b)  # waits for the read under way, or finds it done
    assert reopened._checked == {2, 3, 4}
    assert checked_on[2] == threading.current_thread().name  # the batch's own block, here
    assert all(checked_on[b].startswith("fusion-read-ahead") for b in (3, 4)), checked_on  # the next ones, ahead
    streamed.gather([ids[4]])  # reads 5 and 6 ahead: 5's file is gone, which only the batch that needs it reports
    with pytest.raises(ReducedError, match=r"block 5 \(records 5\.\.5, rows/c/5/0/0\) cannot be read .*No such file"):
        streamed.gather([ids[5]])
    whole = ReducedTokens(store, list(LENGTHS), _reduce(store, 4, tmp_path / "another"))
    assert torch.equal(streamed.gather([ids[6]]).x, whole.gather([ids[6]]).x)  # the blocks read ahead serve their rows


def test_an_interrupted_reduction_leaves_nothing_that_looks_complete(store_path, tmp_path, monkeypatch):
    monkeypatch.setattr(reduced_module, "BLOCK_BYTES", 2 * 4 * DIM * 2)
    calls, real = [], reduced_module.group_mean

    def failing(x, m):  # Ctrl-C in the third block
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(x, m)

    monkeypatch.setattr(reduced_module, "group_mean", failing)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _reduce(open_store(store_path), 4, cache)
    assert os.listdir(cache) == []  # neither the array nor its temporary
    monkeypatch.setattr(reduced_module, "group_mean", real)
    assert _reduce(open_store(store_path), 4, cache).load().shape == (len(LENGTHS), 4, DIM)


def test_streamed_epochs_visit_blocks_one_after_another(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(reduced_module, "BLOCK_BYTES", 4 * 2 * 16 * 2)  # 4 records of 2 rows x 16 a block
    config = DataConfig(manifest=demo_data["prep"], stores={"rna": demo_data["stores"]["rna"]}, max_tokens=2, loading="stream",
                        reduced_dir=str(tmp_path), batch_size=4)  # fmt: skip
    from fusion.run import read_manifest

    batches = open_batches(config, read_manifest(config.manifest), log=lambda m: None)
    features = batches.features["rna"]
    assert isinstance(features, StreamedReducedTokens)
    arrays = batches.split_arrays("train")
    block = features.index(arrays.keys["rna"]) // features.reduced.block_rows
    order = batches._order(arrays, shuffle=True, epoch=3)
    assert sorted(order) == list(range(len(order))) and not np.array_equal(order, np.sort(order))
    seen = block[order]
    assert (np.diff(seen) != 0).sum() == len(set(seen.tolist())) - 1  # each block's samples in one run
    visits = list(dict.fromkeys(seen.tolist()))
    assert features._ahead == {b: visits[i + 1 : i + 1 + reduced_module.READ_AHEAD] for i, b in enumerate(visits)}  # what is read ahead
    in_order = block[batches._order(arrays, shuffle=False, epoch=0)]  # an evaluation epoch reads ahead too, in its own order
    firsts = [b for b in dict.fromkeys(in_order.tolist()) if b >= 0]
    assert features._ahead == {b: firsts[i + 1 : i + 1 + reduced_module.READ_AHEAD] for i, b in enumerate(firsts)}


@pytest.mark.parametrize("features", ["pooled", "tokens"])
def test_batches_gathered_on_the_device_equal_host_made_ones(demo_data, tmp_path, features):
    from fusion.run import read_manifest

    kw = dict(manifest=demo_data["prep"], stores=demo_data["stores"], features=features, batch_size=5, reduced_dir=str(tmp_path))
    kw |= {"max_tokens": 6} if features == "tokens" else {}
    manifest = read_manifest(demo_data["prep"])
    host = open_batches(DataConfig(**kw, feature_device="host"), manifest, log=lambda m: None)
    host.place(torch.device("cpu"), log=lambda m: None)
    device = open_batches(DataConfig(**kw), manifest, log=lambda m: None)
    said = []
    device.place(torch.device("cpu"), log=said.append)
    assert host.device is None and device.device == torch.device("cpu")
    assert "gathered there per batch" in said[0] and "batches on cpu" in device.loading["rna"]
    for split in ("train", "test"):
        for a, b in zip(host(split, shuffle=True, epoch=1), device(split, shuffle=True, epoch=1), strict=True):
            assert a.sample_ids == b.sample_ids
            assert torch.equal(a.targets, b.targets) and torch.equal(a.target_mask, b.target_mask)
            for m in a.features:
                fa, fb = a.features[m], b.features[m]
                assert torch.equal(fa.x, fb.x) and torch.equal(fa.mask, fb.mask) and torch.equal(fa.present, fb.present)


def test_feature_device_device_refuses_rows_that_are_not_held_whole(demo_data):
    from fusion.data import DataError
    from fusion.run import read_manifest

    config = DataConfig(manifest=demo_data["prep"], stores=demo_data["stores"], feature_device="device", loading="stream")
    batches = open_batches(config, read_manifest(config.manifest), log=lambda m: None)
    with pytest.raises(DataError, match=r"feature_device 'device': \['(dna|rna|protein)'.*are not held whole"):
        batches.place(torch.device("cpu"))


def test_streamed_rows_are_the_same_read_block_by_block_or_record_by_record(store_path, tmp_path, monkeypatch):
    monkeypatch.setattr(reduced_module, "BLOCK_BYTES", 4 * DIM * 2)  # one record a block: 7 blocks
    monkeypatch.setattr(reduced_module, "MAX_MAPS", 2)  # more blocks than stay mapped
    store = open_store(store_path)
    array = _reduce(store, 4, tmp_path / "cache")
    assert array.n_blocks == len(LENGTHS)
    batch = ["e", None, "a", "d", "e", "g", "f"]
    memory = ReducedTokens(store, list(LENGTHS), array).gather(batch)
    streamed = StreamedReducedTokens(store, list(LENGTHS), array)
    for blocks in (None, [6, 4, 0, 3, 5, 1, 2]):  # record by record (another modality leads the order), then whole blocks, read ahead
        streamed.lead(blocks)
        got = streamed.gather(batch)
        assert torch.equal(got.x, memory.x) and torch.equal(got.mask, memory.mask) and torch.equal(got.present, memory.present)
    assert len(array._files._maps) <= 2


def test_a_reduced_dir_that_cannot_hold_arrays_is_refused_in_one_line(store_path, tmp_path):
    store = open_store(store_path)
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    with pytest.raises(ReducedError, match=r"--reduced-dir '.*a-file/sub': cannot make a directory"):
        _reduce(store, 4, in_the_way / "sub")
    with pytest.raises(ReducedError, match=r"--reduced-dir 's3://bucket/reduced': reduced arrays live in a local directory"):
        _reduce(store, 4, "s3://bucket/reduced")
