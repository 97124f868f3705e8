"""One store suite, run against a local directory, `memory://` and a real S3 API (moto's server).

Builds, resume, verify, info, xarray, damage detection, the writer lease between concurrent
builds, and remote failures through the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
import xarray as xr

from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.errors import StoreError
from embedcache.lease import LEASE_KEY, LeaseHeld
from tests.conftest import S3_ENV, free_port, unique_name

from .conftest import write_fasta
from .test_parity import AA, random_seqs

pytestmark = pytest.mark.storage

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cli.embedcache_cli"]


@dataclass
class Backend:
    """A place to put stores, and raw access to the objects behind them (to damage them on purpose)."""

    name: str
    base: str  # URL or directory under which each test makes its stores
    options: dict
    fs: fsspec.AbstractFileSystem
    root: str  # `base` as the filesystem names it

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def raw(self, store_name: str, key: str) -> str:
        return f"{self.root}/{store_name}/{key}"

    def cli_options(self) -> list[str]:
        return [f"--storage-option={k}={v}" for k, v in self.options.items()]


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        return Backend("local", str(tmp_path), {}, fsspec.filesystem("file"), str(tmp_path))
    if request.param == "memory":
        name = unique_name("mem")
        return Backend("memory", f"memory://{name}", {}, fsspec.filesystem("memory"), f"/{name}")
    endpoint = request.getfixturevalue("s3_endpoint")
    import s3fs

    prefix = f"embedcache-test/{unique_name('t')}"
    return Backend("s3", f"s3://{prefix}", {"endpoint_url": endpoint}, s3fs.S3FileSystem(endpoint_url=endpoint), prefix)


def esm2(models, **kw) -> BuildConfig:
    if "shard_mb" in kw:  # one shard per unit: many commits from little data
        kw.setdefault("unit_mb", kw["shard_mb"])
    return BuildConfig.create("esm2", str(models["esm2"]), **kw)


def run_build(config, inputs, url, options, **kw):
    return build(config, inputs, url, storage_options=options, progress=False, log=kw.pop("log", lambda s: None), **kw)


def test_build_resume_read_verify_on_every_backend(backend, tmp_path, models):
    first = random_seqs(AA, [12, 40, 90, 7], seed=3)
    more = {**first, "again": first["s1_40"], "new": "MKTAYIAKQRQISFVKSHFSRQ"}
    a, b = write_fasta(tmp_path / "a.fa", first), write_fasta(tmp_path / "b.fa", more)
    url = backend.url("s.zarr")
    run_build(esm2(models, shard_mb=0.005), [a], url, backend.options)
    report = run_build(esm2(models, shard_mb=0.005), [b], url, backend.options)
    assert (report.plan.n_new, report.plan.already_stored, report.plan.reused) == (1, 4, 1)

    reference = tmp_path / "ref.zarr"  # the same two builds into a local directory
    run_build(esm2(models, shard_mb=0.005), [a], reference, {})
    run_build(esm2(models, shard_mb=0.005), [b], reference, {})
    store, ref = open_store(url, backend.options), open_store(reference)
    assert store.complete and store.verify() == []
    assert store.ids == ref.ids and store.n_commits == ref.n_commits
    for rid in ref.ids:
        np.testing.assert_array_equal(store.tokens(rid), ref.tokens(rid))
        np.testing.assert_array_equal(store.pooled([rid]), ref.pooled([rid]))
        assert store.sequence(rid) == ref.sequence(rid)
    info = store.info()
    assert info["records"] == 6 and info["unique_sequences"] == 5 and info["size_on_disk_bytes"] > 0

    ds = xr.open_zarr(url, storage_options=backend.options or None, consolidated=False)
    by_record = ds.pooled.isel(content=ds.content_index)
    np.testing.assert_array_equal(by_record.sel(sequence="again", layer=store.layers[0]).values, ref.pooled(["s1_40"])[0])


def _first_token_chunk(backend: Backend, store_name: str) -> str:
    keys = sorted(k for k in backend.fs.find(backend.raw(store_name, "tokens/c")))
    assert keys, "no token chunks written"
    return keys[0]


def test_damage_is_named_and_refused_on_every_backend(backend, tmp_path, models):
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [60, 80, 30], seed=4))
    name = "s.zarr"
    url = backend.url(name)
    run_build(esm2(models, shard_mb=0.005), [fasta], url, backend.options)

    # a byte flipped inside a token chunk: the chunk's crc32c fails, verify names array and chunk
    chunk = _first_token_chunk(backend, name)
    data = bytearray(backend.fs.cat_file(chunk))
    data[len(data) // 3] ^= 0xFF
    backend.fs.pipe_file(chunk, bytes(data))
    faults = open_store(url, backend.options).verify()
    assert any("'tokens'" in f and "cannot be read" in f for f in faults), faults
    with pytest.raises(StoreError, match="'tokens'"):
        open_store(url, backend.options).token_arrays()
    # a later build lists the shards, reads the one whose object changed since the last build, refuses
    more = write_fasta(tmp_path / "b.fa", {"late": "MKVL" * 10})
    with pytest.raises(StoreError, match=r"token shard \d+ .* changed since the last build and cannot be read"):
        run_build(esm2(models, shard_mb=0.005), [more], url, backend.options)

    # the chunk deleted: refused at open (no silent zeros), naming the chunk
    backend.fs.rm_file(chunk)
    with pytest.raises(StoreError, match=r"tokens/c/.* is missing"):
        open_store(url, backend.options)
    with pytest.raises(StoreError, match="damaged, refusing to extend"):
        run_build(esm2(models, shard_mb=0.005), [fasta], url, backend.options)


@pytest.mark.parametrize("damage", ["truncated-metadata", "edited-head", "edited-ranges", "edited-offsets"])
def test_edited_or_truncated_metadata_is_refused(damage, tmp_path, models):
    store = tmp_path / "s.zarr"
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [60, 80, 30, 45], seed=4))
    run_build(esm2(models, shard_mb=0.005), [fasta], store, {})
    if damage == "truncated-metadata":
        meta = store / "tokens" / "zarr.json"
        meta.write_text(meta.read_text()[:40])
        match = "not valid JSON|cannot read|damaged|JSON"
    elif damage == "edited-head":
        meta = store / "_commits" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"]["head"]["records"] += 1
        meta.write_text(json.dumps(doc))
        match = "the commits cover 4 records, the head says 5"
    elif damage == "edited-ranges":
        import zarr

        ranges = zarr.open_array(store / "_commits" / "ranges", mode="r+")
        last = json.loads((store / "_commits" / "zarr.json").read_text())["attributes"]["head"]["n"] - 1  # the records'
        # (the log grows 4,096 rows at a time: rows past the head's count are never read)
        row = ranges[last]
        row[0] += 1  # a commit that no longer starts where the last ended
        ranges[last] = row
        match = rf"commit {last} .* starts at record 1, but the commits before it end at 0"
    else:
        import zarr

        offsets = zarr.open_array(store / "token_offset", mode="r+")
        offsets[0] = 10**9  # a hand-edit through zarr: chunk checksums still pass, the commit's crc32 does not
        match = r"array 'token_offset' rows 0\.\.\d+ \(commit 0\) do not match the checksum"
    with pytest.raises(StoreError, match=match):
        open_store(store)
    with pytest.raises(StoreError, match=match):
        run_build(esm2(models, shard_mb=0.005), [fasta], store, {})


def test_verify_names_a_changed_value_that_passes_chunk_checksums(tmp_path, models):
    """A value rewritten through zarr keeps valid chunk crc32c; the commit's crc32 still catches it."""
    import zarr

    store = tmp_path / "s.zarr"
    run_build(esm2(models), [write_fasta(tmp_path / "a.fa", random_seqs(AA, [30, 40], seed=2))], store, {})
    tokens = zarr.open_array(store / "tokens", mode="r+")
    block = tokens[0:3]
    tokens[0:3] = block + 8
    faults = open_store(store).verify()
    assert any("'tokens'" in f and "do not match the checksum" in f for f in faults), faults


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, **S3_ENV, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(extra or {})}


def _lease_exists(backend: Backend, name: str) -> bool:
    return backend.fs.exists(backend.raw(name, LEASE_KEY))


@pytest.mark.parametrize("backend_name", ["local", "s3"])
def test_concurrent_builds_one_writer_at_a_time(backend_name, request, tmp_path, models):
    """While a writer holds the lease, a build is refused naming it; two builds that wait both land whole."""
    from embedcache.lease import WriterLease
    from embedcache.location import Location, open_location

    backend = _backend_by_name(backend_name, request, tmp_path)
    first = random_seqs(AA, [40 + (i * 37) % 200 for i in range(30)], seed=11)
    second = {**random_seqs(AA, [33, 44, 55], seed=12), "shared": first["s0_40"], "s1_77": first["s1_77"]}
    a, b = write_fasta(tmp_path / "a.fa", first), write_fasta(tmp_path / "b.fa", second)
    url = backend.url("s.zarr")
    base = ["build", "--encoder", "esm2", "--model", str(models["esm2"]), "--shard-mb", "0.02", "--unit-mb", "0.02", "--max-tokens", "300",
            "--no-progress", "-o", url, *backend.cli_options()]
    location = Location.of(url, backend.options)
    holder = WriterLease(open_location(location, read_only=False), url, log=lambda m: None).acquire()
    try:
        refused = subprocess.run([*CLI, *base, str(a)], env=_env(), capture_output=True, text=True)
        assert refused.returncode == 2, refused.stderr
        assert f"is being written by another build (host {os.uname().nodename}, pid {os.getpid()}" in refused.stderr
        assert "--wait" in refused.stderr and "Traceback" not in refused.stderr
        waiting = [subprocess.Popen([*CLI, *base, "--wait", str(f)], env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for f in (a, b)]
        readers = [_LineReader(p) for p in waiting]
        deadline = time.time() + 120
        while not all(r.saw("waiting for the build") for r in readers) and time.time() < deadline:
            time.sleep(0.1)
        assert all(r.saw("waiting for the build") for r in readers), [r.lines for r in readers]
    finally:
        holder.release()
    for p in waiting:
        p.wait(timeout=300)
    outputs = [r.join() for r in readers]
    assert [p.returncode for p in waiting] == [0, 0], outputs
    store = open_store(url, backend.options)
    assert sorted(store.ids) == sorted({*first, *second}) and len(store.ids) == len(set(store.ids))
    assert store.committed.content == len(first) + 3 and store.verify() == []  # shared sequences stored once
    for rid in ("shared", "s0_40"):
        assert store.sequence(rid) == first["s0_40"]


class _LineReader:
    """Collects a running process's output lines on a thread, so waiting for one never blocks the test."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def join(self) -> str:
        self.thread.join(timeout=60)
        return "".join(self.lines)


def _backend_by_name(name: str, request, tmp_path) -> Backend:
    if name == "local":
        return Backend("local", str(tmp_path), {}, fsspec.filesystem("file"), str(tmp_path))
    endpoint = request.getfixturevalue("s3_endpoint")
    import s3fs

    prefix = f"embedcache-test/{unique_name('t')}"
    return Backend("s3", f"s3://{prefix}", {"endpoint_url": endpoint}, s3fs.S3FileSystem(endpoint_url=endpoint), prefix)


def test_lease_of_a_dead_writer_is_taken_over(tmp_path, models):
    store = tmp_path / "s.zarr"
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [20], seed=1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.mkdir()
    lease = {"host": os.uname().nodename, "pid": dead.pid, "token": "x", "since": "2026-01-01T00:00:00+00:00",
             "renewed": time.time(), "ttl_s": 120.0}
    (store / LEASE_KEY).write_text(json.dumps(lease))
    logs: list[str] = []
    run_build(esm2(models), [fasta], store, {}, log=logs.append)
    assert any("taking over the writer lease" in m and "is gone" in m for m in logs), logs
    assert not (store / LEASE_KEY).exists()  # released at the end

    # another host's lease: live while renewed within its TTL, taken over once expired
    (store / LEASE_KEY).write_text(json.dumps({**lease, "host": "elsewhere", "renewed": time.time()}))
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        run_build(esm2(models), [fasta], store, {})
    (store / LEASE_KEY).write_text(json.dumps({**lease, "host": "elsewhere", "renewed": time.time() - 1000}))
    logs.clear()
    run_build(esm2(models), [fasta], store, {}, log=logs.append)
    assert any("last renewed" in m for m in logs), logs


@pytest.mark.parametrize("backend_name", ["local", "s3"])
def test_sigkill_then_rerun_resumes_to_the_same_store(backend_name, request, tmp_path, models):
    backend = _backend_by_name(backend_name, request, tmp_path)
    records = random_seqs(AA, [40 + (i * 37) % 200 for i in range(120)], seed=11)
    records["dup"] = records["s0_40"]
    fasta = write_fasta(tmp_path / "in.fa", records)
    args = ["build", str(fasta), "--encoder", "esm2", "--model", str(models["esm2"]), "--shard-mb", "0.02", "--unit-mb", "0.02",
            "--max-tokens", "300", "--no-progress", *backend.cli_options()]
    reference = tmp_path / "ref.zarr"
    subprocess.run([*CLI, *args[:-len(backend.cli_options()) or None], "-o", str(reference)], check=True, env=_env(), capture_output=True)

    name = "killed.zarr"
    url = backend.url(name)
    proc = subprocess.Popen([*CLI, *args, "-o", url], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    head = backend.raw(name, "_commits/zarr.json")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if json.loads(backend.fs.cat_file(head))["attributes"]["head"]["n"] >= 2:
                break
        except (FileNotFoundError, KeyError, ValueError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not open_store(url, backend.options).complete

    done = subprocess.run([*CLI, *args, "-o", url], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "taking over the writer lease" in done.stdout + done.stderr
    resumed, ref = open_store(url, backend.options), open_store(reference)
    assert resumed.complete and resumed.verify() == []
    assert sorted(resumed.ids) == sorted(ref.ids)
    for rid in ref.ids:
        np.testing.assert_array_equal(resumed.tokens(rid), ref.tokens(rid))
        np.testing.assert_allclose(resumed.pooled([rid]), ref.pooled([rid]), rtol=1e-5, atol=1e-6)


def test_remote_failures_are_one_clear_line(tmp_path, s3_endpoint):
    no_creds = {k: "" for k in S3_ENV} | {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    env_no_creds = {k: v for k, v in _env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} | {
        k: v for k, v in no_creds.items() if k.endswith("FILE")}
    cases = [
        (["info", "s3://embedcache-test/x.zarr", f"--storage-option=endpoint_url=http://127.0.0.1:{free_port()}"], _env(), "cannot reach the storage endpoint"),
        (["info", "s3://embedcache-test/x.zarr", f"--storage-option=endpoint_url={s3_endpoint}"], env_no_creds, "no credentials"),
        (["info", "s3://embedcache-test/not-a-store", f"--storage-option=endpoint_url={s3_endpoint}"], _env(), "no embedcache store"),
        (["info", "s3://no-such-bucket/x.zarr", f"--storage-option=endpoint_url={s3_endpoint}"], _env(), "bucket 'no-such-bucket' does not exist"),
        (["info", "gs://some-bucket/x.zarr"], _env(), "pip install 'embedcache[gcs]'"),
        (["verify", "s3://embedcache-test/x.zarr", "--storage-option=endpoint_url"], _env(), "is not KEY=VALUE"),
    ]
    for args, env, expected in cases:
        done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, (args, done.stdout)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        if expected:
            assert expected in lines[0], (args, lines[0])
