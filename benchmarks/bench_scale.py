"""Scale-out build: memory vs records, the coordinator's ceiling, and the executors on this CPU.

Three measurements, each one function, all in one run (choose with --only):

    memory       peak RSS of the real CLI (`python -m cli.embedcache_cli build ...`), each run in its own
                 subprocess, read from that child's rusage (os.wait4 -> ru_maxrss): planning (--dry-run)
                 of --plan-sizes records and full --no-tokens builds of --build-sizes records of short
                 random proteins (--min-length..--max-length aa) with a tiny random ESM2 (hidden
                 --hidden), so the model is not what is measured. Ratios against the issue's targets:
                 planning of the largest size within 2x of the smallest; full build within 1.5x.
    coordinator  a stand-in "GPU" encoder (registered here as `sim-gpu`) whose forward sleeps
                 tokens / --gpu-tokens-per-s and returns zeros, run through the REAL build() path on a
                 LocalCluster of --sim-workers in-process thread workers (processes=False), each
                 declaring resources={"GPU": 1}. Pooled-only (--no-tokens) so per-token disk writes on
                 a small VM do not mask the coordinator. Fraction of ideal throughput (workers x
                 tokens/s) kept end to end and in the executor phase, and per-unit overheads: planning
                 time per sequence, commit time per unit, scheduling gap per unit, worker CPU per unit,
                 and a projection to N real GPUs from the uncontended costs. On a 2-core VM the thread
                 workers share one process, event loop and GIL: 256 of them take 15+ minutes per case.
    executors    the same small per-token build with the tiny ESM2 in-process vs --scheduler local:1
                 vs local:2 (wall time including cluster start, tokens/s), one after the other.

    .venv/bin/python benchmarks/bench_scale.py [--only memory,coordinator,executors] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the model is made locally; never reach for the hub

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from bench_build import AA_FREQUENCIES
from benchlib import load_average, machine_info, write_json

import embedcache.build as build_module
from embedcache.alphabets import PROTEIN
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.encoders import ENCODERS, Encoder, EncoderEntry, EncoderSettings, WindowOutput
from embedcache.store import StoreWriter

REPO = Path(__file__).resolve().parents[1]
MEASUREMENTS = ("memory", "coordinator", "executors")

# -- input ------------------------------------------------------------------------------------------


def write_proteins(path: Path, n: int, *, min_length: int, max_length: int, seed: int, chunk: int = 100_000) -> Path:
    """n random proteins (uniform lengths, natural amino-acid frequencies) as FASTA, written in chunks
    so that making a million of them costs little memory here."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer("".join(AA_FREQUENCIES).encode(), np.uint8)
    p = np.array(list(AA_FREQUENCIES.values()))
    p = p / p.sum()
    with open(path, "wb") as f:
        for start in range(0, n, chunk):
            lengths = rng.integers(min_length, max_length + 1, size=min(chunk, n - start))
            residues = letters[rng.choice(len(letters), size=int(lengths.sum()), p=p)].tobytes()
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            f.write(b"".join(b">P%09d\n%s\n" % (start + i, residues[s:e]) for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))))
    return path


def fasta_for(work: Path, n: int, args: argparse.Namespace, *, min_length: int, max_length: int) -> Path:
    path = work / f"proteins_{n}_{min_length}_{max_length}.fa"
    if not path.exists():
        write_proteins(path, n, min_length=min_length, max_length=max_length, seed=args.seed)
    return path


# -- 1. memory vs records ---------------------------------------------------------------------------


@dataclass
class ChildRun:
    peak_rss_mb: float  # the child's ru_maxrss (its own peak resident set)
    seconds: float


def run_cli_child(argv: list[str], log_path: Path) -> ChildRun:
    """Run the real CLI in a fresh interpreter and read ITS peak RSS from os.wait4's rusage (not
    RUSAGE_CHILDREN, which keeps the maximum over every child reaped so far)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli.embedcache_cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"embedcache {' '.join(argv)} exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    return ChildRun(usage.ru_maxrss / 1024, seconds)  # ru_maxrss is in KiB on Linux


def measure_memory(args: argparse.Namespace, work: Path) -> dict:
    from embedcache.tiny_models import make_tiny_esm2

    model = make_tiny_esm2(work / "esm2_tiny", hidden=args.hidden, layers=1, heads=2, seed=args.seed)
    common = ["--encoder", "esm2", "--model", str(model), "--no-tokens", "--device", "cpu", "--no-progress"]
    rows = []
    print(f"== memory: peak RSS of the CLI in its own process (tiny ESM2, hidden {args.hidden}; proteins "
          f"{args.min_length}-{args.max_length} aa)")  # fmt: skip
    print(f"  {'run':<10}{'records':>11}{'peak RSS MB':>13}{'seconds':>10}")
    for kind, sizes in (("plan", args.plan_sizes), ("build", args.build_sizes)):
        for n in sizes:
            fasta = fasta_for(work, n, args, min_length=args.min_length, max_length=args.max_length)
            store = work / f"mem_{kind}_{n}.zarr"
            argv = ["build", str(fasta), "-o", str(store), *common, *(["--dry-run"] if kind == "plan" else [])]
            child = run_cli_child(argv, work / f"mem_{kind}_{n}.log")
            rows.append({"kind": kind, "records": n, "peak_rss_mb": round(child.peak_rss_mb, 1), "seconds": round(child.seconds, 2)})
            print(f"  {kind:<10}{n:>11,}{child.peak_rss_mb:>13.1f}{child.seconds:>10.1f}")
            shutil.rmtree(store, ignore_errors=True)
    verdicts = []
    for kind, limit in (("plan", 2.0), ("build", 1.5)):
        mine = [r for r in rows if r["kind"] == kind]
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        ratio = hi["peak_rss_mb"] / lo["peak_rss_mb"]
        per_record = (hi["peak_rss_mb"] - lo["peak_rss_mb"]) * 2**20 / (hi["records"] - lo["records"])
        ok = ratio <= limit
        verdicts.append({"kind": kind, "small": lo["records"], "large": hi["records"], "ratio": round(ratio, 3),
                         "target": limit, "pass": ok, "bytes_per_extra_record": round(per_record, 1)})  # fmt: skip
        print(f"  {kind}: {hi['records']:,} / {lo['records']:,} records = {ratio:.2f}x peak RSS (target <= {limit}x): "
              f"{'PASS' if ok else 'FAIL'}; {per_record:,.0f} bytes per extra record")  # fmt: skip
    return {"model_hidden": args.hidden, "runs": rows, "targets": verdicts}


def profile_planning(args: argparse.Namespace, work: Path, n: int, top: int = 12) -> list[dict]:
    """Where planning's memory goes, in this process: tracemalloc's top allocation sites at the peak
    of `build(..., dry_run=True)` over n records (Python allocations; numpy's buffers included)."""
    import tracemalloc

    from embedcache.tiny_models import make_tiny_esm2

    model = make_tiny_esm2(work / "esm2_tiny", hidden=args.hidden, layers=1, heads=2, seed=args.seed)
    fasta = fasta_for(work, n, args, min_length=args.min_length, max_length=args.max_length)
    config = BuildConfig.create("esm2", str(model), tokens=False, device="cpu")
    tracemalloc.start(8)
    build(config, [fasta], work / "profile.zarr", dry_run=True, progress=False, log=lambda _: None)
    snapshot = tracemalloc.take_snapshot()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stats = snapshot.statistics("lineno")[:top]
    print(f"== planning profile (tracemalloc, {n:,} records): traced peak {peak / 2**20:.1f} MB; live at the end:")
    out = []
    for s in stats:
        frame = s.traceback[0]
        print(f"  {s.size / 2**20:8.2f} MB {s.count:>9,} blocks  {frame.filename.split('/embedcache/')[-1]}:{frame.lineno}")
        out.append({"mb": round(s.size / 2**20, 2), "blocks": s.count, "site": f"{frame.filename}:{frame.lineno}"})
    return out


# -- 2. the coordinator's ceiling, simulated ----------------------------------------------------------


class SimulatedGPU(Encoder):
    """A stand-in for an ESM2 forward on one GPU: tokens are an ESM2-like table lookup, and a batch
    "computes" by sleeping n_tokens / tokens_per_s (the sleep releases the GIL, as a CUDA wait would)."""

    name = "sim-gpu"
    alphabet = PROTEIN
    window = 1022
    has_cls = False
    layer_indices = (1,)
    autocast_dtype = None
    precision = "fp32"

    def __init__(self, settings: EncoderSettings, tokens_per_s: float, embed_dim: int):
        self.settings, self.tokens_per_s, self.embed_dim = settings, tokens_per_s, embed_dim
        self.model = torch.nn.Identity()
        self._table = np.full(256, 3, np.int64)  # <unk> outside the alphabet (never reached: input is checked)
        for i, letter in enumerate(sorted(PROTEIN.letters)):
            self._table[ord(letter)] = 4 + i

    @property
    def device(self) -> torch.device:  # a property, as newer Encoders derive it from the model
        return torch.device("cpu")

    def tokenize(self, seq: str) -> np.ndarray:
        return self._table[np.frombuffer(seq.encode(), np.uint8)]

    def encode_windows(self, windows: list[np.ndarray]) -> list[WindowOutput]:
        time.sleep(sum(len(w) for w in windows) / self.tokens_per_s)
        return [WindowOutput(hidden=torch.zeros(len(w), 1, self.embed_dim), cls=None) for w in windows]

    def cost(self, n_tokens: int) -> int:
        return n_tokens + 2  # as ESM2: <cls> and <eos> around each window

    def provenance(self) -> dict:
        return {"encoder": self.name, "model": self.settings.model, "tokens_per_s": self.tokens_per_s, "embed_dim": self.embed_dim,
                "layer": self.layer_indices[0], "window": self.window, "precision": self.precision}  # fmt: skip


SIM_TOKENS_PER_S = 1e6  # overwritten from --gpu-tokens-per-s before any build
SIM_EMBED_DIM = 8


def _load_simulated(settings: EncoderSettings, *, weights: bool = True) -> Encoder:
    # `weights` is part of the registry's loader signature; a stand-in has no weights either way.
    return SimulatedGPU(settings, SIM_TOKENS_PER_S, SIM_EMBED_DIM)


# Registered at import: thread workers of an in-process LocalCluster share this module's registry.
ENCODERS["sim-gpu"] = EncoderEntry(_load_simulated, "protein", "sim-gpu", "benchmark stand-in: sleeps tokens / rate")


@contextmanager
def timing(owner, name: str, seconds: list[float]) -> Iterator[None]:
    """Wrap the real `owner.name` so each call's wall time is appended to `seconds` (then restore it)."""
    real = getattr(owner, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            seconds.append(time.perf_counter() - t)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, real)


def sequences_per_unit(unit_mb: float, row_bytes: int, mean_length: float) -> int:
    """Sequences of one unit that --unit-mb would give a per-token build of rows of `row_bytes`."""
    return max(1, round(unit_mb * 2**20 / row_bytes / mean_length))


def _task_overheads(task_stream: list[dict], sleep_of_unit: dict[int, float]) -> dict:
    """Per-unit worker time beyond the simulated compute, and the idle gap between a worker's units."""
    spans: dict[str, list[tuple[float, float, int]]] = {}
    for t in task_stream:
        if not str(t["key"]).startswith("embedcache-unit-"):
            continue
        unit = int(str(t["key"]).split("-")[2])
        for ss in t["startstops"]:
            if ss["action"] == "compute":
                spans.setdefault(t["worker"], []).append((ss["start"], ss["stop"], unit))
    extra, gaps = [], []
    for runs in spans.values():
        runs.sort()
        extra += [(stop - start) - sleep_of_unit[unit] for start, stop, unit in runs]
        gaps += [b[0] - a[1] for a, b in zip(runs, runs[1:])]
    median = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {"worker_extra_s_per_unit": median(extra), "gap_s_between_units": median(gaps), "units_seen": sum(map(len, spans.values()))}


def run_simulated_build(client, scheduler: str | None, fasta: Path, store: Path, unit_sequences: int,
                        args: argparse.Namespace) -> dict:
    """One build() through `scheduler` (None: in this process); the real functions are timed in place."""
    from contextlib import nullcontext

    config = BuildConfig.create("sim-gpu", "sim-gpu", tokens=False, device="cpu", max_tokens=args.sim_max_tokens)
    plan_s, commit_s, records_s = [], [], []
    saved = build_module.POOLED_UNIT_SEQUENCES, build_module.UNIT_SEQUENCES
    # pooled-only units are cut by sequence count, not --unit-mb (in this process and on Dask alike here)
    build_module.POOLED_UNIT_SEQUENCES = build_module.UNIT_SEQUENCES = unit_sequences
    if client is not None:
        from distributed import get_task_stream

        stream = get_task_stream(client)
    else:
        stream = nullcontext()
    started = time.perf_counter()
    try:
        with timing(build_module, "plan_build", plan_s), timing(StoreWriter, "commit_units", commit_s), \
                timing(build_module, "_commit_records", records_s), stream as ts:  # fmt: skip
            report = build(config, [fasta], store, scheduler=scheduler, progress=False, log=lambda _: None)
    finally:
        build_module.POOLED_UNIT_SEQUENCES, build_module.UNIT_SEQUENCES = saved
    wall = time.perf_counter() - started
    units = report.plan.units
    sleep_of_unit = {u.index: u.n_tokens / args.gpu_tokens_per_s for u in units}
    n_tokens = report.plan.n_tokens
    executor_s = report.seconds - records_s[0]  # build's own timer: units run and committed (records excluded)
    if client is not None:
        tasks = _task_overheads(ts.data, sleep_of_unit)
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
    else:  # forwards one after another in this thread, each unit committed beside the next one's forward:
        # what is not sleep is the worker's CPU, plus the commit time the overlap did not hide (an upper bound)
        extra = (executor_s - sum(sleep_of_unit.values())) / len(units)
        tasks = {"worker_extra_s_per_unit": extra, "gap_s_between_units": 0.0, "units_seen": len(units)}
        workers = 1
    ideal = n_tokens / (workers * args.gpu_tokens_per_s)
    return {
        "executor": "in-process" if client is None else "dask threads",
        "workers": workers,
        "unit_sequences": unit_sequences,
        "units": len(units),
        "sequences": report.plan.n_new,
        "tokens": n_tokens,
        "tokens_per_unit": n_tokens / len(units),
        "simulated_s_per_unit": statistics.mean(sleep_of_unit.values()),
        "wall_s": wall,
        "ideal_s": ideal,
        "fraction_end_to_end": ideal / wall,
        "fraction_executor_phase": ideal / executor_s,
        "plan_s": plan_s[0],
        "plan_us_per_sequence": 1e6 * plan_s[0] / report.plan.n_records,
        "executor_s": executor_s,
        "records_commit_s": records_s[0],
        # Finished units are committed together (one commit per batch of results), so per unit = total / units.
        "commit_ms_per_unit": 1e3 * sum(commit_s) / len(units),
        "commits": len(commit_s),
        "commit_ms_per_commit": 1e3 * statistics.median(commit_s),
        "commit_s_total": sum(commit_s),
        "tokens_per_s": n_tokens / wall,
        **tasks,
    }


def project(r: dict, rate: float, mean_length: float) -> dict:
    """Bounds from one run's per-unit costs: the client commits one unit after another (an upper bound:
    on a cluster, units that finish together are committed in one commit), and planning runs before
    any unit starts."""
    commit_bound_workers = r["tokens_per_unit"] / (r["commit_ms_per_unit"] / 1e3) / rate
    plan_tokens_per_s = mean_length / (r["plan_us_per_sequence"] / 1e6)
    return {"commit_bound_workers": commit_bound_workers, "plan_tokens_per_s": plan_tokens_per_s,
            "plan_bound_workers": plan_tokens_per_s / rate}  # fmt: skip


def projection_table(rows: list[dict], args: argparse.Namespace, targets=(8, 16, 64, 256)) -> list[dict]:
    """Fraction of ideal a real cluster of N GPUs would keep, from the uncontended in-process costs
    (planning per sequence, commit per unit, worker CPU per unit) and --sched-overhead-ms per unit
    (the gaps measured here are those of one contended process, not of a cluster), for a build of
    `--sim-units-per-worker` units per GPU (the fractions do not depend on it):

        unit time on a GPU = simulated compute + worker CPU + scheduling gap (run_unit does not overlap them)
        executor phase     = max(units per GPU x unit time, units x commit time)   (one client commits)
        whole build        = planning (all of it before the first unit) + executor phase
    """
    out = []
    print("  projection to N real GPUs (worker CPU on their own hosts), from the in-process baseline's costs and "
          f"{args.sched_overhead_ms:g} ms of scheduling per unit (the fractions do not depend on units per GPU):")  # fmt: skip
    print(f"  {'unit MB':>9}{'GPUs':>6}{'GPU busy':>10}{'commit-bound':>14}{'exec kept':>11}{'kept (with planning)':>22}")
    for base in (r for r in rows if r["executor"] == "in-process"):
        gap = args.sched_overhead_ms / 1e3
        sim = base["simulated_s_per_unit"]
        unit_s = sim + max(base["worker_extra_s_per_unit"], 0.0) + gap
        commit_s = base["commit_ms_per_unit"] / 1e3
        for n in targets:
            units = n * args.sim_units_per_worker
            ideal = units * sim / n
            executor = max(args.sim_units_per_worker * unit_s, units * commit_s)
            plan = units * base["unit_sequences"] * base["plan_us_per_sequence"] / 1e6
            row = {"unit_mb": base["unit_mb"], "gpus": n, "gpu_busy": sim / unit_s, "commit_bound": units * commit_s > args.sim_units_per_worker * unit_s,
                   "fraction_executor_phase": ideal / executor, "fraction_end_to_end": ideal / (plan + executor)}  # fmt: skip
            out.append(row)
            print(f"  {base['unit_mb']:>9g}{n:>6}{row['gpu_busy']:>10.1%}{'yes' if row['commit_bound'] else 'no':>14}"
                  f"{row['fraction_executor_phase']:>11.1%}{row['fraction_end_to_end']:>22.1%}")  # fmt: skip
    return out


def measure_coordinator(args: argparse.Namespace, work: Path) -> dict:
    import distributed

    global SIM_TOKENS_PER_S
    SIM_TOKENS_PER_S = args.gpu_tokens_per_s
    mean_length = (args.sim_min_length + args.sim_max_length) / 2
    print(f"== coordinator ceiling, simulated: each worker = one GPU at {args.gpu_tokens_per_s:,.0f} tokens/s (sleep), "
          f"pooled only (--no-tokens); proteins {args.sim_min_length}-{args.sim_max_length} aa")  # fmt: skip
    print(f"  unit size: --unit-mb X of a per-token build with {args.sim_row_bytes}-byte rows (ESM2-150M fp16) = "
          f"X * 2^20 / {args.sim_row_bytes} tokens; pooled-only units are cut by sequence count, set to match")  # fmt: skip
    header = (f"  {'executor':<13}{'workers':>7}{'unit MB':>8}{'seq/unit':>9}{'units':>7}{'sim s/unit':>11}{'wall s':>8}{'ideal s':>8}"
              f"{'kept':>7}{'exec kept':>10}{'plan us/seq':>12}{'commit ms/unit':>15}{'gap ms':>8}{'wkr extra ms':>13}")  # fmt: skip
    print(header)
    rows = []

    def show(r: dict) -> None:
        print(f"  {r['executor']:<13}{r['workers']:>7}{r['unit_mb']:>8g}{r['unit_sequences']:>9}{r['units']:>7}"
              f"{r['simulated_s_per_unit']:>11.3f}{r['wall_s']:>8.1f}{r['ideal_s']:>8.2f}{r['fraction_end_to_end']:>7.1%}"
              f"{r['fraction_executor_phase']:>10.1%}{r['plan_us_per_sequence']:>12.1f}{r['commit_ms_per_unit']:>15.1f}"
              f"{1e3 * r['gap_s_between_units']:>8.1f}{1e3 * r['worker_extra_s_per_unit']:>13.1f}")  # fmt: skip

    def one(client, scheduler, workers: int, unit_mb: float, units_per_worker: int) -> None:
        per_unit = sequences_per_unit(unit_mb, args.sim_row_bytes, mean_length)
        n = per_unit * workers * units_per_worker
        fasta = fasta_for(work, n, args, min_length=args.sim_min_length, max_length=args.sim_max_length)
        store = work / f"sim_{workers}_{unit_mb}_{scheduler is None}.zarr"
        r = run_simulated_build(client, scheduler, fasta, store, per_unit, args)
        r.update(unit_mb=unit_mb, **project(r, args.gpu_tokens_per_s, mean_length))
        rows.append(r)
        show(r)
        shutil.rmtree(store, ignore_errors=True)

    # Baseline: one simulated GPU in this thread, nothing else running: the worker's CPU per unit uncontended.
    for unit_mb in args.sim_unit_mb:
        one(None, None, 1, unit_mb, args.sim_baseline_units)
    for workers in args.sim_workers:
        # Thread workers share this process: no per-worker memory limit (the default would pause them).
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, resources={"GPU": 1},
                                      dashboard_address=None, memory_limit=0) as cluster, \
                distributed.Client(cluster) as client:  # fmt: skip
            for unit_mb in args.sim_unit_mb:
                one(client, cluster.scheduler_address, workers, unit_mb, args.sim_units_per_worker)
    print("  kept = ideal / wall of the whole build() (plan + units + commits); exec kept = ideal / the build's own "
          "executor phase (units run and committed). On this VM every worker is a thread of one process, so worker "
          "CPU (spool reads, tokenising, pooling, hashing) shares one GIL and two cores with the client and scheduler.")
    projections = projection_table(rows, args)
    return {"gpu_tokens_per_s": args.gpu_tokens_per_s, "row_bytes": args.sim_row_bytes, "runs": rows, "projection": projections}


# -- 3. executors on this CPU ----------------------------------------------------------------------


def measure_executors(args: argparse.Namespace, work: Path) -> dict:
    from embedcache.tiny_models import make_tiny_esm2

    model = make_tiny_esm2(work / "esm2_exec", hidden=args.exec_hidden, layers=2, heads=4, seed=args.seed)
    fasta = fasta_for(work, args.exec_sequences, args, min_length=50, max_length=300)
    config = BuildConfig.create("esm2", str(model), device="cpu", unit_mb=args.exec_unit_mb, shard_mb=args.exec_unit_mb / 4)
    print(f"== executors: the same per-token build ({args.exec_sequences} proteins 50-300 aa, tiny ESM2 hidden "
          f"{args.exec_hidden}, --unit-mb {args.exec_unit_mb:g}) on {os.cpu_count()} cores")  # fmt: skip
    print(f"  {'executor':<12}{'wall s':>8}{'units s':>9}{'tokens/s':>11}{'units':>7}")
    rows = []
    for scheduler in (None, "local:1", "local:2"):
        store = work / f"exec_{scheduler or 'inproc'}.zarr".replace(":", "_")
        started = time.perf_counter()
        report = build(config, [fasta], store, scheduler=scheduler, progress=False, log=lambda _: None)
        wall = time.perf_counter() - started
        name = scheduler or "in-process"
        rows.append({"executor": name, "wall_s": wall, "build_s": report.seconds, "tokens": report.plan.n_tokens,
                     "tokens_per_s": report.plan.n_tokens / wall, "units": len(report.plan.units)})  # fmt: skip
        print(f"  {name:<12}{wall:>8.1f}{report.seconds:>9.1f}{report.plan.n_tokens / wall:>11,.0f}{len(report.plan.units):>7}")
        shutil.rmtree(store, ignore_errors=True)
    print("  wall = the whole build() call (planning, cluster start, units, commits); units s = the build's own timer "
          "from the first unit to the last commit (cluster start included for local:N)")
    return {"runs": rows, "load_average_end": load_average()}


# -- driver ------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated measurements to run: memory, coordinator, executors")
    p.add_argument("--seed", type=int, default=0, help="seed of the random proteins and models")
    p.add_argument("--workdir", type=Path, help="where inputs and stores go (default: a temporary directory, removed)")
    p.add_argument("--json", type=Path, help="write every figure and the machine here")
    m = p.add_argument_group("memory")
    m.add_argument("--plan-sizes", type=_ints, default=[10_000, 100_000, 1_000_000], help="records planned with --dry-run (first = baseline)")
    m.add_argument("--build-sizes", type=_ints, default=[10_000, 100_000], help="records of full --no-tokens builds (first = baseline)")
    m.add_argument("--min-length", type=int, default=20, help="shortest protein of the memory inputs (aa)")
    m.add_argument("--max-length", type=int, default=60, help="longest protein of the memory inputs (aa)")
    m.add_argument("--hidden", type=int, default=8, help="hidden size of the tiny random ESM2 (1 layer): small, so the model is not measured")
    m.add_argument("--profile", type=int, default=0, metavar="N", help="also profile planning of N records in this process with tracemalloc (0: only when a target fails, at the largest build size)")
    c = p.add_argument_group("coordinator")
    c.add_argument("--sim-workers", type=_ints, default=[16, 64, 256], help="simulated GPU workers (threads of one LocalCluster)")
    c.add_argument("--sim-unit-mb", type=_floats, default=[16.0, 64.0], help="unit sizes as --unit-mb of a per-token build (the CLI default is 256)")
    c.add_argument("--sim-row-bytes", type=int, default=1280, help="bytes of one per-token row that --unit-mb counts (640-d fp16 = ESM2-150M)")
    c.add_argument("--sim-units-per-worker", type=int, default=2, help="units per worker in each simulated build (input size follows)")
    c.add_argument("--sim-baseline-units", type=int, default=4, help="units of the in-process baseline (one simulated GPU, no Dask) per unit size")
    c.add_argument("--sim-min-length", type=int, default=100, help="shortest protein of the simulated builds (aa)")
    c.add_argument("--sim-max-length", type=int, default=500, help="longest protein of the simulated builds (aa)")
    c.add_argument("--sim-max-tokens", type=int, default=65536, help="token budget of one simulated GPU batch")
    c.add_argument("--sched-overhead-ms", type=float, default=1.0, help="scheduling cost per unit in the projection (distributed's docs: about 1 ms per task)")
    c.add_argument("--gpu-tokens-per-s", type=float, default=1e6, help="simulated GPU speed (ESM2-150M forward on an H100: ~1M tokens/s)")
    e = p.add_argument_group("executors")
    e.add_argument("--exec-sequences", type=int, default=2000, help="proteins (50-300 aa) of the executor comparison")
    e.add_argument("--exec-hidden", type=int, default=32, help="hidden size of its tiny ESM2 (2 layers)")
    e.add_argument("--exec-unit-mb", type=float, default=1.0, help="--unit-mb of the executor comparison (small: several units)")
    return p


def run(args: argparse.Namespace) -> dict:
    only = [x for x in args.only.split(",") if x]
    unknown = set(only) - set(MEASUREMENTS)
    if unknown:
        raise SystemExit(f"--only {args.only!r}: unknown {sorted(unknown)}; choose from {list(MEASUREMENTS)}")
    machine = machine_info()
    print("== machine")
    print(f"  {machine['platform']}  {machine['cpu_model']}; {machine['cpu_cores']} cores, {machine['ram_gib']} GiB RAM; "
          f"python {machine['python']}, torch {machine['torch']}, embedcache {machine['embedcache']}")  # fmt: skip
    print(f"  load average (1 min) at start: {machine['load_average_at_start']:.2f}")
    figures: dict = {"benchmark": "bench_scale", "date": time.strftime("%Y-%m-%d"), "machine": machine,
                     "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        steps: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
            "memory": measure_memory, "coordinator": measure_coordinator, "executors": measure_executors}  # fmt: skip
        for name in only:
            figures[name] = steps[name](args, work)
        failed = [t for t in figures.get("memory", {}).get("targets", []) if not t["pass"]]
        if args.profile or failed:
            n = args.profile or max(args.build_sizes)
            figures["planning_profile"] = profile_planning(args, work, n)
    figures["load_average_end"] = load_average()
    print(f"== load average (1 min) at the end: {figures['load_average_end']:.2f}")
    write_json(args.json, figures)
    return figures


def main() -> None:
    run(create_parser().parse_args())


if __name__ == "__main__":
    main()
