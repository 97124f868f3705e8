"""Fusion's data path against the accelerator: what each way of feeding the model delivers with a free
model step (each batch is made, then dropped), beside this machine's own limits, at the demo's and the
recipe's shapes. Which side bounds an epoch on one H100 / H200?

Per shape set (demo: `make demo`'s widths and lengths, max_tokens 16; recipe: IsoFormer's encoders at
examples/isoformer/recipe.toml's max_tokens 512), on random fp16 rows in real stores, one run measures:

    limits   memcopy:  a torch copy of the same bytes in the same batch-sized pieces into one reused
                       buffer (the rate a loader that copies every byte once could reach)
             raw read: the files a streamed epoch reads, evicted from the page cache, read sequentially
    loaders  one shuffled train epoch each (memory: the better of two after a first; stream: the first, its
             files evicted from the page cache before the loader opens them)
             pooled          pooled vectors gathered by index where they live (StoreBatches.place)
             pooled-host     the same batches made by the host threads (--feature-device host)
             tokens-memory   every per-token row in RAM, padded per batch on the host (no --max-tokens)
             reduced-memory  rows reduced once to max_tokens (fusion.reduced), gathered by index
             tokens-stream   per-token rows streamed from the stores (no --max-tokens)
             reduced-stream  the reduced arrays streamed, block by block
    reduce   the one pass that makes the reduced arrays, and reopening them (what every later run pays)
    model    the cross-attention fusion model's FLOPs per sample and step (FusionModelConfig defaults,
             forward + backward, torch FlopCounterMode) on full, reduced and pooled inputs, and the
             samples/s an H100 / H200 would consume at 10% MFU of its dense bf16 peak

GB/s counts the batch tensors delivered (features, all modalities); a stream way's "of raw" is the
time a sequential read of its files takes (measured just before) over its epoch's time. Compare figures within one run.

    .venv/bin/python benchmarks/bench_fusion_pace.py                  # both shape sets (~3 GB of stores)
    .venv/bin/python benchmarks/bench_fusion_pace.py --shapes demo --quick
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench_fusion_data import MODALITIES, TRANSCRIPTS_PER_GENE, Shapes, evict, model_rate, raw_read, write_manifest, write_store
from benchlib import GPU_BF16_PEAK_TFLOPS, machine_info, work_directory, write_json
from cli.common import HelpFormatter

MFU = 0.10  # the share of peak a well-fed fusion model reaches (examples/isoformer/README.md's projection)
WAYS = ("pooled", "pooled-host", "tokens-memory", "reduced-memory", "tokens-stream", "reduced-stream")


@dataclass(frozen=True)
class ShapeSet:
    """Widths, rows per record and max_tokens of one configuration."""

    name: str
    dims: dict[str, int]
    lengths: Callable[[int, np.random.Generator], tuple[np.ndarray, ...]]  # (n_genes, rng) -> (gene per transcript, dna, rna, protein rows)
    max_tokens: int
    n_genes: int  # default size


def demo_lengths(n_genes: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """`make demo`: a 2 kb DNA window in 128-bp Enformer bins; RNA ~350-2,500 nt in 6-mers; proteins 80-300 aa."""
    gene = np.repeat(np.arange(n_genes), 1 + rng.poisson(2.1, n_genes))
    rna = np.clip(rng.lognormal(np.log(200), 0.45, len(gene)), 58, 420).astype(int)
    return gene, np.full(n_genes, 16), rna, rng.integers(80, 301, len(gene))


def recipe_lengths(n_genes: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    return Shapes().lengths(n_genes, rng)


SHAPE_SETS = {
    "demo": ShapeSet("demo", {"dna": 96, "rna": 64, "protein": 64}, demo_lengths, max_tokens=16, n_genes=3000),
    "recipe": ShapeSet("recipe", Shapes().dims(), recipe_lengths, max_tokens=512, n_genes=80),
}


def make_data(work: Path, shapes: ShapeSet, n_genes: int, seed: int) -> tuple[Path, dict[str, str]]:
    """Three stores of random fp16 rows (with pooled vectors) and a manifest of one sample per transcript."""
    rng = np.random.default_rng(seed)
    gene, dna, rna, protein = shapes.lengths(n_genes, rng)
    genes, transcripts = [f"G{g:05d}" for g in range(n_genes)], [f"T{t:06d}" for t in range(len(gene))]
    stores = {m: str(work / "stores" / f"{m}.zarr") for m in MODALITIES}
    for m, keys, lens in (("dna", genes, dna), ("rna", transcripts, rna), ("protein", transcripts, protein)):
        rows = [rng.standard_normal((int(n), shapes.dims[m]), dtype=np.float32).astype(np.float16) for n in lens]
        write_store(Path(stores[m]), rows, keys, shapes.dims[m], pooled=True)
    write_manifest(work / "prepared", gene, genes, transcripts, 30, rng)
    return work / "prepared", stores


def open_way(way: str, prepared: Path, stores: dict[str, str], shapes: ShapeSet, reduced_dir: Path, batch_size: int):
    """The StoreBatches of one way, placed for training on this CPU."""
    from fusion.data import DataConfig, open_batches
    from fusion.run import read_manifest

    config = DataConfig(manifest=str(prepared), stores=stores, features="pooled" if way.startswith("pooled") else "tokens",
                        max_tokens=shapes.max_tokens if way.startswith("reduced") else None, batch_size=batch_size,
                        loading="stream" if way.endswith("stream") else "memory", reduced_dir=str(reduced_dir),
                        feature_device="host" if way == "pooled-host" else "auto", memory_gb=1e6)  # fmt: skip
    batches = open_batches(config, read_manifest(prepared), log=lambda s: None)
    batches.place(torch.device("cpu"), log=lambda s: None)
    return batches


def epoch(batches, epoch_no: int) -> dict:
    """One shuffled train epoch with a free model step: seconds, samples, bytes and sizes of the batches' features."""
    t0 = time.perf_counter()
    n = nbytes = steps = 0
    for batch in batches("train", shuffle=True, epoch=epoch_no):
        n += len(batch)
        nbytes += sum(f.x.nbytes for f in batch.features.values())
        steps += 1
    s = time.perf_counter() - t0
    return {"seconds": s, "samples": n, "batches": steps, "gb": nbytes / 1e9, "samples_per_s": n / s, "gb_s": nbytes / 1e9 / s}


def memcopy(nbytes: float, batches: int) -> float:
    """GB/s of a torch copy of `nbytes` in `batches` equal pieces, from one large tensor into one reused buffer."""
    piece = max(int(nbytes / max(batches, 1)), 1)
    src = torch.randn(min(int(nbytes), 1 << 30) // 2 + piece, dtype=torch.float16).view(torch.uint8)  # (bytes,) touched
    dst = torch.empty(piece, dtype=torch.uint8)
    best = 0.0
    for _ in range(3):
        t0, done, at = time.perf_counter(), 0, 0
        while done < nbytes:
            if at + piece > len(src):
                at = 0
            dst.copy_(src[at : at + piece])
            at, done = at + piece, done + piece
        best = max(best, done / 1e9 / (time.perf_counter() - t0))
    return best


def cold_read_seconds(files: list[Path]) -> float:
    """Seconds to read `files` sequentially from the disk (evicted from the page cache first)."""
    evict(files)
    t0 = time.perf_counter()
    raw_read(files)
    return time.perf_counter() - t0


def files_of(way: str, stores: dict[str, str], reduced_dir: Path) -> list[Path]:
    return list(reduced_dir.glob("*.zarr")) if way.startswith("reduced") else [Path(p) / "tokens" for p in stores.values()]


def measure_shapes(shapes: ShapeSet, args: argparse.Namespace, work: Path) -> dict:
    n_genes = args.n_genes or (min(shapes.n_genes, 300 if shapes.name == "demo" else 6) if args.quick else shapes.n_genes)
    t0 = time.perf_counter()
    prepared, stores = make_data(work, shapes, n_genes, args.seed)
    store_gb = sum(f.stat().st_size for p in stores.values() for f in (Path(p) / "tokens").rglob("*") if f.is_file()) / 1e9
    print(f"== {shapes.name}: {n_genes} genes, ~{n_genes * TRANSCRIPTS_PER_GENE if shapes.name == 'recipe' else n_genes * 3.1:,.0f} samples, widths "
          f"{shapes.dims}, max_tokens {shapes.max_tokens}; {store_gb:.2f} GB of per-token chunk files (written in {time.perf_counter() - t0:.0f} s)")
    reduced_dir = work / "reduced"
    t0 = time.perf_counter()
    open_way("reduced-stream", prepared, stores, shapes, reduced_dir, args.batch_size)
    reduce_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_way("reduced-stream", prepared, stores, shapes, reduced_dir, args.batch_size)
    reopen_s = time.perf_counter() - t0
    reduced_gb = sum(f.stat().st_size for f in reduced_dir.rglob("*") if f.is_file()) / 1e9
    print(f"  reduce once: {reduce_s:.1f} s for one pass over the stores ({store_gb / reduce_s:.2f} GB/s of chunk files) -> "
          f"{reduced_gb:.2f} GB of reduced arrays; a later run reopens them in {reopen_s:.2f} s")
    raw = {}
    for name, files in (("stores", files_of("tokens-stream", stores, reduced_dir)), ("reduced", files_of("reduced-stream", stores, reduced_dir))):
        gb = sum(f.stat().st_size for root in files for f in root.rglob("*") if f.is_file()) / 1e9
        raw[name] = {"gb": gb, "gb_s": gb / cold_read_seconds(files)}
    print(f"  raw sequential read, cold: stores {raw['stores']['gb_s']:.2f} GB/s, reduced arrays {raw['reduced']['gb_s']:.2f} GB/s")

    ways = {}
    for way in args.ways.split(","):
        gc.collect()  # the last way's stores and arrays unmapped: their pages can leave the page cache
        if way.endswith("stream"):  # the disk's pace right now (it drifts), then a cold epoch on the same files
            files = files_of(way, stores, reduced_dir)
            raw_s = cold_read_seconds(files)
            resident = evict(files)
            batches = open_way(way, prepared, stores, shapes, reduced_dir, args.batch_size)
            r = {**epoch(batches, 1), "raw_read_seconds": raw_s, "resident_before": resident}
            r["of_raw"] = raw_s / r["seconds"]
            gb = raw["reduced" if way.startswith("reduced") else "stores"]["gb"]
            against = (f"{r['of_raw']:.0%} of raw read (cold, resident before {resident or 0:.0%}; {gb / r['seconds']:.2f} GB/s of "
                       f"files against {gb / raw_s:.2f}; this first epoch also checks each block on its first read)")
        else:
            batches = open_way(way, prepared, stores, shapes, reduced_dir, args.batch_size)
            epoch(batches, 0)
            r = max((epoch(batches, k) for k in (1, 2)), key=lambda x: x["samples_per_s"])
            r["memcopy_gb_s"] = memcopy(r["gb"] * 1e9, r["batches"])
            r["of_memcopy"] = r["gb_s"] / r["memcopy_gb_s"]
            against = f"{r['of_memcopy']:.0%} of memcopy ({r['memcopy_gb_s']:.2f} GB/s)"
        ways[way] = r
        print(f"  {way:15s} {r['samples_per_s']:10,.0f} samples/s {r['gb_s']:7.2f} GB/s  {against}", flush=True)
        del batches

    models = {}
    for rows, way in (("full", "tokens-memory"), (f"reduced {shapes.max_tokens}", "reduced-memory"), ("pooled", "pooled")):
        batches = open_way(way, prepared, stores, shapes, reduced_dir, args.model_batch)
        m = model_rate(batches, 1, args.model_batch, args.seed)
        models[rows] = {"flops_per_sample": m["flops_per_sample"], "params": m["params"], "cpu_samples_per_s": m["samples_per_s"],
                        **{f"{gpu.lower()}_samples_per_s": MFU * dict(GPU_BF16_PEAK_TFLOPS)[gpu] * 1e12 / m["flops_per_sample"]
                           for gpu in ("H100", "H200")}}  # fmt: skip
        print(f"  model on {rows} rows: {m['flops_per_sample'] / 1e9:.3f} GFLOP per sample and step -> an H100 / H200 at "
              f"{MFU:.0%} MFU consumes {models[rows]['h100_samples_per_s']:,.0f} samples/s")
    rows_of = {"pooled": "pooled", "pooled-host": "pooled", "tokens-memory": "full", "tokens-stream": "full"}
    bound = {}
    for way, r in ways.items():
        model = models[rows_of.get(way, f"reduced {shapes.max_tokens}")]
        bound[way] = {"data_over_model": r["samples_per_s"] / model["h100_samples_per_s"],
                      "bound_by": "model" if r["samples_per_s"] >= model["h100_samples_per_s"] else "data"}  # fmt: skip
    print("  an epoch on one H100 / H200 is bound by: " + "; ".join(
        f"{w} {b['bound_by']} ({b['data_over_model']:.2g}x)" for w, b in bound.items()))  # fmt: skip
    return {"n_genes": n_genes, "store_gb": store_gb, "reduce_s": reduce_s, "reopen_s": reopen_s, "reduced_gb": reduced_gb,
            "raw": raw, "ways": ways, "models": models, "bound": bound}  # fmt: skip


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--shapes", default="demo,recipe", help=f"comma-separated shape sets: {', '.join(SHAPE_SETS)}")
    p.add_argument("--n-genes", type=int, help="genes per shape set (default: demo 3000, ~9,300 samples; recipe 80, ~2.3 GB of rows)")
    p.add_argument("--quick", action="store_true", help="demo 300 genes, recipe 6 (~1 min)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch (the recipe's and the demo's)")
    p.add_argument("--model-batch", type=int, default=4, help="samples in the batch the model's FLOPs are counted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep the data here (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, help="write every figure here")
    return p


def run(args: argparse.Namespace) -> dict:
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPE_SETS)) + sorted(set(args.ways.split(",")) - set(WAYS))
    if unknown:
        raise SystemExit(f"bench_fusion_pace.py: unknown --shapes or --ways {unknown}")
    machine = machine_info()
    print(f"== machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB RAM, torch {machine['torch']} "
          f"({torch.get_num_threads()} threads); load average {machine['load_average_at_start']:.2f}")
    results = {"machine": machine, "mfu": MFU, "batch_size": args.batch_size}
    import fusion.run  # noqa: F401 (imported before anything is timed: the first reduction would count it)
    with work_directory(args.workdir, "bench_fusion_pace_") as work:
        for name in args.shapes.split(","):
            results[name] = measure_shapes(SHAPE_SETS[name], args, work / name)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    run(create_parser().parse_args())
