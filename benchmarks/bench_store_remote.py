"""Stores anywhere: write and streamed-read throughput on a local directory vs S3, and commit cost.

Side by side in one run, through the real store code (create_store, StoreWriter.commit under the
writer's concurrent per-commit writes, EmbeddingStore reads):
1. write MB/s of whole-shard commits, full read MB/s (token_arrays) and random single-sequence
   reads (samples/s) against a local directory and against S3 (moto's server on 127.0.0.1: a real
   S3 API over HTTP, with no network latency; real object stores add 10-50 ms per request);
2. the cost of one commit when the store already holds 10, 10^3 and 10^5 commits (the log is
   filled directly, then commits are timed): it must stay flat.

    .venv/bin/python benchmarks/bench_store_remote.py [--n-sequences 400] [--commit-sizes 10,1000,100000]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from bench_store_layout import commit_rows
from benchlib import machine_info, write_json
from embedcache.commits import CHECKED_ARRAYS, COMMITS_GROUP, Head, crc_of, log_digest, write_head
from embedcache.location import Location
from embedcache.reader import EmbeddingStore
from embedcache.store import ContentResult, create_store, open_root, open_writer

ATTRS = {"format": "embedcache-store", "schema_version": 2, "fingerprint": "bench",
         "config": {"encoder": "bench", "model": "synthetic", "pooling": "mean", "dtype": "float16"},
         "provenance": {}, "embed_dim": 0, "stored_dtype": {"tokens": "float16", "pooled": "float32"}}  # fmt: skip


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
    return server, endpoint


def throughput(location: Location, rows: list[np.ndarray], dim: int, shard_mb: float, reads: int, rng) -> dict:
    create_store(location, attrs={**ATTRS, "embed_dim": dim}, embed_dim=dim, pooled=True, tokens=True,
                 token_dtype="float16", shard_mb=shard_mb)  # fmt: skip
    writer = open_writer(location)
    mb = sum(r.nbytes for r in rows) / 1e6
    write_s = commit_rows(writer, rows, writer.shard_tokens)  # whole-shard commits, as the build makes them

    start = time.perf_counter()
    store = EmbeddingStore(location)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    store.token_arrays()
    read_all_s = time.perf_counter() - start
    ids = rng.choice(store.ids, size=min(reads, len(store.ids)), replace=False)
    start = time.perf_counter()
    read_mb = sum(store.tokens(str(rid)).nbytes for rid in ids) / 1e6
    one_s = time.perf_counter() - start
    return {"write_mb_s": mb / write_s, "commits": store.n_commits, "open_s": open_s, "read_all_mb_s": mb / read_all_s,
            "random_reads_per_s": len(ids) / one_s, "random_read_mb_s": read_mb / one_s}  # fmt: skip


def prefilled_store(location: Location, n: int) -> None:
    """A pooled-only store whose log already holds `n` one-record commits (written directly, not by n commits)."""
    dim = 8
    attrs = {**ATTRS, "embed_dim": dim, "config": {**ATTRS["config"], "tokens": False}}
    create_store(location, attrs=attrs, embed_dim=dim, pooled=True, tokens=False,
                 token_dtype="float16", shard_mb=1.0)  # fmt: skip
    _, root = open_root(location, mode="r+")
    idx = np.arange(n, dtype=np.int64)
    columns = {
        "sequence": np.array([f"r{i}" for i in range(n)], dtype=object),
        "content_index": idx,
        "content": np.array([f"k{i}" for i in range(n)], dtype=object),
        "residues": np.array(["MKT"] * n, dtype=object),
        "n_input_tokens": np.full(n, 3, np.int64),
        "n_cropped": np.zeros(n, np.int64),
        "n_windows": np.ones(n, np.int32),
        "pooled": np.zeros((n, 1, dim), np.float32),
    }
    for name, values in columns.items():
        arr = root[name].with_config({"write_empty_chunks": True})  # as the writer does: every chunk exists
        arr.resize(values.shape)
        arr[:] = values
    log = root[COMMITS_GROUP]
    ranges = np.stack([idx, idx + 1, idx, idx + 1, np.zeros(n, np.int64), np.zeros(n, np.int64)], axis=1)
    log["ranges"].resize(ranges.shape)
    log["ranges"][:] = ranges
    # Commit i wrote row i of every array: its checksums, and the head's digest of the log, as a build writes them.
    crc = np.array([[crc_of(columns[name][i : i + 1]) if name in columns else 0 for name in CHECKED_ARRAYS] for i in range(n)], np.int64)
    log["crc"].resize(crc.shape)
    log["crc"][:] = crc
    write_head(root, Head(n, n, "complete", [], log_digest(ranges, crc)))


def commit_cost(location: Location, n: int, repeats: int) -> dict:
    prefilled_store(location, n)
    start = time.perf_counter()
    writer = open_writer(location)
    open_s = time.perf_counter() - start
    times = []
    for i in range(repeats):
        result = ContentResult(key=f"new{i}", residues="MKV", tokens=None, pooled=np.ones(8, np.float32),
                               n_input_tokens=3, n_cropped=0, n_windows=1)  # fmt: skip
        t = time.perf_counter()
        writer.commit([result], [(f"new_id{i}", result.key)])
        times.append(time.perf_counter() - t)
    return {"commits_before": n, "commit_ms_median": 1000 * float(np.median(times)), "commit_ms_p90": 1000 * float(np.percentile(times, 90)),
            "writer_open_s": open_s}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-sequences", type=int, default=400, help="sequences written and read")
    p.add_argument("--dim", type=int, default=640, help="embedding width (ESM2-150M: 640)")
    p.add_argument("--shard-mb", type=float, default=8.0, help="shard size (MiB); one commit writes whole shards")
    p.add_argument("--reads", type=int, default=200, help="random single-sequence reads timed")
    p.add_argument("--commit-sizes", default="10,1000,100000", help="commits already in the log when commits are timed")
    p.add_argument("--commit-repeats", type=int, default=20, help="commits timed at each log size")
    p.add_argument("--backends", default="local,s3", help="local and/or s3 (moto server on 127.0.0.1)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(415), 0.75, args.n_sequences), 30, 3000).astype(int)
    rows = [rng.standard_normal((n, args.dim), dtype=np.float32).astype(np.float16) for n in lengths]
    mb = sum(r.nbytes for r in rows) / 1e6
    machine = machine_info()
    print(f"machine: {machine['machine']} {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB RAM; "
          f"load average {machine['load_average_at_start']}")
    print(f"data: {args.n_sequences} sequences, {lengths.sum():,} rows x {args.dim} fp16 = {mb:,.0f} MB; shards of {args.shard_mb} MiB\n")
    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    backends = args.backends.split(",")
    server = endpoint = None
    if "s3" in backends:
        server, endpoint = start_s3()

    def location(backend: str, name: str) -> Location:
        if backend == "local":
            return Location.of(tmp / name)
        return Location.of(f"s3://bench/{name}-{uuid.uuid4().hex[:6]}", {"endpoint_url": endpoint})

    results: dict = {"machine": machine, "throughput": {}, "commit_cost": {}}
    print(f"{'backend':>8} | {'write MB/s':>10} | {'commits':>7} | {'open s':>6} | {'read all MB/s':>13} | {'random reads/s':>14} | {'random MB/s':>11}")
    for backend in backends:
        r = throughput(location(backend, "tp.zarr"), rows, args.dim, args.shard_mb, args.reads, rng)
        results["throughput"][backend] = r
        print(f"{backend:>8} | {r['write_mb_s']:>10.0f} | {r['commits']:>7} | {r['open_s']:>6.2f} | {r['read_all_mb_s']:>13.0f} | "
              f"{r['random_reads_per_s']:>14.0f} | {r['random_read_mb_s']:>11.1f}")  # fmt: skip
    if len(backends) == 2:
        lo, s3 = results["throughput"]["local"], results["throughput"]["s3"]
        print(f"S3 / local: write {s3['write_mb_s'] / lo['write_mb_s']:.2f}x, read all {s3['read_all_mb_s'] / lo['read_all_mb_s']:.2f}x, "
              f"random reads {s3['random_reads_per_s'] / lo['random_reads_per_s']:.2f}x")  # fmt: skip

    print(f"\n{'backend':>8} | {'commits before':>14} | {'commit ms (median, p90)':>24} | {'writer open s':>13}")
    for backend in backends:
        for n in [int(x) for x in args.commit_sizes.split(",")]:
            r = commit_cost(location(backend, f"log{n}.zarr"), n, args.commit_repeats)
            results["commit_cost"].setdefault(backend, []).append(r)
            print(f"{backend:>8} | {n:>14,} | {r['commit_ms_median']:>13.1f}, {r['commit_ms_p90']:>8.1f} | {r['writer_open_s']:>13.2f}")
    print("\nthe commit time stays flat as the log grows; opening a writer validates the whole log once (linear)")
    if server is not None:
        server.stop()
    write_json(args.json, results)


if __name__ == "__main__":
    main()
