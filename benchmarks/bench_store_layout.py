"""Store layout: write and read speed, and size, of the per-token array for several chunk sizes.

Uses the real store code (create_store, StoreWriter.commit, EmbeddingStore) on synthetic fp16
rows shaped like ESM2-150M output (640 wide) with human-proteome-like lengths, so the chosen
defaults (1 MiB inner chunks in 32 MiB shards) are checked on this machine, side by side.

    .venv/bin/python benchmarks/bench_store_layout.py [--n-sequences 2000] [--dim 640]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import machine_info, write_json
from embedcache.reader import EmbeddingStore
from embedcache.store import ContentResult, create_store, open_writer

ATTRS = {"format": "embedcache-store", "schema_version": 2, "fingerprint": "bench", "config": {"encoder": "bench", "model": "synthetic", "pooling": "mean", "dtype": "float16"},
         "provenance": {}, "embed_dim": 0, "stored_dtype": {"tokens": "float16", "pooled": "float32"}}  # fmt: skip


def proteome_lengths(n: int, rng: np.random.Generator, cap: int) -> np.ndarray:
    """Log-normal lengths with the human proteome's median (~415 aa) and long tail, capped."""
    return np.clip(rng.lognormal(mean=np.log(415), sigma=0.75, size=n), 30, cap).astype(int)


def write_store(path: Path, rows: list[np.ndarray], dim: int, chunk_kb: int, shard_mb: float, group_rows: int) -> float:
    create_store(path, attrs={**ATTRS, "embed_dim": dim}, embed_dim=dim, pooled=True, tokens=True, token_dtype="float16",
                 shard_mb=shard_mb, chunk_bytes=chunk_kb * 1024)  # fmt: skip
    return commit_rows(open_writer(path), rows, group_rows)


def commit_rows(writer, rows: list[np.ndarray], group_rows: int) -> float:
    """Commit synthetic per-token rows in whole-shard groups, as a build does; mark complete; seconds taken."""
    start = time.perf_counter()
    buffer, n = [], 0
    for i, r in enumerate(rows):
        buffer.append(ContentResult(key=f"k{i}", residues="A" * len(r), tokens=r, pooled=r.mean(0).astype(np.float32),
                                    n_input_tokens=len(r), n_cropped=0, n_windows=1))  # fmt: skip
        n += len(r)
        if n >= group_rows or i == len(rows) - 1:
            writer.commit(buffer, [(f"id{i - len(buffer) + 1 + j}", b.key) for j, b in enumerate(buffer)])
            buffer, n = [], 0
    writer.set_status("complete")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-sequences", type=int, default=2000, help="sequences in the store")
    p.add_argument("--dim", type=int, default=640, help="embedding width (ESM2-150M: 640)")
    p.add_argument("--max-length", type=int, default=3000, help="cap on sequence length")
    p.add_argument("--chunks-kb", default="64,256,1024,4096", help="inner chunk sizes to compare (KiB)")
    p.add_argument("--shard-mb", type=float, default=32.0, help="shard size (MiB)")
    p.add_argument("--reads", type=int, default=300, help="random single-sequence reads timed")
    p.add_argument("--workdir", help="where to write stores (default: a temp dir)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    lengths = proteome_lengths(args.n_sequences, rng, args.max_length)
    rows = [rng.standard_normal((n, args.dim), dtype=np.float32).astype(np.float16) for n in lengths]
    mb = sum(r.nbytes for r in rows) / 1e6
    machine = machine_info()
    print(f"machine: {machine['machine']} {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB RAM, "
          f"python {machine['python']}; load average {machine['load_average_at_start']}")
    print(f"data: {args.n_sequences} sequences, median length {int(np.median(lengths))}, {lengths.sum():,} rows x {args.dim} fp16 = {mb:,.0f} MB\n")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_store_"))
    results = []
    print(f"{'chunk':>8} {'shard':>7} | {'write MB/s':>10} | {'read all MB/s':>13} | {'1-seq read ms (median, p95)':>28} | {'size/raw':>8}")
    for chunk_kb in [int(c) for c in args.chunks_kb.split(",")]:
        path = root / f"chunk{chunk_kb}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        shard_rows = int(args.shard_mb * (1 << 20) // (args.dim * 2))
        seconds = write_store(path, rows, args.dim, chunk_kb, args.shard_mb, shard_rows)
        store = EmbeddingStore(path)
        start = time.perf_counter()
        store.token_arrays()
        read_all = time.perf_counter() - start
        ids = rng.choice(store.ids, size=min(args.reads, len(store.ids)), replace=False)
        times = []
        for rid in ids:
            t = time.perf_counter()
            store.tokens(str(rid))
            times.append((time.perf_counter() - t) * 1000)
        size = store.size_on_disk() / 1e6
        r = {"chunk_kb": chunk_kb, "shard_mb": args.shard_mb, "write_mb_s": mb / seconds, "read_all_mb_s": mb / read_all,
             "read_one_ms_median": float(np.median(times)), "read_one_ms_p95": float(np.percentile(times, 95)), "size_ratio": size / mb}  # fmt: skip
        results.append(r)
        print(f"{chunk_kb:>6}KB {args.shard_mb:>5.0f}MB | {r['write_mb_s']:>10.0f} | {r['read_all_mb_s']:>13.0f} | "
              f"{r['read_one_ms_median']:>15.2f}, {r['read_one_ms_p95']:>10.2f} | {r['size_ratio']:>8.3f}")  # fmt: skip
        shutil.rmtree(path, ignore_errors=True)
    print("\nreads are warm (the OS page cache holds what was just written); random data does not compress, as real fp16 embeddings barely do")
    write_json(args.json, {"machine": machine, "results": results})


if __name__ == "__main__":
    main()
