"""Host side of a build: the real `build()` with the model's forward replaced by a stand-in, against the disk.

How fast can this machine's host feed an accelerator? Everything of `embedcache build` runs for real
(planning, spooling, tokenising, batching, packing, stitching, pooling, fp16 conversion, checksums,
shard writes, commits) on a real ESM2 encoder (a tiny random one saved at the wanted hidden width,
loaded from its directory), except the model's arithmetic: inside this process only, the loaded
encoder's packed-window forward (`encoder.unpadded`, the `UnpaddedEsm` that runs ESM2 inference on
CPU and, in bf16, on CUDA) is replaced by a stand-in defined here, which returns the hidden states
(T packed positions x width, float32) as a view of a preallocated random buffer, and either

    free        returns at once: the host's ceiling;
    sleep       first sleeps padded positions / rate (b windows x the longest, specials included), as
                an accelerator of `rate` tokens/s would take (`--rates`, one per width; defaults
                1M tokens/s at width 640 ~ ESM2-150M, 150k tokens/s at width 1280 ~ ESM2-650M, an H100);
                with `--charge packed`, the positions handed in instead: what the build's own forward
                computes on CUDA in bf16 (flash-attention varlen, no padding anywhere), so that a change
                to how batches are formed is not read as a change of the host's pace.

On a GPU, `--forms model --device cuda` runs the real forward instead (a random ESM2 at the width's real
depth: 30 layers at 640 ~ ESM2-150M, 33 at 1280 ~ ESM2-650M, in the build's bf16): the forward's busy
time, taken with CUDA events around each call, over the build body's wall is the share of the time the
accelerator computes, beside tokens/s and MFU (benchmarks/gpu_check.py runs it).

With `--fresh-outputs` it copies the rows into a fresh tensor every call instead, as a model's output
is fresh: that copy's time counts inside the stand-in.

Cases (`--cases`, default all): per-token fp16 + pooled (`tokens`) and pooled-only (`pooled`, the
build's `--no-tokens`) at each width of `--widths`, each free and sleeping. Input: synthetic
proteome-like proteins (bench_build.py's generator: log-normal lengths, median 420, up to 1,022
residues, natural amino-acid frequencies). The encoder is loaded (and its forward replaced) before
`build()` is called, which finds it in its per-process encoder cache, so the timed body is the build
itself: plan, create the store, units, commits, consolidation; not imports or loading weights.
Each body's store is opened afterwards (`open_store`): complete, every record and token row there,
every window through the stand-in; otherwise the run fails rather than report a figure.

The same run writes shard-sized files (the per-token store's shard size at the widest width, ~32 MiB)
of random bytes, about as many bytes as that build's per-token rows, each fsynced, to the stores'
filesystem: the disk's raw sequential write bandwidth; then the same files as the build writes its
shards (embedcache.direct_io: O_DIRECT, past the page cache), and one sync ("% direct"). The build
itself does not sync (the last block of each shard file may still be in the page cache when it
returns). Cases and the raw writes alternate
`--repeats` times (the order reversed every other round); each row reports its fastest run.

Per row: tokens/s (content tokens / body seconds), store MB/s (bytes of per-token rows / body
seconds; 1 MB = 10^6 bytes), that as a share of the raw write bandwidth, the stand-in's busy share
(seconds inside the stand-in forward / body seconds), cpu/wall of the process.

On a small shared machine torch's intra-op threads wait for cores the build's own zarr threads (and
other jobs) hold: `--threads 1` compares the host's work without that contention.

    .venv/bin/python benchmarks/bench_build_host.py [--n-sequences 1500] [--repeats 2] [--json out.json]
    .venv/bin/python benchmarks/bench_build_host.py --cases tokens-1280-free --repeats 1    # one row
    .venv/bin/python benchmarks/bench_build_host.py --quick                                  # toy size, seconds
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the model is made locally; never reach for the hub

import argparse
import gc
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench_build import length_summary, random_proteins, sample_lengths, write_fasta
from benchlib import gpu_peak_tflops, load_average, machine_info, work_directory, write_json

N_SPECIAL = 2  # ESM2 wraps every window in <cls> ... <eos>
MB = 1e6


# -- the stand-in ---------------------------------------------------------------------------------


class StandInForward:
    """Takes the place of `UnpaddedEsm` on one loaded encoder: same call, same outputs' shapes, no model.

    `__call__(input_ids (T,), cu_seqlens (b + 1,), max_len, output_hidden_states)` returns
    (last hidden state (T, d), every hidden state or None), as `UnpaddedEsm.forward` does.
    """

    def __init__(self, width: int, n_layers: int, rate: float | None, rows: int, seed: int = 0, fresh: bool = False,
                 charge: str = "padded"):  # fmt: skip
        self.width, self.n_layers, self.rate, self.fresh, self.charge = width, n_layers, rate, fresh, charge
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer = torch.randn(rows, width, generator=self.generator)  # the batch budget; grown if ever passed
        self.seconds = 0.0  # wall time inside the stand-in (sleep, and the copy of --fresh-outputs)
        self.slept = 0.0
        self.copied = 0.0
        self.grown = 0
        self.calls = 0
        self.packed = 0  # positions handed in (content + specials)
        self.padded = 0  # b x the longest window: what a padded batch would compute

    def __call__(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, output_hidden_states: bool = False):
        started = time.perf_counter()
        n = len(input_ids)
        padded = (len(cu_seqlens) - 1) * int(max_len)
        if self.rate:
            t = time.perf_counter()
            time.sleep((padded if self.charge == "padded" else n) / self.rate)
            self.slept += time.perf_counter() - t
        if n > len(self.buffer):  # not expected: allocated at the batch budget
            self.buffer = torch.randn(n, self.width, generator=self.generator)
            self.grown += 1
        hidden = self.buffer[:n]  # (T, d) float32, contiguous
        if self.fresh:
            t = time.perf_counter()
            hidden = hidden.clone()  # a fresh tensor, as a model's output is
            self.copied += time.perf_counter() - t
        states = (hidden,) * (self.n_layers + 1) if output_hidden_states else None
        self.calls += 1
        self.packed += n
        self.padded += padded
        self.seconds += time.perf_counter() - started
        return hidden, states


def load_with_stand_in(config, rate: float | None, seed: int, fresh: bool = False, charge: str = "padded"):
    """The encoder `build(config, ...)` will use (its per-process cache's), its forward replaced."""
    from embedcache.partition import encoder_for

    encoder = encoder_for(config)
    if getattr(encoder, "unpadded", None) is None:
        raise SystemExit(
            f"the {config.encoder} encoder does not run through UnpaddedEsm here (attn {getattr(encoder, 'attn_implementation', None)}); "
            "the stand-in has nothing to replace"
        )
    rows = max(config.max_tokens, encoder.cost(encoder.window))  # a batch's positions: at most its budget or one window
    stand_in = StandInForward(encoder.embed_dim, encoder.n_layers, rate, rows, seed, fresh, charge)
    encoder.unpadded = stand_in
    return encoder, stand_in


class ModelTimer:
    """Wraps the loaded encoder's real packed-window forward (`UnpaddedEsm`): the same counters as the stand-in,
    and the time the device spends in it (CUDA events around each call; on the CPU, the call's wall time)."""

    def __init__(self, forward, device: torch.device, params_non_embedding: int, layers: int, hidden: int):
        self.forward, self.device = forward, device
        self.model = {"params_non_embedding": params_non_embedding, "layers": layers, "hidden": hidden}
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cpu_seconds = self.slept = self.copied = 0.0
        self.calls = self.packed = self.padded = self.grown = 0
        self.cu_seqlens: list[torch.Tensor] = []  # read back after the build: reading them now would wait for the device

    def __call__(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, output_hidden_states: bool = False):
        self.cu_seqlens.append(cu_seqlens)
        self.calls += 1
        self.packed += len(input_ids)
        self.padded += (len(cu_seqlens) - 1) * int(max_len)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.forward(input_ids, cu_seqlens, max_len, output_hidden_states=output_hidden_states)
            end.record()
            self.events.append((start, end))
            return out
        started = time.perf_counter()
        out = self.forward(input_ids, cu_seqlens, max_len, output_hidden_states=output_hidden_states)
        self.cpu_seconds += time.perf_counter() - started
        return out

    @property
    def flops(self) -> float:
        from bench_build import model_flops

        windows = [n - N_SPECIAL for c in self.cu_seqlens for n in np.diff(c.cpu().numpy()).tolist()]  # content tokens
        return model_flops(windows, self.model)

    @property
    def seconds(self) -> float:
        """Seconds the device was busy in the forwards (read after the build, which has synchronised)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return self.cpu_seconds


def load_with_timer(config) -> tuple[object, ModelTimer]:
    """The encoder `build(config, ...)` will use, its real forward wrapped in a ModelTimer."""
    from embedcache.partition import encoder_for

    encoder = encoder_for(config)
    if getattr(encoder, "unpadded", None) is None:
        raise SystemExit(f"the {config.encoder} encoder does not run through UnpaddedEsm here; nothing to time")
    model = encoder.model
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    timer = ModelTimer(encoder.unpadded, encoder.device, sum(p.numel() for p in model.parameters()) - embedding,
                       encoder.n_layers, encoder.embed_dim)  # fmt: skip
    encoder.unpadded = timer
    return encoder, timer


# -- cases ----------------------------------------------------------------------------------------


FORMS = ("free", "sleep", "model")


@dataclass(frozen=True)
class Case:
    width: int
    tokens: bool  # per-token fp16 + pooled; False: pooled only (--no-tokens)
    form: str  # free | sleep (stand-ins) | model (the real forward, timed)
    rate: float | None = None  # the sleeping stand-in's tokens/s

    @property
    def name(self) -> str:
        return f"{'tokens' if self.tokens else 'pooled'}-{self.width}-{self.form}"

    @property
    def label(self) -> str:
        what = "per-token fp16" if self.tokens else "pooled only"
        return f"{what}, {self.width}, " + (f"sleep {self.rate / 1e3:,.0f}k tok/s" if self.form == "sleep" else self.form)


@dataclass
class Run:
    case: str
    seconds: float  # body: build() with the encoder already loaded
    cpu_seconds: float
    load_seconds: float  # loading the encoder before it (not in the body)
    units_seconds: float  # build's own figure: units + commits (not planning, store creation, consolidation)
    stand_in_seconds: float
    slept_seconds: float
    copied_seconds: float
    stand_in_calls: int
    tokens: int
    rows: int
    token_bytes: int  # per-token rows x width x 2 bytes
    store_file_bytes: int
    packed_positions: int
    padded_positions: int
    load_average: float | None = None
    model_flops: float | None = None  # the real forward's (form "model")


@dataclass
class RawWrite:
    seconds: float
    bytes: int
    files: int

    @property
    def mb_s(self) -> float:
        return self.bytes / MB / self.seconds


def raw_write(directory: Path, shard_bytes: int, total_bytes: int, seed: int, direct: bool = False) -> RawWrite:
    """Sequential writes of shard-sized files of random bytes, each fsynced: the filesystem's write bandwidth.
    `direct`: written as the build writes its shards (embedcache.direct_io: O_DIRECT where the filesystem takes
    it), then one sync."""
    from embedcache.direct_io import aligned_empty, write_file

    directory.mkdir(parents=True, exist_ok=True)
    block = aligned_empty(shard_bytes)
    block[:] = np.frombuffer(np.random.default_rng(seed).bytes(shard_bytes), np.uint8)
    n = max(1, -(-total_bytes // shard_bytes))
    started = time.perf_counter()
    for i in range(n):
        block[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # no two files alike
        if direct:
            write_file(directory / f"shard_{i:05d}", block)
            continue
        with open(directory / f"shard_{i:05d}", "wb") as f:
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
    if direct:
        os.sync()
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return RawWrite(seconds, n * shard_bytes, n)


def store_file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_store(path: Path, case: Case, ids: list[str], n_residues: int, stand_in: StandInForward, plan) -> None:
    """The build did what it was asked, through the stand-in: else no figure is reported."""
    from embedcache import open_store

    store = open_store(path)
    problems = []
    if not store.complete:
        problems.append(f"status {store.status!r}")
    if len(store) != len(ids) or store.committed.records != len(ids):
        problems.append(f"{len(store)} records ({store.committed.records} committed), expected {len(ids)}")
    pooled = store.pooled(ids)
    if pooled.shape != (len(ids), case.width) or not np.isfinite(pooled).all():
        problems.append(f"pooled {pooled.shape}, expected ({len(ids)}, {case.width}) finite")
    if case.tokens:
        rows = sum(store.token_span(i)[1] for i in ids)
        if rows != n_residues or store.committed.tokens < rows:
            problems.append(f"{rows} token rows ({store.committed.tokens} committed), expected {n_residues}")
        last = store.tokens(ids[-1])
        if last.shape != (store.token_span(ids[-1])[1], case.width) or last.dtype != np.float16:
            problems.append(f"tokens of {ids[-1]}: {last.shape} {last.dtype}")
    elif store.has_tokens:
        problems.append("a pooled-only build stored per-token rows")
    expected = plan.n_tokens + N_SPECIAL * plan.n_windows
    if stand_in.calls == 0 or stand_in.packed != expected:
        problems.append(f"the stand-in saw {stand_in.packed} positions in {stand_in.calls} calls, expected {expected}: "
                        "the build ran another forward")  # fmt: skip
    if problems:
        raise SystemExit(f"{case.name}: the store at {path} is not what the build was asked for: {'; '.join(problems)}")


def run_case(case: Case, args, model_dirs: dict[int, Path], fasta: Path, ids: list[str], n_residues: int, store: Path) -> Run:
    from embedcache.build import build
    from embedcache.config import BuildConfig

    model = case.form == "model"  # the real forward on --device, in the build's own precision (bf16 on CUDA)
    config = BuildConfig.create(
        "esm2", str(model_dirs[case.width, model]), tokens=case.tokens, precision="auto" if model else "fp32",
        device=args.device if model else "cpu",
        **({"max_tokens": args.max_tokens} if args.max_tokens else {}),
        **({"shard_mb": args.shard_mb} if args.shard_mb else {}),
    )  # fmt: skip
    started = time.perf_counter()
    _, stand_in = load_with_timer(config) if model else load_with_stand_in(config, case.rate, args.seed, args.fresh_outputs, args.charge)
    load_seconds = time.perf_counter() - started
    gc.collect()
    load = load_average()
    started, cpu_started = time.perf_counter(), time.process_time()
    report = build(config, [fasta], store, progress=False, log=lambda _: None)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    check_store(store, case, ids, n_residues, stand_in, report.plan)
    rows = report.plan.n_rows if case.tokens else 0
    run = Run(
        case.name, seconds, cpu_seconds, load_seconds, report.seconds, stand_in.seconds, stand_in.slept, stand_in.copied,
        stand_in.calls,
        report.plan.n_tokens, rows, rows * case.width * np.dtype(config.dtype).itemsize, store_file_bytes(store),
        stand_in.packed, stand_in.padded, load, getattr(stand_in, "flops", None),
    )  # fmt: skip
    shutil.rmtree(store)
    os.sync()  # untimed: the next run starts with nothing of this one left to write back
    return run


# -- command line ---------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Host-side throughput of embedcache build(): the real build with the model's forward replaced "
        "by a free or sleeping stand-in, beside the disk's raw write bandwidth."
    )
    a = p.add_argument
    a("--n-sequences", type=int, default=None, help="synthetic proteins (default 1500; --quick 24)")
    a("--widths", type=_ints, default=None, help="hidden widths, comma-separated (default 640,1280; --quick 64,128)")
    a("--rates", type=_floats, default=[1e6, 1.5e5],
      help="tokens/s of the sleeping stand-in, one per width (default %(default)s: ESM2-150M, ESM2-650M on an H100)")  # fmt: skip
    a("--cases", default=None,
      help="comma-separated case names to run, e.g. tokens-1280-free,pooled-640-sleep (default: all: tokens|pooled x "
           "width x free|sleep)")  # fmt: skip
    a("--repeats", type=int, default=None, help="timed rounds, alternating the cases; best reported (default 2; --quick 1)")
    a("--max-tokens", type=int, default=None, help="token budget of a batch (default: the build's)")
    a("--shard-mb", type=float, default=None, help="per-token shard size (default: the build's)")
    a("--median-length", type=float, default=None, help="median of the log-normal lengths (default 420; --quick 60)")
    a("--sigma", type=float, default=0.75, help="log-space std of the lengths (default %(default)s)")
    a("--min-length", type=int, default=30, help="shortest protein (default %(default)s)")
    a("--max-length", type=int, default=None, help="longest protein (default 1022, one ESM2 window; --quick 200)")
    a("--warmup-sequences", type=int, default=10, help="sequences of the untimed warm-up builds (default %(default)s)")
    a("--seed", type=int, default=0, help="seed of the input, the models and the stand-in's values (default %(default)s)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    a("--forms", default="free,sleep",
      help="forms of the forward, comma-separated (default %(default)s): free and sleep are stand-ins on the CPU; "
           "model runs the real random ESM2 on --device, in the build's precision (bf16 on CUDA), its busy time "
           "taken with CUDA events")  # fmt: skip
    a("--device", default="cpu", help="device of the model form (default %(default)s; cuda on a GPU)")
    a("--model-layers", type=_ints, default=None,
      help="layers of the model form's ESM2, one per width (default: ESM2's own, 30 at 640 (150M), 33 at 1280 (650M), "
           "else 2)")  # fmt: skip
    a("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for MFU (default: by device name)")
    a("--fresh-outputs", action="store_true",
      help="the stand-in copies its rows into a fresh tensor every call (a model's output, a GPU's device-to-host "
           "copy) instead of returning a view of its buffer")  # fmt: skip
    a("--charge", choices=("padded", "packed"), default="padded",
      help="what the sleeping stand-in sleeps for: padded (b windows x the longest: a padded model; the default) or "
           "packed (the positions handed in: the build's forward on CUDA in bf16, which computes no padding)")  # fmt: skip
    a("--quick", action="store_true", help="toy size: 24 short proteins, widths 64,128, one round (for the tests)")
    a("--workdir", type=Path, default=None, help="input, models, stores and raw files here (default: a temp dir, removed)")
    a("--json", type=Path, default=None, help="also write every figure to this JSON file")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = dict(n_sequences=(24, 1500), widths=([64, 128], [640, 1280]), repeats=(1, 2), median_length=(60.0, 420.0),
                    max_length=(200, 1022))  # fmt: skip
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if quick:
        args.warmup_sequences = min(args.warmup_sequences, 4)
    args.forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if not args.forms or set(args.forms) - set(FORMS):
        raise SystemExit(f"--forms: {args.forms}; choose from {', '.join(FORMS)}")
    esm2_layers = {640: 30, 1280: 33}
    args.model_layers = args.model_layers or [esm2_layers.get(w, 2) for w in args.widths]
    if len(args.model_layers) != len(args.widths):
        raise SystemExit(f"--model-layers gives {len(args.model_layers)} for {len(args.widths)} widths: one per width")
    if len(args.rates) != len(args.widths):
        raise SystemExit(f"--rates gives {len(args.rates)} rates for {len(args.widths)} widths {args.widths}: one per width")
    if args.repeats < 1 or args.n_sequences < 1 or min(args.widths) < 2 or min(args.rates) <= 0:
        raise SystemExit("--repeats, --n-sequences, --widths and --rates must be positive")
    return args


def all_cases(args) -> list[Case]:
    cases = [Case(w, tokens, form, r if form == "sleep" else None)
             for tokens in (True, False) for w, r in zip(args.widths, args.rates) for form in args.forms]  # fmt: skip
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cases})
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; of {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in wanted]
    return cases


def main() -> None:
    args = resolve(create_parser().parse_args())
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused MLM head of the checkpoint is expected
    hf_logging.disable_progress_bar()  # saving and loading the models is not what is measured
    if args.threads:
        torch.set_num_threads(args.threads)
    with work_directory(args.workdir, "bench_build_host_") as work:
        run(args, work)


def run(args: argparse.Namespace, work: Path) -> dict:
    from embedcache.config import BuildConfig
    from embedcache.store import token_chunking
    from embedcache.tiny_models import make_tiny_esm2

    cases = all_cases(args)
    device = args.device if "model" in args.forms else "cpu (the model's forward is a stand-in)"
    machine = machine_info(device=device)
    print("== machine")
    print(f"  {machine['platform']}  {machine['cpu_model']}; {machine['cpu_cores']} cores, torch threads "
          f"{machine['torch_threads']}; python {machine['python']}, torch {machine['torch']}, embedcache {machine['embedcache']}")  # fmt: skip
    print(f"  load average (1 min) at start: {machine['load_average_at_start']:.2f}; filesystem of the stores: {work}")

    rng = np.random.default_rng(args.seed)
    lengths = sample_lengths(rng, args.n_sequences, median=args.median_length, sigma=args.sigma,
                             min_length=args.min_length, max_length=args.max_length)  # fmt: skip
    seqs = random_proteins(rng, lengths)
    ids = [f"SYN{i:06d}" for i in range(len(seqs))]
    fasta = write_fasta(work / "proteins.fa", ids, seqs)
    warm = min(args.warmup_sequences, len(seqs))
    warm_fasta = write_fasta(work / "warmup.fa", ids[:warm], seqs[:warm])
    inputs = length_summary(lengths)
    inputs.update(median_param=args.median_length, sigma=args.sigma, max_length=args.max_length, seed=args.seed)
    n_residues = int(lengths.sum())
    print("== input")
    print(f"  {len(seqs):,} synthetic proteins, {n_residues:,} residues; length median {inputs['median']:.0f}, "
          f"mean {inputs['mean']:.0f}, p90 {inputs['p90']:.0f}, max {inputs['max']} (log-normal, natural aa frequencies)")  # fmt: skip

    widths = sorted({c.width for c in cases})
    layers = dict(zip(args.widths, args.model_layers))
    # A stand-in needs the model's width only (1 layer); the model form, the real depth.
    model_dirs = {(c.width, c.form == "model"): make_tiny_esm2(
        work / f"model_{c.width}{'_full' if c.form == 'model' else ''}", hidden=c.width,
        layers=layers[c.width] if c.form == "model" else 1, heads=max(1, c.width // 64), seed=args.seed) for c in cases}  # fmt: skip
    defaults = BuildConfig.create("esm2", str(next(iter(model_dirs.values()))))
    shard_mb = args.shard_mb or defaults.shard_mb
    widest = max((c.width for c in cases if c.tokens), default=max(widths))
    chunk, shard_rows = token_chunking(widest * 2, shard_mb)
    shard_bytes = shard_rows * widest * 2
    raw_total = n_residues * widest * 2
    print(f"  models: random ESM2, widths {widths}: 1 layer for the stand-ins (only the width matters), "
          f"{', '.join(f'{layers[w]} layers at {w}' for w in widths)} for the model form on {args.device}; "
          f"batch budget {args.max_tokens or defaults.max_tokens} tokens, shards {shard_mb:g} MiB")  # fmt: skip

    # Untimed warm-up: first-call costs (imports, allocator, zarr's event loop, CUDA kernels) of every width and output.
    for case in dict.fromkeys(Case(c.width, c.tokens, c.form if c.form == "model" else "free") for c in cases):
        run_case(case, args, model_dirs, warm_fasta, ids[:warm], int(lengths[:warm].sum()), work / "warmup.zarr")

    print(f"== timed runs ({args.repeats} rounds, the order reversed every other round; raw write: "
          f"{-(-raw_total // shard_bytes)} files of {shard_bytes / MB:.1f} MB, fsync each)")  # fmt: skip
    runs: dict[str, list[Run]] = {c.name: [] for c in cases}
    raws: list[RawWrite] = []
    directs: list[RawWrite] = []  # as the build writes shards: past the page cache
    for r in range(args.repeats):
        order = [*cases, "raw"] if r % 2 == 0 else ["raw", *reversed(cases)]
        for item in order:
            if item == "raw":
                raws.append(raw_write(work / "raw", shard_bytes, raw_total, args.seed + r))
                os.sync()
                directs.append(raw_write(work / "raw", shard_bytes, raw_total, args.seed + r, direct=True))
                print(f"  round {r + 1}  raw write{'':<27}{raws[-1].seconds:7.2f} s  {raws[-1].mb_s:9,.0f} MB/s"
                      f"  (direct, as the build writes shards: {directs[-1].mb_s:,.0f} MB/s)")  # fmt: skip
                continue
            result = run_case(item, args, model_dirs, fasta, ids, n_residues, work / f"store_{item.name}.zarr")
            runs[item.name].append(result)
            mbs = f"{result.token_bytes / MB / result.seconds:9,.0f} MB/s" if item.tokens else f"{'':>14}"
            print(f"  round {r + 1}  {item.name:<34}{result.seconds:7.2f} s  {mbs}  {result.tokens / result.seconds:10,.0f} tok/s  "
                  f"forward {result.stand_in_seconds / result.seconds:6.1%}  cpu/wall {result.cpu_seconds / result.seconds:.2f}")  # fmt: skip
    load_end = load_average()

    raw_best = max(raws, key=lambda x: x.mb_s)
    direct_best = max(directs, key=lambda x: x.mb_s)
    cuda = "model" in args.forms and torch.device(args.device).type == "cuda"
    peak = (args.peak_tflops or gpu_peak_tflops(torch.cuda.get_device_name())) if cuda else None
    rows = []
    for case in cases:
        best = min(runs[case.name], key=lambda x: x.seconds)
        mb_s = best.token_bytes / MB / best.seconds if case.tokens else None
        rows.append({
            "case": case.name, "label": case.label, "width": case.width, "tokens": case.tokens, "rate": case.rate,
            "best_seconds": best.seconds, "seconds": [x.seconds for x in runs[case.name]],
            "tokens_per_s": best.tokens / best.seconds, "store_mb_s": mb_s,
            "share_of_raw_write": mb_s / raw_best.mb_s if mb_s is not None else None,
            "share_of_direct_write": mb_s / direct_best.mb_s if mb_s is not None else None,
            "stand_in_share": best.stand_in_seconds / best.seconds, "slept_share": best.slept_seconds / best.seconds,
            "host_seconds": best.seconds - best.stand_in_seconds, "cpu_per_wall": best.cpu_seconds / best.seconds,
            "outside_units_seconds": best.seconds - best.units_seconds, "ideal_tokens_per_s": case.rate,
            "share_of_rate": best.tokens / best.seconds / case.rate if case.rate else None,
            "mfu": best.model_flops / best.seconds / (peak * 1e12) if best.model_flops and peak else None,
            "runs": [vars(x) for x in runs[case.name]],
        })  # fmt: skip

    print(f"== result (best of {args.repeats}; raw write {raw_best.mb_s:,.0f} MB/s, best of {len(raws)}: "
          f"{', '.join(f'{x.mb_s:,.0f}' for x in raws)}; direct {direct_best.mb_s:,.0f} MB/s, best of {len(directs)}: "
          f"{', '.join(f'{x.mb_s:,.0f}' for x in directs)})")  # fmt: skip
    print(f"  {'case':<38}{'body s':>8}{'tokens/s':>11}{'store MB/s':>12}{'% of raw':>10}{'% direct':>10}{'forward':>10}"
          f"{'% of rate':>11}{'MFU':>7}{'cpu/wall':>10}")  # fmt: skip
    for row in rows:
        mbs = (f"{row['store_mb_s']:12,.0f}{row['share_of_raw_write']:10.0%}{row['share_of_direct_write']:10.0%}"
               if row["tokens"] else f"{'-':>12}{'-':>10}{'-':>10}")  # fmt: skip
        of_rate = f"{row['share_of_rate']:11.0%}" if row["rate"] else f"{'-':>11}"
        mfu = f"{row['mfu']:7.1%}" if row["mfu"] is not None else f"{'-':>7}"
        print(f"  {row['label']:<38}{row['best_seconds']:8.2f}{row['tokens_per_s']:11,.0f}{mbs}{row['stand_in_share']:10.1%}"
              f"{of_rate}{mfu}{row['cpu_per_wall']:10.2f}")  # fmt: skip
    print(f"  tokens/s = {n_residues:,} content tokens / body seconds (build() with the encoder loaded: plan, store, units, "
          f"commits); store MB/s = per-token fp16 rows / body seconds; forward = share of the body inside the stand-in "
          f"forward ({'sleep + copy' if args.fresh_outputs else 'sleep; rows are views of its buffer'}), or the model's "
          f"busy time (CUDA events) over the body; % of rate = tokens/s / the sleeping stand-in's rate; MFU against the "
          f"GPU's dense bf16 peak ({peak or '-'} TFLOP/s)")  # fmt: skip
    if load_end is not None:
        print(f"  load average (1 min) at the end: {load_end:.2f} (this benchmark alone adds ~1-2)")

    results = {
        "benchmark": "bench_build_host",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "load_average_at_end": load_end,
        "input": inputs,
        "stand_in": "encoder.unpadded replaced: rows from a preallocated random float32 buffer ("
                    + ("copied into a fresh tensor" if args.fresh_outputs else "a view") + f"); sleep = {args.charge} positions / rate",
        "raw_write": {"shard_bytes": shard_bytes, "files": raw_best.files, "bytes": raw_best.bytes, "fsync": True,
                      "mb_s": [x.mb_s for x in raws], "best_mb_s": raw_best.mb_s,
                      "direct_mb_s": [x.mb_s for x in directs], "best_direct_mb_s": direct_best.mb_s},  # fmt: skip
        "rows": rows,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    sys.exit(main())
