"""Build throughput: `embedcache build` against the loops people write, same sequences, same model, one run.

Every side reads the same FASTA of synthetic proteins (log-normal lengths like the human proteome,
residues drawn with natural amino-acid frequencies) and loads the same random-initialised ESM2
(default: the real ESM2-8M shape, hidden 320, 6 layers, 20 heads, FFN 1280) from the same
directory. The sides alternate `--repeats` times after a short warm-up of each:

    extract     ESM's scripts/extract.py, written with transformers: sort by length, batches under
                a token budget (`--max-tokens`, extract.py's --toks_per_batch), fp32, truncation at
                1,022 residues, per-token rows (`t[i, 1:n+1].clone()`) and their mean kept in memory
    naive       (`--sides ...,naive`) input order, fixed batch size, otherwise the same
    embedcache  `build()` into a fresh store: content keys, length-sorted batches under the same
                budget, per-token fp16 + pooled fp32 written to Zarr by a background thread
    embedcache-pooled  (`--sides ...,embedcache-pooled`) the same with `--no-tokens`

By default no protein is longer than one ESM2 window (`--max-length 1022`), so nobody truncates
and nobody windows: every side does the same model work. Reported per side: residues/s (residues
embedded / wall seconds of the whole side: read FASTA, load model, tokenize, run, keep or write),
positions/s (positions the model computed, padding and <cls>/<eos> included), padding efficiency
(residues / positions) and the share of the wall time spent inside the model's forward (timed by
global module hooks, the same on every side). Pooled vectors of every protein and per-token rows
of a few are compared with the extract side before any figure is printed.

Section "unpadded" (`--unpadded-ab`, default on CUDA): the encoder's padded and unpadded
(`embedcache.encoders.unpadded`) forwards on the same batches, interleaved batch by batch, with
their parity.
On CUDA the bf16 build is timed too (tokens/s, MFU against the GPU's dense bf16 peak) and its
pooled vectors compared with the fp32 ones.

    .venv/bin/python benchmarks/bench_build.py [--shape 8M] [--n-sequences N] [--json out.json]
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

from benchlib import ForwardTimer, gpu_peak_tflops, load_average, machine_info, write_json

# Natural amino-acid frequencies (UniProtKB/Swiss-Prot release statistics, percent).
AA_FREQUENCIES = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07, "H": 2.27, "I": 5.96,
    "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56, "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}  # fmt: skip

ESM2_WINDOW = 1022  # content tokens of one ESM2 call: 1024 positions minus <cls> and <eos>
LOOP_MAX_LENGTH = 1024  # what the extract and naive loops pass to the tokenizer (specials included)
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


# ESM2 sizes (facebook/esm2_*): hidden, layers, heads; the FFN is 4x hidden in all of them.
SHAPES = {"8M": (320, 6, 20), "35M": (480, 12, 20), "150M": (640, 30, 20), "650M": (1280, 33, 20)}
SIDES = ("extract", "naive", "embedcache", "embedcache-pooled")


# -- the sides ------------------------------------------------------------------------------------


@dataclass
class SideRun:
    name: str
    seconds: float  # wall time of the whole side
    cpu_seconds: float  # process CPU time (all threads): cpu/wall far below the thread count means contention
    forward_seconds: float  # inside the model's forward (ForwardTimer)
    forward_calls: int
    residues: int  # residues embedded (after any truncation)
    positions: int  # rows the model computed: padded batch x width, or packed tokens
    truncated_sequences: int = 0
    # Outputs kept for the cross-check (loops only): by id, pooled (d,) and per-token (n, d) fp32.
    pooled: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    tokens: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    windows: list[int] = field(default_factory=list, repr=False)  # content tokens of every model window
    store: Path | None = None


def _load_hf(model_dir: Path, device: torch.device):
    from transformers import AutoTokenizer, EsmModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False).to(device).eval()
    return tokenizer, model


def extract_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """esm/data.py FastaBatchedDataset.get_batch_indices: ascending length, a new batch when the padded
    size would pass the budget (here with both special tokens counted, so the budget is exact)."""
    batches: list[list[int]] = []
    buf: list[int] = []
    max_len = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        size = min(lengths[i], ESM2_WINDOW) + N_SPECIAL
        if buf and max(size, max_len) * (len(buf) + 1) > max_tokens:
            batches.append(buf)
            buf, max_len = [], 0
        max_len = max(max_len, size)
        buf.append(i)
    if buf:
        batches.append(buf)
    return batches


def _run_loop(name, fasta, model_dir, batches_of, *, device, timer) -> SideRun:
    """The loop both user-side baselines share; they differ only in how they batch (`batches_of`)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    ids, seqs = read_fasta(fasta)
    tokenizer, model = _load_hf(model_dir, device)
    run = SideRun(name, 0.0, 0.0, 0.0, 0, 0, 0)
    with torch.no_grad():
        for batch in batches_of([len(s) for s in seqs]):
            enc = tokenizer([seqs[i] for i in batch], padding=True, truncation=True, max_length=LOOP_MAX_LENGTH,
                            return_tensors="pt").to(device)  # fmt: skip
            hidden = model(**enc).last_hidden_state.cpu()  # (b, n, d) fp32
            for row, i in enumerate(batch):
                n = min(len(seqs[i]), ESM2_WINDOW)  # extract.py: truncate_len, then t[i, 1 : n + 1]
                tokens = hidden[row, 1 : n + 1].clone()  # (n, d)
                run.tokens[ids[i]] = tokens.numpy()
                run.pooled[ids[i]] = tokens.mean(0).numpy()
                run.residues += n
                run.truncated_sequences += len(seqs[i]) > ESM2_WINDOW
    run.seconds, run.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    run.forward_seconds, run.forward_calls, run.positions = timer.seconds, timer.calls, timer.positions
    return run


def run_extract(fasta: Path, model_dir: Path, *, max_tokens: int, device: torch.device, timer) -> SideRun:
    return _run_loop("extract", fasta, model_dir, lambda n: extract_batches(n, max_tokens), device=device, timer=timer)


def run_naive(fasta: Path, model_dir: Path, *, batch_size: int, device: torch.device, timer) -> SideRun:
    def in_order(lengths: list[int]) -> list[list[int]]:
        return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]

    return _run_loop("naive", fasta, model_dir, in_order, device=device, timer=timer)


def run_embedcache(
    name: str, fasta: Path, model_dir: Path, store: Path, *, max_tokens: int, precision: str, device: torch.device,
    tokens: bool, timer,
) -> SideRun:  # fmt: skip
    from embedcache.build import build
    from embedcache.config import BuildConfig

    config = BuildConfig.create(
        "esm2", str(model_dir), max_tokens=max_tokens, precision=precision, device=str(device), tokens=tokens
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    report = build(config, [fasta], store, progress=False, log=lambda _: None)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return SideRun(
        name, seconds, cpu_seconds, timer.seconds, timer.calls, report.plan.n_tokens, timer.positions,
        windows=model_windows(fasta), store=store,
    )  # fmt: skip


def model_windows(fasta: Path) -> list[int]:
    """Content tokens of every model window the build ran (untimed): ESM2 windows of 1,022 residues
    overlapping by a quarter (the build's defaults; one window per protein when it fits)."""
    from embedcache.windows import window_starts

    _, seqs = read_fasta(fasta)
    return [min(s + ESM2_WINDOW, len(q)) - s for q in seqs for s in window_starts(len(q), ESM2_WINDOW, ESM2_WINDOW // 4)]


# -- cross-check ----------------------------------------------------------------------------------


def cross_check(reference: SideRun, store_path: Path, *, atol: float, tokens: bool, n_token_checks: int = 3) -> dict:
    """Pooled vectors of every untruncated protein, and per-token rows of a few: reference loop vs store."""
    from embedcache import open_store

    store = open_store(store_path)
    full = [rid for rid, t in reference.tokens.items() if len(t) < ESM2_WINDOW]  # truncated ones differ by design
    ours = store.pooled(full)
    theirs = np.stack([reference.pooled[rid] for rid in full])
    result = {
        "reference": reference.name,
        "sequences_compared": len(full),
        "pooled_max_abs_diff": float(np.abs(ours - theirs).max()),
        "pooled_atol": atol,
        "pooled_ok": bool(np.allclose(ours, theirs, rtol=0, atol=atol)),
        "token_ok": True,
    }
    if tokens:
        # Per-token rows are stored as fp16: compare at fp16 resolution (2^-11 relative).
        by_length = sorted(full, key=lambda rid: len(reference.tokens[rid]))
        picks = list(dict.fromkeys([by_length[0], by_length[len(by_length) // 2], by_length[-1]]))[:n_token_checks]
        token_diff = 0.0
        for rid in picks:
            stored = store.tokens(rid).astype(np.float32)
            ref = reference.tokens[rid]
            token_diff = max(token_diff, float(np.abs(stored - ref).max()))
            result["token_ok"] &= stored.shape == ref.shape and bool(np.allclose(stored, ref, rtol=2e-3, atol=atol))
        result.update(token_sequences_compared=picks, token_max_abs_diff=token_diff)
    return result


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
    return device.type == "cpu" and cpu_seconds / seconds < 0.75 * torch.get_num_threads()


def summarize(runs: list[SideRun], device: torch.device) -> dict:
    seconds = [r.seconds for r in runs]
    best = min(runs, key=lambda r: r.seconds)
    last = runs[-1]
    return {
        "seconds": seconds,
        "cpu_per_wall": [r.cpu_seconds / r.seconds for r in runs],
        "contended": [contended(r.cpu_seconds, r.seconds, device) for r in runs],
        "forward_seconds": [r.forward_seconds for r in runs],
        "forward_share": [r.forward_seconds / r.seconds for r in runs],
        "forward_calls": last.forward_calls,
        "best_seconds": best.seconds,
        "median_seconds": statistics.median(seconds),
        "residues": last.residues,
        "positions": last.positions,
        "padding_efficiency": last.residues / last.positions,
        "residues_per_second_best": last.residues / best.seconds,
        "residues_per_second_median": last.residues / statistics.median(seconds),
        "positions_per_second_best": last.positions / best.seconds,
        "forward_share_of_best": best.forward_seconds / best.seconds,
        "truncated_sequences": last.truncated_sequences,
    }


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Residues/s of embedcache build() vs an extract.py-style loop (and a naive one), same "
        "sequences and model, side by side."
    )
    a = p.add_argument
    a("--sides", default="extract,embedcache",
      help=f"comma-separated, the first is the reference of the ratios and cross-checks; of {', '.join(SIDES)} "
           "(default %(default)s)")  # fmt: skip
    a("--n-sequences", type=int, default=500, help="synthetic proteins in the input (default %(default)s)")
    a("--max-length", type=int, default=ESM2_WINDOW,
      help="longest protein (default %(default)s); longer ones are truncated by the loops and windowed by "
           "embedcache, so the sides no longer do the same work")  # fmt: skip
    a("--min-length", type=int, default=30, help="shortest protein (default %(default)s)")
    a("--median-length", type=float, default=420.0, help="median of the log-normal lengths (default %(default)s)")
    a("--sigma", type=float, default=0.75, help="log-space std of the lengths (default %(default)s: mean ~1.3x median)")
    a("--seed", type=int, default=0, help="seed of the lengths, residues and model weights (default %(default)s)")
    a("--shape", choices=sorted(SHAPES), default="8M",
      help="ESM2 size of the random model: hidden, layers, heads of facebook/esm2_* (default %(default)s)")
    a("--hidden", type=int, default=None, help="hidden size (default: from --shape; FFN is 4x)")
    a("--layers", type=int, default=None, help="transformer layers (default: from --shape)")
    a("--heads", type=int, default=None, help="attention heads (default: from --shape)")
    a("--batch-size", type=int, default=8, help="sequences per batch of the naive loop (default %(default)s)")
    a("--max-tokens", type=int, default=4096,
      help="token budget of a padded batch, the same for the extract loop and embedcache (default %(default)s: "
           "extract.py's --toks_per_batch)")  # fmt: skip
    a("--repeats", type=int, default=2, help="timed runs of each side, alternating (default %(default)s)")
    a("--warmup-sequences", type=int, default=10, help="sequences of the untimed warm-up (default %(default)s)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    a("--device", default="auto", help="auto (cuda if available; the default), cpu, cuda, cuda:1, ...")
    a("--unpadded-ab", choices=("auto", "on", "off"), default="auto",
      help="time the encoder's padded vs unpadded forward on the same batches (auto: on CUDA only)")  # fmt: skip
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
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides or len(set(sides)) != len(sides):
        raise SystemExit(f"--sides {args.sides!r}: give distinct names of {', '.join(SIDES)}")

    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_build_")) if own_tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, sides, device, work)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def _print_machine(machine: dict, device: torch.device) -> None:
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


def _run_side(side: str, args, device, model_dir: Path, fasta: Path, store: Path, *, precision: str = "fp32") -> SideRun:
    with ForwardTimer(sync_cuda=device.type == "cuda") as timer:
        if side == "extract":
            return run_extract(fasta, model_dir, max_tokens=args.max_tokens, device=device, timer=timer)
        if side == "naive":
            return run_naive(fasta, model_dir, batch_size=args.batch_size, device=device, timer=timer)
        return run_embedcache(
            side, fasta, model_dir, store, max_tokens=args.max_tokens, precision=precision, device=device,
            tokens=side == "embedcache", timer=timer,
        )  # fmt: skip


def _run(args: argparse.Namespace, sides: list[str], device: torch.device, work: Path) -> dict:
    from embedcache.tiny_models import make_tiny_esm2

    machine = machine_info(device=str(device))
    _print_machine(machine, device)

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
        print(f"  every protein fits one ESM2 window ({ESM2_WINDOW} residues): no truncation, no windowing, same work")
    else:
        print(
            f"  WARNING: proteins above {ESM2_WINDOW} residues are TRUNCATED by the loops and windowed by "
            f"embedcache: the sides do different work; each rate counts the residues it embedded"
        )

    hidden, layers, heads = SHAPES[args.shape]
    hidden, layers, heads = args.hidden or hidden, args.layers or layers, args.heads or heads
    model_dir = make_tiny_esm2(work / "model", hidden=hidden, layers=layers, heads=heads, seed=args.seed)
    model = model_info(model_dir)
    print("== model (random-initialised ESM2, loaded from its saved directory by every side)")
    print(
        f"  {model['params']:,} params ({model['params_non_embedding']:,} non-embedding); hidden {model['hidden']}, "
        f"layers {model['layers']}, heads {model['heads']}, intermediate {model['intermediate']}; fp32"
    )

    # Untimed warm-up of every side: first-call costs (imports, allocator, kernels, page cache).
    for side in sides:
        _run_side(side, args, device, model_dir, warm_fasta, work / f"warmup_{side}.zarr")

    print(f"== timed runs ({args.repeats} of each side, alternating; fp32 everywhere)")
    runs: dict[str, list[SideRun]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in sides:
            store = work / f"store_{side}_{r}.zarr"
            result = _run_side(side, args, device, model_dir, fasta, store)
            if r > 0 and result.store is not None:
                shutil.rmtree(runs[side][-1].store)  # keep one store per side: the last, for the cross-check
            runs[side].append(result)
            flag = ", contended" if contended(result.cpu_seconds, result.seconds, device) else ""
            print(
                f"  {side:<18} run {r + 1}: {result.seconds:7.2f} s  {result.residues / result.seconds:9,.0f} res/s  "
                f"forward {result.forward_seconds / result.seconds:6.1%}  (cpu/wall "
                f"{result.cpu_seconds / result.seconds:.2f}{flag})"
            )
    load_end = load_average()

    reference = runs[sides[0]][-1]
    residue_counts = {s: rs[-1].residues for s, rs in runs.items()}
    if same_work and len(set(residue_counts.values())) > 1:
        raise AssertionError(f"the sides embedded different numbers of residues: {residue_counts}; not the same work")
    checks = {}
    if reference.store is None:
        for side in sides[1:]:
            if runs[side][-1].store is not None:
                checks[side] = cross_check(reference, runs[side][-1].store, atol=args.atol, tokens=side == "embedcache")
        print(f"== cross-check (the {reference.name} loop's outputs vs each store)")
        for side, check in checks.items():
            line = f"  {side}: pooled fp32, {check['sequences_compared']} proteins: max |diff| " \
                   f"{check['pooled_max_abs_diff']:.2e} (atol {args.atol:g}) {'OK' if check['pooled_ok'] else 'MISMATCH'}"  # fmt: skip
            if "token_max_abs_diff" in check:
                line += f"; per-token (stored fp16), {len(check['token_sequences_compared'])} proteins: max |diff| " \
                        f"{check['token_max_abs_diff']:.2e} {'OK' if check['token_ok'] else 'MISMATCH'}"  # fmt: skip
            print(line)

    summaries = {side: summarize(rs, device) for side, rs in runs.items()}
    ref = summaries[sides[0]]
    for s in summaries.values():
        s["ratio_best"] = s["residues_per_second_best"] / ref["residues_per_second_best"]
        s["ratio_median"] = s["residues_per_second_median"] / ref["residues_per_second_median"]
    print(f"== result (fp32; ratios against {sides[0]}; residues/s over the whole side, best of {args.repeats})")
    print(
        f"  {'side':<18}{'best s':>8}{'res/s best':>12}{'res/s median':>14}{'positions/s':>13}{'padding eff.':>14}"
        f"{'in forward':>12}{'ratio best':>12}{'ratio median':>14}"
    )
    for name, s in summaries.items():
        print(
            f"  {name:<18}{s['best_seconds']:8.2f}{s['residues_per_second_best']:12,.0f}"
            f"{s['residues_per_second_median']:14,.0f}{s['positions_per_second_best']:13,.0f}"
            f"{s['padding_efficiency']:14.1%}{s['forward_share_of_best']:12.1%}{s['ratio_best']:11.2f}x"
            f"{s['ratio_median']:13.2f}x"
        )
    print(
        f"  padding efficiency = residues / positions the model computed (batch x padded width with <cls>/<eos>, "
        f"or packed tokens); token budget {args.max_tokens} for the extract loop and embedcache"
    )
    print(
        "  'in forward' = wall time inside the model's forward (the outermost module call) / wall time of the side; "
        "the loops keep outputs in RAM, embedcache also hashes, validates and writes its Zarr store"
    )
    if not same_work:
        print(f"  NOT the same work: the loops truncated {reference.truncated_sequences} proteins to {ESM2_WINDOW}")
    if load_end is not None:
        print(f"  load average (1 min) at the end: {load_end:.2f} (this benchmark alone adds ~1 per busy thread)")

    ab = None
    if args.unpadded_ab == "on" or (args.unpadded_ab == "auto" and device.type == "cuda"):
        ab = _guarded("unpadded", lambda: unpadded_ab(args, device, model_dir, fasta))
    gpu = None
    if device.type == "cuda":
        gpu = _guarded("bf16", lambda: _bf16_figures(args, device, work, fasta, model_dir, model, machine, runs))
    else:
        print("== MFU and bf16: reported on CUDA only (this run is on CPU)")

    results = {
        "benchmark": "bench_build",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "load_average_at_end": load_end,
        "input": inputs,
        "same_work": same_work,
        "model": model,
        "sides": summaries,
        "reference": sides[0],
        "cross_check": checks,
        "unpadded_ab": ab,
        "gpu_bf16": gpu,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    write_json(args.json, results)
    if not all(c["pooled_ok"] and c["token_ok"] for c in checks.values()):
        print("ERROR: the sides computed different embeddings; the figures compare different work", file=sys.stderr)
        raise SystemExit(1)
    return results


def _guarded(section: str, fn):
    """An optional section's figures, or its error (the main figures above are kept either way)."""
    try:
        return fn()
    except Exception as e:  # reported in the output and the JSON, not hidden
        print(f"== {section}: FAILED: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


def unpadded_ab(args, device: torch.device, model_dir: Path, fasta: Path) -> dict:
    """The encoder's padded and unpadded forwards on the build's own batches: time and parity."""
    from embedcache.config import BuildConfig
    from embedcache.embed import make_batches
    from embedcache.encoders import load_encoder
    from embedcache.encoders.unpadded import UnpaddedEsm

    _, seqs = read_fasta(fasta)
    results = {}
    for precision in ("auto",):  # bf16 on CUDA (fp32 CUDA builds stay padded), fp32 on CPU
        config = BuildConfig.create("esm2", str(model_dir), precision=precision, device=str(device))
        encoder = load_encoder("esm2", config.encoder_settings())
        unpadded = encoder.unpadded or UnpaddedEsm(encoder.model)
        token_ids = [encoder.tokenize(s) for s in seqs]
        items = [(encoder.cost(len(t)), len(t), i) for i, t in enumerate(token_ids)]
        batches = [[token_ids[i] for i in b] for b in make_batches(items, args.max_tokens, False)]
        seconds: dict[str, list[float]] = {"padded": [], "unpadded": []}
        outputs: dict[str, list] = {}
        for mode in ("padded", "unpadded"):  # untimed warm-up: one batch of each
            encoder.unpadded = unpadded if mode == "unpadded" else None
            encoder.forward(batches[len(batches) // 2])
        # Interleaved batch by batch (the order alternating), so that the other jobs' load on a shared
        # machine hits both modes alike; whole passes one after the other moved by 2x here.
        for r in range(args.repeats):
            spent = {"padded": 0.0, "unpadded": 0.0}
            outputs = {"padded": [], "unpadded": []}
            for i, batch in enumerate(batches):
                for mode in ("padded", "unpadded") if (i + r) % 2 == 0 else ("unpadded", "padded"):
                    encoder.unpadded = unpadded if mode == "unpadded" else None
                    with ForwardTimer(sync_cuda=device.type == "cuda") as timer:
                        outputs[mode].extend(o.hidden for o in encoder.forward(batch))
                    spent[mode] += timer.seconds
            for mode, t in spent.items():
                seconds[mode].append(t)
        ref = torch.cat(outputs["padded"])
        diff = (torch.cat(outputs["unpadded"]) - ref).norm() / ref.norm()
        name = encoder.precision
        n = sum(len(t) for t in token_ids)
        results[name] = {
            "padded_seconds": seconds["padded"],
            "unpadded_seconds": seconds["unpadded"],
            "speedup_best": min(seconds["padded"]) / min(seconds["unpadded"]),
            "residues_per_second_unpadded": n / min(seconds["unpadded"]),
            "relative_l2_diff": float(diff),
        }
        print(
            f"== unpadded vs padded forward, {name}, {len(batches)} batches under {args.max_tokens} tokens: padded "
            f"{min(seconds['padded']):.2f} s, unpadded {min(seconds['unpadded']):.2f} s (best of {args.repeats}): "
            f"{results[name]['speedup_best']:.2f}x; relative L2 difference {float(diff):.1e}"
        )
        del encoder, unpadded
    return results


def _bf16_figures(args, device, work: Path, fasta: Path, model_dir: Path, model: dict, machine: dict, runs) -> dict:
    """embedcache with precision auto (bf16 autocast) on CUDA: residues/s, MFU, and parity with fp32."""
    from embedcache import open_store

    bf16_runs = []
    for r in range(args.repeats):
        store = work / f"store_bf16_{r}.zarr"
        bf16_runs.append(_run_side("embedcache", args, device, model_dir, fasta, store, precision="auto"))
        if r:
            shutil.rmtree(bf16_runs[-2].store)
    summary = summarize(bf16_runs, device)
    best = min(bf16_runs, key=lambda r: r.seconds)
    flops = model_flops(best.windows, model)
    name = machine["gpu"]["name"]
    peak = args.peak_tflops or gpu_peak_tflops(name)
    summary.update(
        precision="auto (bf16 autocast)", model_flops=flops, flop_formula=FLOP_FORMULA, peak_tflops=peak,
        peak_source="--peak-tflops" if args.peak_tflops else ("data sheet by device name" if peak else None),
    )  # fmt: skip
    print("== embedcache on CUDA with precision auto (bf16)")
    print(
        f"  {summary['best_seconds']:.2f} s best, {summary['residues_per_second_best']:,.0f} res/s, "
        f"{summary['positions_per_second_best']:,.0f} positions/s, padding efficiency "
        f"{summary['padding_efficiency']:.1%}, in forward {summary['forward_share_of_best']:.1%}"
    )
    print(f"  model FLOPs {flops:.3e}; {FLOP_FORMULA}")
    if peak is None:
        print(f"  MFU: unknown bf16 peak for {name!r}; pass --peak-tflops")
        summary.update(mfu_end_to_end=None, mfu_forward=None)
    else:
        summary.update(
            mfu_end_to_end=flops / best.seconds / (peak * 1e12),
            mfu_forward=flops / best.forward_seconds / (peak * 1e12),
        )
        print(
            f"  MFU vs {peak:g} TFLOP/s dense bf16 ({summary['peak_source']}): {summary['mfu_end_to_end']:.1%} end to "
            f"end, {summary['mfu_forward']:.1%} of the time inside the forward"
        )
    # bf16 vs fp32 parity: pooled vectors of the bf16 store against the fp32 reference loop.
    reference = next((rs[-1] for rs in runs.values() if rs[-1].pooled), None)
    if reference is not None:
        full = [rid for rid, t in reference.tokens.items() if len(t) < ESM2_WINDOW]
        ours = open_store(best.store).pooled(full)
        theirs = np.stack([reference.pooled[rid] for rid in full])
        cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
        rel = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
        summary["parity_vs_fp32"] = {
            "reference": reference.name, "proteins": len(full), "pooled_max_abs_diff": float(np.abs(ours - theirs).max()),
            "pooled_relative_l2_max": float(rel.max()), "pooled_relative_l2_median": float(np.median(rel)),
            "pooled_cosine_min": float(cos.min()),
        }  # fmt: skip
        p = summary["parity_vs_fp32"]
        print(
            f"  bf16 vs fp32 ({reference.name}), pooled, {len(full)} proteins: relative L2 median "
            f"{p['pooled_relative_l2_median']:.1e}, max {p['pooled_relative_l2_max']:.1e}; cosine min "
            f"{p['pooled_cosine_min']:.5f}"
        )
    return summary


def main() -> None:
    run(create_parser().parse_args())


if __name__ == "__main__":
    main()
