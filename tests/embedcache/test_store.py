"""Content addressing, incremental builds, fingerprints, verify, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from embedcache import open_store
import embedcache.build as build_module
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.errors import EncoderError, FingerprintMismatch, InputError, StoreError

from .conftest import write_fasta
from .test_parity import AA, random_seqs


def esm2_config(models, **kw) -> BuildConfig:
    if "shard_mb" in kw:  # small shards in tests: one shard per unit, so a build makes many commits
        kw.setdefault("unit_mb", kw["shard_mb"])
    return BuildConfig.create("esm2", str(models["esm2"]), **kw)


def run_build(config, inputs, store, logs=None):
    return build(config, inputs, store, progress=False, log=(logs.append if logs is not None else lambda s: None))


def read_all(store_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    s = open_store(store_path)
    return {rid: (s.tokens(rid), s.pooled([rid])[0], s.sequence(rid)) for rid in s.ids}


def test_duplicates_are_embedded_once(tmp_path, models):
    seqs = random_seqs(AA, [10, 20, 30])
    records = {**seqs, "alias_of_s0": seqs["s0_10"], "lower_alias": seqs["s1_20"].lower()}
    report = run_build(esm2_config(models), [write_fasta(tmp_path / "in.fa", records)], tmp_path / "s.zarr")
    assert report.plan.n_new == 3
    s = open_store(tmp_path / "s.zarr")
    assert len(s) == 5 and s.committed.content == 3
    np.testing.assert_array_equal(s.tokens("alias_of_s0"), s.tokens("s0_10"))
    np.testing.assert_array_equal(s.pooled(["lower_alias"]), s.pooled(["s1_20"]))
    assert s.sequence("lower_alias") == seqs["s1_20"]  # stored upper-cased


def test_records_read_ahead_commit_in_input_order_chunk_by_chunk(tmp_path, models, monkeypatch):
    """The records' ids are read back from the spool a chunk ahead of their commits: every chunk lands, in
    input order, each under its own sequence (repeats and aliases included)."""
    monkeypatch.setattr(build_module, "RECORDS_PER_COMMIT", 3)
    seqs = random_seqs(AA, [12, 7, 30, 9, 21, 15, 8], seed=3)
    records = {**seqs, "alias": seqs["s2_30"]}
    fasta = write_fasta(tmp_path / "in.fa", records)
    fasta.write_text(fasta.read_text() + f">s0_12\n{seqs['s0_12']}\n")  # an exact repeat: dropped
    run_build(esm2_config(models), [fasta], tmp_path / "s.zarr")
    s = open_store(tmp_path / "s.zarr")
    assert list(s.ids) == list(records) and s.committed.content == 7
    assert [s.sequence(r) for r in records] == list(records.values())
    assert not any(t.name.startswith("embedcache-records") for t in threading.enumerate())


def test_the_last_units_commit_takes_the_first_records_along(tmp_path, models, monkeypatch):
    """One head write fewer after the model's last batch: the last units' commit also commits the first chunk of
    records (its own log row, after the units'); later chunks follow one commit each, and completion trims nothing."""
    import embedcache.store as store_module
    from embedcache.commits import read_log
    from embedcache.store import as_location, open_root

    monkeypatch.setattr(build_module, "RECORDS_PER_COMMIT", 3)
    heads = []
    for name in ("append_commits", "append_commit"):
        real = getattr(store_module, name)
        monkeypatch.setattr(store_module, name, lambda *a, real=real, **k: heads.append(real(*a, **k)) or heads[-1])
    seqs = random_seqs(AA, [12, 7, 30, 9, 21, 15, 8], seed=3)
    records = {**seqs, "alias": seqs["s2_30"]}  # 8 records of 7 sequences: record chunks of 3, 3 and 2
    run_build(esm2_config(models), [write_fasta(tmp_path / "in.fa", records)], tmp_path / "s.zarr")
    log = read_log(open_root(as_location(tmp_path / "s.zarr"), mode="r")[1], "s")
    units = [r for r in log.ranges.tolist() if r[3] > r[2]]
    assert [r[:4] for r in log.ranges.tolist()[len(units) - 1:]] == [[0, 0, units[-1][2], 7], [0, 3, 7, 7], [3, 6, 7, 7], [6, 8, 7, 7]]
    assert len(heads) == len(units) + 2  # the records' first chunk came with the last unit
    s = open_store(tmp_path / "s.zarr")
    assert list(s.ids) == list(records) and s.complete and s.verify() == []


def test_opening_a_store_for_writing_reads_each_arrays_metadata_a_few_times(tmp_path, models, monkeypatch):
    """StoreWriter reads its arrays' metadata in one concurrent round (`root_arrays`), not at every lookup: on an
    object store each read is a request."""
    from collections import Counter

    from zarr.storage import LocalStore

    from embedcache.store import open_writer

    store = tmp_path / "s.zarr"
    run_build(esm2_config(models), [write_fasta(tmp_path / "a.fa", random_seqs(AA, [12, 30, 9], seed=2))], store)
    reads, real_get = Counter(), LocalStore.get

    async def get(self, key, *args, **kwargs):
        reads[key] += 1
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", get)
    writer = open_writer(store)
    assert writer.committed.content == 3
    metadata = {key: n for key, n in reads.items() if key.endswith("zarr.json")}
    assert len(metadata) > 10 and max(metadata.values()) <= 4, metadata  # 19 before


def test_superset_build_computes_only_new_sequences(tmp_path, models):
    first = random_seqs(AA, [10, 20, 30], seed=1)
    more = random_seqs(AA, [15, 25], seed=2)
    store = tmp_path / "s.zarr"
    run_build(esm2_config(models), [write_fasta(tmp_path / "a.fa", first)], store)
    before = read_all(store)
    # The superset also holds a known sequence under a new id: reused, not recomputed.
    superset = {**first, **{f"new_{k}": v for k, v in more.items()}, "renamed": first["s0_10"]}
    logs: list[str] = []
    report = run_build(esm2_config(models), [write_fasta(tmp_path / "b.fa", superset)], store, logs)
    assert report.plan.n_new == 2
    assert (report.plan.already_stored, report.plan.reused) == (3, 1)
    assert logs[-1].startswith("2 new, 4 already stored")
    after = read_all(store)
    assert set(after) == set(superset)
    for rid, (tokens, pooled, seq) in before.items():  # earlier rows untouched
        np.testing.assert_array_equal(after[rid][0], tokens)
        np.testing.assert_array_equal(after[rid][1], pooled)
    np.testing.assert_array_equal(after["renamed"][0], after["s0_10"][0])
    assert open_store(store).verify() == []
    assert len(open_store(store).builds) == 2


def test_other_fingerprint_is_refused_naming_both(tmp_path, models):
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [10]))
    store = tmp_path / "s.zarr"
    run_build(esm2_config(models), [fasta], store)
    fp = open_store(store).fingerprint
    with pytest.raises(FingerprintMismatch) as e:
        run_build(esm2_config(models, pooling="cls"), [fasta], store)
    other = BuildConfig.create("esm2", str(models["esm2"]), pooling="cls")
    assert fp in str(e.value) and "pooling: store has 'mean', this build has 'cls'" in str(e.value)
    assert other.pooling == "cls"
    # Settings that do not change the numbers do not change the fingerprint.
    run_build(esm2_config(models, max_tokens=17, shard_mb=1.0), [fasta], store)


@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_token_codecs_store_the_same_rows_and_check_every_chunk(tmp_path, models, codec):
    """--token-codec is layout: the same rows (every layer), the same fingerprint (a store resumes under
    either), recorded in the store; a flipped byte in a per-token chunk is refused by its crc32c,
    compressed or not."""
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [40, 70, 25], seed=3))
    run_build(esm2_config(models, layers=(0, -1)), [fasta], tmp_path / "default.zarr")
    store = tmp_path / f"{codec}.zarr"
    run_build(esm2_config(models, layers=(0, -1), token_codec=codec, shard_mb=0.01), [fasta], store)
    s, default = open_store(store, layer=0), open_store(tmp_path / "default.zarr", layer=0)
    assert s.fingerprint == default.fingerprint and s.attrs["layout"]["token_codec"] == codec
    inner = json.loads((store / "tokens" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == {"none": ["bytes", "crc32c"], "lz4": ["bytes", "blosc", "crc32c"]}[codec]
    for layer in s.layers:
        np.testing.assert_array_equal(s.token_arrays(layer)[0], default.token_arrays(layer)[0])
        for got, want in zip(s.tokens_many(s.ids, layer), default.tokens_many(s.ids, layer)):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(s.tokens(s.ids[1], layer), default.tokens(s.ids[1], layer))
        batch = [s.ids[2], None, s.ids[0], s.ids[2]]  # an absent sample and a repeated record
        out = np.full((4, 80, s.embed_dim), 7, np.float16)  # rows past each record's length are left as they were
        s.read_tokens_into(batch, out, layer)
        for row, rid in zip(out, batch):
            n = 0 if rid is None else len(default.tokens(rid, layer))
            if rid is not None:
                np.testing.assert_array_equal(row[:n], default.tokens(rid, layer))
            assert (row[n:] == 7).all()
    other = "lz4" if codec == "none" else "none"
    assert run_build(esm2_config(models, layers=(0, -1), token_codec=other), [fasta], store).plan.n_new == 0  # resumes
    assert s.verify() == []
    chunk = sorted(p for p in (store / "tokens" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="'tokens'"):
        open_store(store, layer=0).token_arrays()
    with pytest.raises(StoreError, match="'tokens'"):
        open_store(store, layer=0).tokens_many(s.ids)
    with pytest.raises(StoreError, match="'tokens'"):
        open_store(store, layer=0).read_tokens_into(s.ids, np.zeros((len(s.ids), 80, s.embed_dim), np.float16))
    assert any("'tokens'" in f for f in open_store(store, layer=0).verify())


def test_an_unknown_token_codec_is_refused():
    with pytest.raises(EncoderError, match=r"unknown --token-codec 'zstd'; expected one of \['none', 'lz4'\]"):
        BuildConfig.create("esm2", "x", token_codec="zstd")


def test_same_id_with_another_sequence_in_the_store_is_refused(tmp_path, models):
    store = tmp_path / "s.zarr"
    run_build(esm2_config(models), [write_fasta(tmp_path / "a.fa", {"p1": "MKTAYIAK"})], store)
    with pytest.raises(InputError, match=r"b\.fa:1: record 'p1' is already in store .* with a different sequence"):
        run_build(esm2_config(models), [write_fasta(tmp_path / "b.fa", {"p1": "MKTAYIAKQ"})], store)
    assert open_store(store).verify() == []


def test_xarray_opens_the_store(tmp_path, models):
    records = random_seqs(AA, [10, 20])
    run_build(esm2_config(models), [write_fasta(tmp_path / "a.fa", records)], tmp_path / "s.zarr")
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert ds.pooled.dims == ("content", "layer", "feature")
    assert set(ds.sequence.values.tolist()) == set(records)
    by_record = ds.pooled.isel(content=ds.content_index)  # (sequence, layer, feature), as docs/store-schema.md shows
    layer = open_store(tmp_path / "s.zarr").layers[0]
    np.testing.assert_array_equal(
        by_record.sel(sequence="s1_20", layer=layer).values, open_store(tmp_path / "s.zarr").pooled(["s1_20"])[0]
    )
    assert ds.attrs["embedcache"]["provenance"]["encoder"] == "esm2"
    assert ds.attrs["embedcache"]["source_dtype"] == "float32"


def test_verify_names_a_missing_shard(tmp_path, models):
    store = tmp_path / "s.zarr"
    run_build(esm2_config(models, shard_mb=0.01), [write_fasta(tmp_path / "a.fa", random_seqs(AA, [100] * 6))], store)
    s = open_store(store)
    assert s.verify() == [] and s.n_commits > 1
    shard = sorted(p for p in (store / "tokens" / "c").rglob("*") if p.is_file())[-1]
    shard.write_bytes(b"garbage")
    faults = open_store(store).verify()
    assert any("'tokens'" in f and "cannot be read" in f for f in faults), faults


def test_interrupted_build_does_not_look_complete(tmp_path, models):
    store = tmp_path / "s.zarr"
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [30] * 4))
    run_build(esm2_config(models), [fasta], store)
    meta = store / "_commits" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["head"]["status"] = "incomplete"  # as a killed build leaves it
    meta.write_text(json.dumps(doc))
    s = open_store(store)
    assert not s.complete and any("not 'complete'" in f for f in s.verify())


CLI = [sys.executable, "-m", "cli.embedcache_cli"]


def _committed_groups(store: Path) -> int:
    try:
        return json.loads((store / "_commits" / "zarr.json").read_text())["attributes"]["head"]["n"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


# Killed mid-build (after commits) is covered for every backend in test_store_backends.py.
@pytest.mark.parametrize("kill_after_groups", [0], ids=["while-creating"])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, models, kill_after_groups):
    records = random_seqs(AA, [40 + (i * 37) % 200 for i in range(120)], seed=11)
    records["dup"] = records["s0_40"]
    fasta = write_fasta(tmp_path / "in.fa", records)
    args = ["build", str(fasta), "--encoder", "esm2", "--model", str(models["esm2"]), "--shard-mb", "0.02", "--unit-mb", "0.02", "--max-tokens", "300", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    reference = tmp_path / "ref.zarr"
    subprocess.run([*CLI, *args, "-o", str(reference)], check=True, env=env, capture_output=True)

    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([*CLI, *args, "-o", str(store)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _committed_groups(store) < kill_after_groups and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if kill_after_groups == 0:
        while not (store / "zarr.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (store / "zarr.json").exists():  # killed while creating (no head yet) or mid-build: never complete
        try:
            assert not open_store(store).complete
        except StoreError as e:
            assert "not completely created" in str(e)

    done = subprocess.run([*CLI, *args, "-o", str(store)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed, ref = open_store(store), open_store(reference)
    assert resumed.complete and resumed.verify() == []
    assert sorted(resumed.ids) == sorted(ref.ids) and len(resumed.ids) == len(set(resumed.ids))
    assert resumed.committed.content == ref.committed.content == 120
    for rid in ref.ids:
        np.testing.assert_array_equal(resumed.tokens(rid), ref.tokens(rid))
        np.testing.assert_allclose(resumed.pooled([rid]), ref.pooled([rid]), rtol=1e-5, atol=1e-6)


def test_token_arrays_skip_the_gaps_between_groups(tmp_path, models):
    store = tmp_path / "s.zarr"
    records = random_seqs(AA, [100, 3, 250, 40, 100, 7], seed=5)
    records["alias"] = records["s0_100"]
    run_build(esm2_config(models, shard_mb=0.01), [write_fasta(tmp_path / "a.fa", records)], store)
    s = open_store(store)
    assert s.n_commits > 2
    flat, offsets, lengths = s.token_arrays()
    assert len(flat) == sum(len(v) for k, v in records.items() if k != "alias")  # no unused rows loaded
    for rid, o, n in zip(s.ids, offsets, lengths):
        np.testing.assert_array_equal(flat[o : o + n], s.tokens(rid))


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled-only", "per-token"])
def test_a_build_sizes_its_arrays_once_so_commits_and_completion_resize_nothing(tmp_path, models, monkeypatch, tokens):
    """StoreWriter.reserve grows every array to the plan's rows before the first commit: the commits and the
    completion write no array metadata (on an object store each resize is a request), in new and extended stores."""
    from zarr.core.array import AsyncArray

    from embedcache.store import StoreWriter

    resized, inside = [], type("Step", (), {"step": None})()  # not thread-local: zarr resizes on its own event loop's thread
    real_resize = AsyncArray.resize

    async def resize(self, *args, **kwargs):
        if inside.step and not self.path.startswith("_commits/"):  # the log grows 4,096 rows at a time: once per 4,096 commits
            resized.append((inside.step, self.path))
        return await real_resize(self, *args, **kwargs)

    def during(step: str, method):
        def wrapped(self, *args, **kwargs):
            inside.step = step
            try:
                return method(self, *args, **kwargs)
            finally:
                inside.step = None
        return wrapped

    monkeypatch.setattr(AsyncArray, "resize", resize)
    for name in ("commit_units", "commit_records", "set_status"):
        monkeypatch.setattr(StoreWriter, name, during(name, getattr(StoreWriter, name)))
    config = esm2_config(models, tokens=tokens, shard_mb=0.01)
    store = tmp_path / "s.zarr"
    run_build(config, [write_fasta(tmp_path / "a.fa", random_seqs(AA, [30 + 7 * i for i in range(20)], seed=31))], store)
    run_build(config, [write_fasta(tmp_path / "b.fa", random_seqs(AA, [35 + 5 * i for i in range(9)], seed=32))], store)
    assert resized == []
    s = open_store(store)
    assert len(s.ids) == 29 and s.complete and s.verify() == []
