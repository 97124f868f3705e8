"""Build throughput: `embedcache.build` against the naive loop people write, same input and model, one run.

Both sides read the same FASTA of synthetic proteins (log-normal lengths like the human proteome,
residues drawn with natural amino-acid frequencies) and load the same small random-initialised
ESM2 from the same directory. They alternate `--repeats` times after a short warm-up of each.

    naive       input order, fixed batch size, `tokenizer(batch, padding=True, truncation=True,
                max_length=1024)`, fp32, per-token outputs and mean-pooled vectors kept as numpy
                arrays in a list (it writes NO store)
    embedcache  `build()` into a fresh store: content keys, length-sorted batches under a token
                budget, per-token fp16 + pooled fp32 written to Zarr by a background thread

Throughput = residues embedded / wall seconds of the whole side (read FASTA, load model, tokenize,
run, keep or write the outputs), so both sides share one numerator. With the default
--max-length 1022 no sequence is longer than one ESM2 window: the naive side truncates nothing and
embedcache windows nothing, so both do the same model work. The pooled vectors of every sequence
are compared between the two sides before any figure is reported.

On CUDA it also times embedcache with precision auto (bf16 autocast) and reports model FLOPs
utilisation against the GPU's dense bf16 peak.

    .venv/bin/python benchmarks/bench_build.py [--n-sequences N] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the model is made locally; never reach for the hub

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchlib import gpu_peak_tflops, machine_info, write_json

# Natural amino-acid frequencies (UniProtKB/Swiss-Prot release statistics, percent).
AA_FREQUENCIES = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07, "H": 2.27, "I": 5.96,
    "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56, "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}  # fmt: skip

ESM2_WINDOW = 1022  # content tokens of one ESM2 call: 1024 positions minus <cls> and <eos>
NAIVE_MAX_LENGTH = 1024  # what the naive loop passes to the tokenizer (specials included)
N_SPECIAL = 2  # ESM2 wraps every window in <cls> ... <eos>

# -- input ----------------------------------------------------------------------------------------


def sample_lengths(
    rng: np.random.Generator, n: int, *, median: float, sigma: float, min_length: int, max_length: int
) -> np.ndarray:
    """n lengths from a log-normal truncated to [min_length, max_length] (draws outside are redrawn)."""
    kept: list[np.ndarray] = []
    have = 0
    while have < n:
        draw = np.rint(rng.lognormal(np.log(median), sigma, size=2 * n)).astype(np.int64)
        draw = draw[(draw >= min_length) & (draw <= max_length)]
        kept.append(draw)
        have += len(draw)
    return np.concatenate(kept)[:n]


def random_proteins(rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
    letters = np.array(list(AA_FREQUENCIES))
    p = np.array(list(AA_FREQUENCIES.values()))
    p = p / p.sum()
    residues = rng.choice(letters, size=int(lengths.sum()), p=p)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return ["".join(residues[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]


def write_fasta(path: Path, ids: list[str], sequences: list[str]) -> Path:
    with open(path, "w") as f:
        for rid, seq in zip(ids, sequences):
            f.write(f">{rid}\n")
            for i in range(0, len(seq), 60):
                f.write(seq[i : i + 60] + "\n")
    return path


def read_fasta(path: Path) -> tuple[list[str], list[str]]:
    """The few lines everyone writes (ids, sequences); part of the naive side's timed work."""
    ids, seqs, chunks = [], [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if chunks:
                    seqs.append("".join(chunks))
                ids.append(line[1:].split()[0])
                chunks = []
            elif line:
                chunks.append(line)
    if chunks:
        seqs.append("".join(chunks))
    return ids, seqs


def length_summary(lengths: np.ndarray) -> dict:
    q = np.percentile(lengths, [10, 50, 90, 99])
    return {
        "n_sequences": int(len(lengths)),
        "total_residues": int(lengths.sum()),
        "min": int(lengths.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "mean": float(lengths.mean()),
        "p90": float(q[2]),
        "p99": float(q[3]),
        "max": int(lengths.max()),
    }


# -- the two sides --------------------------------------------------------------------------------


@dataclass
class NaiveRun:
    seconds: float
    cpu_seconds: float  # process CPU time (all threads): cpu/wall far below the thread count means contention
    residues: int  # residues embedded (after the tokenizer's truncation)
    positions: int  # batch x padded width summed over batches: everything the model computed
    truncated_sequences: int
    ids: list[str] = field(repr=False)
    lengths: list[int] = field(repr=False)  # residues of each input sequence, before any truncation
    pooled: list[np.ndarray] = field(repr=False)  # (d,) per sequence
    tokens: list[np.ndarray] = field(repr=False)  # (n, d) per sequence


def run_naive(fasta: Path, model_dir: Path, *, batch_size: int, device: torch.device) -> NaiveRun:
    """The loop from the ESM README / most notebooks: no sorting, fixed batch, pad to the batch max."""
    from transformers import AutoTokenizer, EsmModel

    started, cpu_started = time.perf_counter(), time.process_time()
    ids, seqs = read_fasta(fasta)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False).to(device).eval()
    pooled: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    residues = positions = truncated = 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i : i + batch_size]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=NAIVE_MAX_LENGTH, return_tensors="pt")
            enc = enc.to(device)
            hidden = model(**enc).last_hidden_state  # (b, n, d) fp32
            # Mean over real residues only: drop <cls> (position 0), <eos> (last real position) and padding.
            n_real = enc["attention_mask"].sum(1)  # (b,) specials included
            mask = enc["attention_mask"].clone()
            mask[:, 0] = 0
            mask[torch.arange(len(batch), device=device), n_real - 1] = 0
            pooled_batch = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (b, d)
            pooled.extend(pooled_batch.cpu().numpy())
            hidden_np, mask_np = hidden.cpu().numpy(), mask.bool().cpu().numpy()
            tokens.extend(h[m] for h, m in zip(hidden_np, mask_np))  # (n_i, d) each
            residues += int(mask_np.sum())
            positions += enc["input_ids"].numel()
            truncated += sum(len(s) + N_SPECIAL > NAIVE_MAX_LENGTH for s in batch)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    lengths = [len(s) for s in seqs]
    return NaiveRun(seconds, cpu_seconds, residues, positions, truncated, ids, lengths, pooled, tokens)


@dataclass
class EmbedcacheRun:
    seconds: float  # wall time of the whole build() call
    cpu_seconds: float  # process CPU time (all threads, the writer thread included)
    build_seconds: float  # BuildReport.seconds: store creation + embedding + writing (no load, no planning)
    residues: int  # BuildReport.plan.n_tokens (one ESM2 token per residue)
    positions: int  # batch x padded width summed over the batches build() ran
    windows: list[int] = field(repr=False)  # content tokens of every model window, for the FLOP count


def run_embedcache(
    fasta: Path, model_dir: Path, store: Path, *, max_tokens: int, precision: str, device: torch.device
) -> EmbedcacheRun:
    from embedcache.build import build
    from embedcache.embed import make_batches
    from embedcache.config import BuildConfig

    config = BuildConfig.create(
        "esm2", str(model_dir), max_tokens=max_tokens, precision=precision, device=str(device)
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    report = build(config, [fasta], store, progress=False, log=lambda _: None)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    # Padded positions: replay the batching `_embed` does on the same plan (untimed).
    windows = [e - s for p in report.plan.plans.values() for s, e in p.windows]
    items = [(n + N_SPECIAL, n, n + N_SPECIAL) for n in windows]
    positions = sum(len(b) * max(b) for b in make_batches(items, max_tokens, equal_lengths=False))
    return EmbedcacheRun(seconds, cpu_seconds, report.seconds, report.plan.n_tokens, positions, windows)


# -- cross-check ----------------------------------------------------------------------------------


def cross_check(naive: NaiveRun, store_path: Path, *, atol: float, n_token_checks: int = 3) -> dict:
    """Pooled vectors of every untruncated sequence, and per-token rows of a few, naive vs store."""
    from embedcache import open_store

    store = open_store(store_path)
    lengths = naive.lengths
    full = [i for i, n in enumerate(lengths) if n <= ESM2_WINDOW]  # truncated ones differ by design
    ids = [naive.ids[i] for i in full]
    ours = store.pooled(ids)
    theirs = np.stack([naive.pooled[i] for i in full])
    pooled_diff = float(np.abs(ours - theirs).max())
    pooled_ok = bool(np.allclose(ours, theirs, rtol=0, atol=atol))
    # Per-token rows are stored as fp16: compare at fp16 resolution (2^-11 relative).
    picks = sorted({full[0], full[len(full) // 2], max(full, key=lambda i: lengths[i])})[:n_token_checks]
    token_diff, token_ok = 0.0, True
    for i in picks:
        stored = store.tokens(naive.ids[i]).astype(np.float32)
        ref = naive.tokens[i]
        token_diff = max(token_diff, float(np.abs(stored - ref).max()))
        token_ok &= stored.shape == ref.shape and bool(np.allclose(stored, ref, rtol=2e-3, atol=atol))
    return {
        "sequences_compared": len(full),
        "pooled_max_abs_diff": pooled_diff,
        "pooled_atol": atol,
        "pooled_ok": pooled_ok,
        "token_sequences_compared": [naive.ids[i] for i in picks],
        "token_max_abs_diff": token_diff,
        "token_ok": token_ok,
    }


# -- machine, model, FLOPs ------------------------------------------------------------------------


def model_info(model_dir: Path) -> dict:
    from transformers import EsmModel

    model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False)
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.embeddings.word_embeddings.weight.numel()  # rotary positions have no parameters
    c = model.config
    return {
        "params": n_params,
        "params_non_embedding": n_params - n_embedding,
        "hidden": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "intermediate": c.intermediate_size,
    }


FLOP_FORMULA = (
    "forward FLOPs of a window of n positions (residues + <cls>/<eos>) = 2*N*n + 4*L*d*n^2, "
    "N = non-embedding params, L = layers, d = hidden; i.e. per token 2*N + 4*L*n*d "
    "(QK^T and AV each 2*n*d per layer); padding is not counted"
)


def model_flops(windows: list[int], model: dict) -> float:
    n = np.asarray(windows, dtype=np.float64) + N_SPECIAL
    return float((2 * model["params_non_embedding"] * n + 4 * model["layers"] * model["hidden"] * n**2).sum())


def contended(cpu_seconds: float, seconds: float, device: torch.device) -> bool:
    """A CPU run that kept far fewer than its torch threads busy waited for cores other processes held."""
    # Both sides keep every thread busy for most of their run (the serial tokenizer is ~10% of it).
    return device.type == "cpu" and cpu_seconds / seconds < 0.75 * torch.get_num_threads()


def _flag(cpu_seconds: float, seconds: float, device: torch.device) -> str:
    return ", contended" if contended(cpu_seconds, seconds, device) else ""


def summarize(seconds: list[float], cpu_seconds: list[float], residues: int, device: torch.device) -> dict:
    best, median = min(seconds), statistics.median(seconds)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "cpu_per_wall": [c / s for c, s in zip(cpu_seconds, seconds)],
        "contended": [contended(c, s, device) for c, s in zip(cpu_seconds, seconds)],
        "best_seconds": best,
        "median_seconds": median,
        "tokens_per_second_best": residues / best,
        "tokens_per_second_median": residues / median,
    }


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokens/s of embedcache build() vs a naive padded-batch loop, same input and model, side by side."
    )
    a = p.add_argument
    a("--n-sequences", type=int, default=1000, help="synthetic proteins in the input (default %(default)s)")
    a("--max-length", type=int, default=ESM2_WINDOW,
      help="longest protein (default %(default)s); longer ones are truncated by the naive side and windowed by "
           "embedcache, so the two sides no longer do the same work")  # fmt: skip
    a("--min-length", type=int, default=30, help="shortest protein (default %(default)s)")
    a("--median-length", type=float, default=420.0, help="median of the log-normal lengths (default %(default)s)")
    a("--sigma", type=float, default=0.75, help="log-space std of the lengths (default %(default)s: mean ~1.3x median)")
    a("--seed", type=int, default=0, help="seed of the lengths, residues and model weights (default %(default)s)")
    a("--hidden", type=int, default=128, help="hidden size of the random ESM2 (default %(default)s)")
    a("--layers", type=int, default=4, help="transformer layers of the random ESM2 (default %(default)s)")
    a("--heads", type=int, default=4, help="attention heads of the random ESM2 (default %(default)s)")
    a("--batch-size", type=int, default=8, help="sequences per batch of the naive loop (default %(default)s)")
    a("--max-tokens", type=int, default=8192, help="embedcache token budget of a padded batch (default %(default)s)")
    a("--repeats", type=int, default=2, help="timed runs of each side, alternating (default %(default)s)")
    a("--warmup-sequences", type=int, default=10, help="sequences of the untimed warm-up (default %(default)s)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    a("--device", default="auto", help="auto (cuda if available; the default), cpu, cuda, cuda:1, ...")
    a("--atol", type=float, default=1e-4, help="tolerance of the pooled-vector cross-check (default %(default)s)")
    a("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU (default: by device name)")
    a("--workdir", type=Path, default=None, help="keep input, model and stores here (default: a temp dir, removed)")
    a("--json", type=Path, default=None, help="also write every figure to this JSON file")
    return p


def run(args: argparse.Namespace) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused MLM head of the checkpoint is expected
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.n_sequences < 1:
        raise SystemExit(f"--repeats ({args.repeats}) and --n-sequences ({args.n_sequences}) must be >= 1")

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_build_")) if own_tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, device, work)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    from embedcache.tiny_models import make_tiny_esm2

    machine = machine_info(device=str(device))
    print("== machine")
    print(f"  {machine['platform']}  {machine['cpu_model']}")
    print(
        f"  {machine['cpu_cores']} cores ({machine['cpu_cores_usable']} usable, "
        f"torch threads {machine['torch_threads']}); "
        f"python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"embedcache {machine['embedcache']}"
    )
    gpu_name = f" ({machine['gpu']['name']}, {machine['gpu']['memory_gib']} GiB)" if machine["gpu"] else ""
    print(f"  device: {device}{gpu_name}")
    load = machine["load_average_at_start"]
    if load is not None:
        print(f"  load average (1 min) at start: {load:.2f}")
        if load > 0.5 * (os.cpu_count() or 1):  # a lagging average: it still counts jobs that ended a minute ago
            print(
                "  WARNING: other processes are (or were, within the last minute) using the CPU. On a small machine "
                "that can cut throughput several-fold (torch's threads wait for each other on a busy core); runs "
                "whose cpu/wall falls well below the torch thread count are marked 'contended'"
            )

    rng = np.random.default_rng(args.seed)
    lengths = sample_lengths(
        rng, args.n_sequences, median=args.median_length, sigma=args.sigma,
        min_length=args.min_length, max_length=args.max_length,
    )  # fmt: skip
    seqs = random_proteins(rng, lengths)
    ids = [f"SYN{i:06d}" for i in range(len(seqs))]
    fasta = write_fasta(work / "proteins.fa", ids, seqs)
    warm = min(args.warmup_sequences, len(seqs))
    warm_fasta = write_fasta(work / "warmup.fa", [f"W{i}" for i in range(warm)], seqs[:warm])
    inputs = length_summary(lengths)
    inputs.update(median_param=args.median_length, sigma=args.sigma, max_length=args.max_length, seed=args.seed)
    same_work = args.max_length <= ESM2_WINDOW
    print("== input")
    print(
        f"  {inputs['n_sequences']} synthetic proteins, {inputs['total_residues']:,} residues; length "
        f"min {inputs['min']}, p10 {inputs['p10']:.0f}, median {inputs['median']:.0f}, mean {inputs['mean']:.0f}, "
        f"p90 {inputs['p90']:.0f}, p99 {inputs['p99']:.0f}, max {inputs['max']}"
    )
    print(
        f"  log-normal(median {args.median_length:g}, sigma {args.sigma:g}) truncated to "
        f"[{args.min_length}, {args.max_length}]; natural amino-acid frequencies, seed {args.seed}"
    )
    if same_work:
        print(f"  every sequence fits one ESM2 window ({ESM2_WINDOW} residues): no truncation, no windowing, same work")
    else:
        print(
            f"  WARNING: sequences above {ESM2_WINDOW} residues are TRUNCATED by the naive side and windowed by "
            f"embedcache: the two sides do different work; each rate counts the residues it embedded"
        )

    model_dir = make_tiny_esm2(work / "model", hidden=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed)
    model = model_info(model_dir)
    print("== model (random-initialised ESM2, loaded from its saved directory by both sides)")
    print(
        f"  {model['params']:,} params ({model['params_non_embedding']:,} non-embedding); hidden {model['hidden']}, "
        f"layers {model['layers']}, heads {model['heads']}, intermediate {model['intermediate']}; fp32"
    )

    # Untimed warm-up of both sides: first-call costs (imports, allocator, kernels, page cache).
    run_naive(warm_fasta, model_dir, batch_size=args.batch_size, device=device)
    for precision in ("fp32", "auto") if device.type == "cuda" else ("fp32",):
        store = work / f"warmup_{precision}.zarr"
        run_embedcache(warm_fasta, model_dir, store, max_tokens=args.max_tokens, precision=precision, device=device)

    print(f"== timed runs ({args.repeats} of each side, alternating)")

    naive_seconds, ec_seconds, ec_build_seconds, naive_cpu, ec_cpu = [], [], [], [], []
    naive = ec = None
    store = None
    for r in range(args.repeats):
        naive = run_naive(fasta, model_dir, batch_size=args.batch_size, device=device)
        naive_seconds.append(naive.seconds)
        naive_cpu.append(naive.cpu_seconds)
        print(
            f"  naive      run {r + 1}: {naive.seconds:7.2f} s  {naive.residues / naive.seconds:10,.0f} tok/s  "
            f"(cpu/wall {naive.cpu_seconds / naive.seconds:.2f}{_flag(naive.cpu_seconds, naive.seconds, device)})"
        )
        if store is not None:
            shutil.rmtree(store)  # keep one store on disk: the last, for the cross-check
        store = work / f"store_{r}.zarr"
        ec = run_embedcache(fasta, model_dir, store, max_tokens=args.max_tokens, precision="fp32", device=device)
        ec_seconds.append(ec.seconds)
        ec_build_seconds.append(ec.build_seconds)
        ec_cpu.append(ec.cpu_seconds)
        print(
            f"  embedcache run {r + 1}: {ec.seconds:7.2f} s  {ec.residues / ec.seconds:10,.0f} tok/s  "
            f"(cpu/wall {ec.cpu_seconds / ec.seconds:.2f}{_flag(ec.cpu_seconds, ec.seconds, device)}; "
            f"build phase {ec.build_seconds:.2f} s)"
        )
    assert naive is not None and ec is not None and store is not None
    if same_work and naive.residues != ec.residues:
        raise AssertionError(f"naive embedded {naive.residues} residues, embedcache {ec.residues}: not the same work")

    check = cross_check(naive, store, atol=args.atol)
    print("== cross-check (naive outputs vs the embedcache store)")
    print(
        f"  pooled fp32, {check['sequences_compared']} sequences: max |diff| {check['pooled_max_abs_diff']:.2e} "
        f"(atol {args.atol:g}) {'OK' if check['pooled_ok'] else 'MISMATCH'}"
    )
    print(
        f"  per-token (stored fp16), {len(check['token_sequences_compared'])} sequences: max |diff| "
        f"{check['token_max_abs_diff']:.2e} {'OK' if check['token_ok'] else 'MISMATCH'}"
    )

    naive_summary = summarize(naive_seconds, naive_cpu, naive.residues, device)
    naive_summary.update(
        residues=naive.residues, padded_positions=naive.positions, padding_efficiency=naive.residues / naive.positions,
        truncated_sequences=naive.truncated_sequences, batch_size=args.batch_size, writes_store=False,
    )  # fmt: skip
    ec_summary = summarize(ec_seconds, ec_cpu, ec.residues, device)
    ec_summary.update(
        residues=ec.residues, padded_positions=ec.positions, padding_efficiency=ec.residues / ec.positions,
        build_phase_seconds=ec_build_seconds, max_tokens=args.max_tokens, writes_store=True, precision="fp32",
    )  # fmt: skip
    ratio_best = ec_summary["tokens_per_second_best"] / naive_summary["tokens_per_second_best"]
    ratio_median = ec_summary["tokens_per_second_median"] / naive_summary["tokens_per_second_median"]

    print("== result (tokens/s = residues embedded / wall seconds of the whole side; fp32 both)")
    print(f"  {'side':<12}{'best s':>9}{'median s':>10}{'tok/s best':>13}{'tok/s median':>14}{'padding eff.':>14}")
    for name, s in (("naive", naive_summary), ("embedcache", ec_summary)):
        print(
            f"  {name:<12}{s['best_seconds']:9.2f}{s['median_seconds']:10.2f}{s['tokens_per_second_best']:13,.0f}"
            f"{s['tokens_per_second_median']:14,.0f}{s['padding_efficiency']:13.1%}"
        )
    print(f"  ratio embedcache / naive: {ratio_best:.2f}x (best), {ratio_median:.2f}x (median)")
    if not same_work:
        print(
            f"  NOT the same work: the naive side truncated {naive.truncated_sequences} sequences to {ESM2_WINDOW} "
            f"residues ({ec.residues - naive.residues:,} residues never embedded); embedcache embedded all of them "
            f"in overlapping windows (the overlap is recomputed and counts as computed positions below)"
        )
    print(
        f"  padding efficiency = residues / positions computed (batch x padded width, <cls>/<eos> included): "
        f"naive {naive.positions:,} positions for batch {args.batch_size} in input order, "
        f"embedcache {ec.positions:,} for length-sorted batches under {args.max_tokens} tokens"
    )
    print(
        "  the naive side writes no store (outputs stay in RAM); embedcache also hashes, validates and writes "
        "per-token fp16 + pooled fp32 to Zarr, so the ratio understates its compute advantage"
    )

    if hasattr(os, "getloadavg"):
        load_end = os.getloadavg()[0]
        print(f"  load average (1 min) at the end: {load_end:.2f} (this benchmark alone adds ~1 per busy thread)")

    gpu: dict | None = None
    if device.type == "cuda":
        gpu = _bf16_figures(args, device, work, fasta, model_dir, model, machine)
    else:
        print("== MFU: reported on CUDA only (this run is on CPU)")

    results = {
        "benchmark": "bench_build",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "input": inputs,
        "same_work": same_work,
        "model": model,
        "naive": naive_summary,
        "embedcache": ec_summary,
        "ratio_best": ratio_best,
        "ratio_median": ratio_median,
        "cross_check": check,
        "gpu_bf16": gpu,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    write_json(args.json, results)
    if not (check["pooled_ok"] and check["token_ok"]):
        print("ERROR: the two sides computed different embeddings; the figures compare different work", file=sys.stderr)
        raise SystemExit(1)
    return results


def _bf16_figures(args, device, work: Path, fasta: Path, model_dir: Path, model: dict, machine: dict) -> dict:
    """embedcache with precision auto (bf16 autocast) on CUDA: tokens/s and model FLOPs utilisation."""
    seconds, cpu_seconds, build_seconds, last = [], [], [], None
    for r in range(args.repeats):
        store = work / f"store_bf16_{r}.zarr"
        last = run_embedcache(fasta, model_dir, store, max_tokens=args.max_tokens, precision="auto", device=device)
        seconds.append(last.seconds)
        cpu_seconds.append(last.cpu_seconds)
        build_seconds.append(last.build_seconds)
        shutil.rmtree(store)
    assert last is not None
    summary = summarize(seconds, cpu_seconds, last.residues, device)
    flops = model_flops(last.windows, model)
    name = machine["gpu"]["name"]
    peak = args.peak_tflops or gpu_peak_tflops(name)
    summary.update(
        precision="auto (bf16 autocast)", build_phase_seconds=build_seconds, model_flops=flops,
        flop_formula=FLOP_FORMULA, peak_tflops=peak,
        peak_source="--peak-tflops" if args.peak_tflops else ("data sheet by device name" if peak else None),
    )  # fmt: skip
    print("== embedcache on CUDA with precision auto (bf16)")
    print(
        f"  {summary['best_seconds']:.2f} s best, {summary['tokens_per_second_best']:,.0f} tok/s "
        f"(build phase {min(build_seconds):.2f} s, {last.residues / min(build_seconds):,.0f} tok/s)"
    )
    print(f"  model FLOPs {flops:.3e}; {FLOP_FORMULA}")
    if peak is None:
        print(f"  MFU: unknown bf16 peak for {name!r}; pass --peak-tflops")
        summary.update(mfu_end_to_end=None, mfu_build_phase=None)
    else:
        mfu = flops / summary["best_seconds"] / (peak * 1e12)
        mfu_build = flops / min(build_seconds) / (peak * 1e12)
        summary.update(mfu_end_to_end=mfu, mfu_build_phase=mfu_build)
        print(
            f"  MFU vs {peak:g} TFLOP/s dense bf16 ({summary['peak_source']}): {100 * mfu:.3g}% end to end, "
            f"{100 * mfu_build:.3g}% over the build phase (a small model cannot fill a GPU: raise --hidden/--layers)"
        )
    return summary


def main() -> None:
    run(create_parser().parse_args())


if __name__ == "__main__":
    main()
