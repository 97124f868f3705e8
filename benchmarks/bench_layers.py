"""Several layers in one pass (`--layer 2 4 -1`) against one build per layer, side by side.

ESM's extract.py users ask for `--repr_layers 0 32 33` because the best layer differs by task. The
alternative to one multi-layer build is a build per layer: the same forward passes repeated. This
script times both on the same proteins and model (ESM2 8M shape, random weights), checks that every
layer of the multi-layer store equals its single-layer store, and reports time and disk per side.

    .venv/bin/python benchmarks/bench_layers.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import load_average, machine_info, write_json

from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.tiny_models import make_tiny_esm2

AA = "ACDEFGHIKLMNPQRSTVWY"


def write_proteins(path: Path, n: int, median: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.6, n).astype(int), 20, 1022)
    path.write_text("".join(f">p{i}\n{''.join(rng.choice(list(AA), k))}\n" for i, k in enumerate(lengths)))
    return path


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed_build(model: Path, fasta: Path, store: Path, layers: tuple[int, ...], max_tokens: int) -> float:
    config = BuildConfig.create("esm2", str(model), layers=layers, max_tokens=max_tokens)
    started = time.perf_counter()
    build(config, [fasta], store, progress=False, log=lambda s: None)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-sequences", type=int, default=200, help="synthetic proteins")
    p.add_argument("--median-length", type=float, default=300.0, help="median protein length (log-normal)")
    p.add_argument("--hidden", type=int, default=320, help="model width (ESM2 8M: 320)")
    p.add_argument("--model-layers", type=int, default=6, help="model depth (ESM2 8M: 6)")
    p.add_argument("--layers", default="2,4,-1", help="hidden states stored, comma-separated")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of one batch")
    p.add_argument("--repeats", type=int, default=2, help="rounds of both sides, alternating; each side's fastest counts")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    layers = tuple(int(x) for x in args.layers.split(","))

    work = Path(tempfile.mkdtemp(prefix="bench_layers_"))
    try:
        model = make_tiny_esm2(work / "model", hidden=args.hidden, layers=args.model_layers, heads=20 if args.hidden % 20 == 0 else 4)
        fasta = write_proteins(work / "in.fa", args.n_sequences, args.median_length, seed=0)
        machine = machine_info()
        print(f"== machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, torch {machine['torch']}, "
              f"load {machine['load_average_at_start']:.2f}")  # fmt: skip
        timed_build(model, fasta, work / "warmup.zarr", (-1,), args.max_tokens)  # first-call costs out of the timings
        # Alternate the sides, fresh stores each round, and keep each side's fastest round: on a shared
        # machine a side that happened to run while others were busy would otherwise look slower.
        multi_runs, single_runs = [], []
        for r in range(args.repeats):
            multi_runs.append(timed_build(model, fasta, work / f"multi{r}.zarr", layers, args.max_tokens))
            multi = open_store(work / f"multi{r}.zarr")
            single_runs.append([timed_build(model, fasta, work / f"r{r}-layer{i}.zarr", (i,), args.max_tokens) for i in multi.layers])
        multi_s, single_s = min(multi_runs), min(single_runs, key=sum)
        single_bytes, equal = 0, True
        for layer in multi.layers:
            path = work / f"r0-layer{layer}.zarr"
            single_bytes += store_bytes(path)
            single = open_store(path)
            equal &= all(np.array_equal(multi.tokens(r, layer=layer), single.tokens(r)) for r in single.ids)
        figures = {
            "benchmark": "bench_layers",
            "machine": machine,
            "load_average_at_end": load_average(),
            "sequences": args.n_sequences,
            "layers": multi.layers,
            "one_pass_s": round(multi_s, 2),
            "one_build_per_layer_s": [round(s, 2) for s in single_s],
            "speedup": round(sum(single_s) / multi_s, 2),
            "one_pass_bytes": store_bytes(work / "multi0.zarr"),
            "rounds": {"one_pass_s": [round(t, 2) for t in multi_runs], "one_build_per_layer_s": [round(sum(t), 2) for t in single_runs]},
            "one_build_per_layer_bytes": single_bytes,
            "every_layer_equal": bool(equal),
        }
        print(f"== {args.n_sequences} proteins, ESM2 shape {args.hidden} x {args.model_layers}, layers {multi.layers}")
        print(f"  one pass, {len(multi.layers)} layers: {multi_s:7.1f} s  {figures['one_pass_bytes'] / 1e6:8.1f} MB")
        print(f"  one build per layer:   {sum(single_s):7.1f} s  {single_bytes / 1e6:8.1f} MB  ({', '.join(f'{s:.1f}' for s in single_s)} s)")
        print(f"  speedup of one pass: {figures['speedup']:.2f}x; every layer equal to its own build: {equal}")
        write_json(args.json, figures)
        if not equal:
            print("ERROR: a layer of the multi-layer store differs from its single-layer build", file=sys.stderr)
            raise SystemExit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
