"""What the integrity checks cost: on opening a store (every reader and every build) and on a streamed epoch.

Uses the real store code (create_store, StoreWriter.commit, EmbeddingStore, StoreWriter) on synthetic
stores, side by side in one run:

    open    a store of many records in many commits (default 100,000 records in 1,000 commits):
            `open_store` and `open_writer` wall, beside the checks alone (the commit log's digest, each
            commit's crc32 over the index arrays, the shard digests' map) over the same arrays
    epoch   a store of per-token rows (default ~1 GB, ESM2-150M width, proteome-like lengths): one
            streamed epoch of shuffled batches through `read_tokens_into`, as fusion reads, on a fresh
            store object (each shard's digest checked on its first read: the whole shard read once more)
            and again on the same object (every shard checked already), beside the same reads with the
            shard check off and the raw read of the shard files; page cache warm for all

    .venv/bin/python benchmarks/bench_integrity.py [--records 100000] [--commits 1000] [--epoch-mb 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_store_layout import commit_rows, proteome_lengths, write_store
from benchlib import machine_info, write_json
from embedcache.commits import crc_of, log_digest, token_shards
from embedcache.reader import EmbeddingStore
from embedcache.store import open_writer, shard_rows


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def open_costs(work: Path, n_records: int, n_commits: int, repeats: int) -> dict:
    """Open a many-commit store as a reader and as a writer; the checks alone over the same arrays."""
    path = work / "open.zarr"
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((2, 8)).astype(np.float16) for _ in range(n_records)]  # tiny rows: opening reads none
    write_store(path, rows, dim=8, chunk_kb=1024, shard_mb=1.0, group_rows=2 * n_records // n_commits)
    store = EmbeddingStore(path)
    index, log = store._index, store.log
    arrays = {"sequence": np.array(index.ids, dtype=object), "content_index": index.content_index,
              "content": index.content_keys, "token_offset": index.offsets, "token_length": index.lengths}  # fmt: skip

    def checks_alone() -> None:
        log_digest(log.ranges, log.crc)
        for name, values in arrays.items():
            for lo, hi in log.spans(name):
                crc_of(values[lo:hi])
        token_shards(log, shard_rows(store.root["tokens"]), "bench")

    reader = best(lambda: EmbeddingStore(path), repeats)
    writer = best(lambda: open_writer(path), repeats)
    checks = best(checks_alone, repeats)
    return {"records": n_records, "commits": store.n_commits, "open_store_s": reader, "open_writer_s": writer,
            "checks_s": checks, "checks_share_of_open": checks / reader}  # fmt: skip


def epoch_costs(work: Path, epoch_mb: float, dim: int, batch: int, repeats: int) -> dict:
    """One shuffled streamed epoch: first read (shards checked), again (checked), unchecked, raw files."""
    path = work / "epoch.zarr"
    rng = np.random.default_rng(1)
    lengths = proteome_lengths(int(epoch_mb * 1e6 / (415 * dim * 2)), rng, cap=3000)
    rows = [rng.standard_normal((n, dim)).astype(np.float16) for n in lengths]
    from embedcache.store import create_store
    from bench_store_layout import ATTRS

    create_store(path, attrs={**ATTRS, "embed_dim": dim}, embed_dim=dim, pooled=True, tokens=True, token_dtype="float16", shard_mb=32.0)
    commit_rows(open_writer(path), rows, group_rows=int(256e6 / (dim * 2)))  # --unit-mb 256 commits
    del rows
    order = np.random.default_rng(2).permutation(len(lengths))
    n_bytes = int(lengths.sum()) * dim * 2

    def epoch(store: EmbeddingStore) -> float:
        ids = [store.ids[i] for i in order]
        out = np.empty((batch, int(lengths.max()), dim), np.float16)
        start = time.perf_counter()
        for i in range(0, len(ids), batch):
            part = ids[i : i + batch]
            store.read_tokens_into(part, out[: len(part)])
        return time.perf_counter() - start

    def raw() -> None:
        for f in (path / "tokens" / "c").rglob("*"):
            if f.is_file():
                f.read_bytes()

    raw()  # warm the page cache: every side below reads from memory
    results: dict[str, list[float]] = {"first": [], "checked": [], "unchecked": []}
    for _ in range(repeats):
        store = EmbeddingStore(path)
        results["first"].append(epoch(store))
        results["checked"].append(epoch(store))
        plain = EmbeddingStore(path)
        plain._index.shards = None  # the same reads with the shard check off (as a store from before digests)
        results["unchecked"].append(epoch(plain))
    raw_s = best(raw, repeats)
    first, checked, unchecked = (min(v) for v in results.values())
    return {"records": len(lengths), "bytes": n_bytes, "raw_read_GBps": n_bytes / raw_s / 1e9,
            "first_epoch_GBps": n_bytes / first / 1e9, "checked_epoch_GBps": n_bytes / checked / 1e9,
            "unchecked_epoch_GBps": n_bytes / unchecked / 1e9, "first_over_unchecked": first / unchecked,
            "checked_over_unchecked": checked / unchecked}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000, help="records of the open-cost store")
    p.add_argument("--commits", type=int, default=1000, help="commits of the open-cost store")
    p.add_argument("--epoch-mb", type=float, default=1000.0, help="per-token bytes of the epoch store (MB)")
    p.add_argument("--dim", type=int, default=640, help="per-token width of the epoch store (ESM2-150M: 640)")
    p.add_argument("--batch", type=int, default=32, help="records per batch of the epoch")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each side; the best is reported")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_integrity_") as tmp:
        work = Path(tmp)
        opened = open_costs(work, args.records, args.commits, args.repeats)
        print(f"open: {opened['records']:,} records in {opened['commits']:,} commits: open_store {opened['open_store_s'] * 1e3:.0f} ms, "
              f"open_writer {opened['open_writer_s'] * 1e3:.0f} ms; the checks alone {opened['checks_s'] * 1e3:.0f} ms "
              f"({opened['checks_share_of_open']:.0%} of open_store)")
        epoch = epoch_costs(work, args.epoch_mb, args.dim, args.batch, args.repeats)
        print(f"epoch: {epoch['records']:,} records, {epoch['bytes'] / 1e9:.2f} GB, batches of {args.batch}, page cache warm: "
              f"raw read {epoch['raw_read_GBps']:.2f} GB/s; first epoch (shards checked) {epoch['first_epoch_GBps']:.2f} GB/s, "
              f"later epochs {epoch['checked_epoch_GBps']:.2f} GB/s, check off {epoch['unchecked_epoch_GBps']:.2f} GB/s: "
              f"first epoch {epoch['first_over_unchecked']:.2f}x, later {epoch['checked_over_unchecked']:.2f}x the unchecked time")
    write_json(args.json, {"machine": machine_info(), "open": opened, "epoch": epoch})


if __name__ == "__main__":
    main()
