"""Seconds per training epoch and peak memory: fusion on cached stores vs end-to-end finetuning.

Three modes train the same fusion model (same data, seed, aggregator, model options and
TrainConfig) and differ only in where its features come from:

    cached   `fusion train`'s path: features read from the embedcache stores (fusion.experiment.run_train's
             steps: open_batches, build_model, fit_feature_stats_, fusion.train.train)
    frozen   `fusion finetune` with every encoder frozen: the stores' encoders rebuilt from their
             provenance re-embed each batch live under torch.no_grad (fusion.finetune.run_finetune's
             steps: open_sequence_batches, load_live_encoders, build_model, EndToEndModel,
             fit_live_feature_stats_, configure_, make_finetune_optimizer, train)
    full     the same with --encoder-mode full for every modality: every encoder parameter trains

What is timed. `fusion.train.train` runs unchanged on the run's `StoreBatches`, seen through a thin
wrapper that records when the loop asks for each batch, so one training step = the interval between
two requests (data wait + forward + loss + backward + clip + AdamW step) and one validation pass = its
first request to its last. An epoch is what `train()` does per epoch:

    s/epoch = train batches x median s/step + validation pass + the rest (metrics, best-state copy, checkpoint write)

cached runs --cached-epochs whole epochs and reports the median epoch after the first (measured).
frozen and full run ONE epoch cut to its first --warmup-steps + --steps train batches (the warm-up
ones untimed) plus the whole validation split, and s/epoch is EXTRAPOLATED with the formula above
(measured validation pass and rest; --steps 0 runs the whole epoch instead). Feature statistics of
the finetune modes are fitted on the same cut train batches (timed separately: a once-per-run cost).

Peak memory. Every mode runs in a fresh child process (this script with --child MODE), so nothing of
one mode stays in the next one's figures. CPU: the increase of the process's peak resident set from
just after the imports, plus its absolute value; the peak is VmHWM of /proc/self/status, because
`ru_maxrss` of an exec'd child starts at its parent's RSS (kept in JSON as ru_maxrss_bytes);
tracemalloc does not see torch's allocations and is not used. CUDA: `torch.cuda.max_memory_allocated`
(and _reserved) after `reset_peak_memory_stats` at the start. Modes run different numbers of steps and
glibc keeps freed blocks, so the table compares the peak over setup + the same first training steps.

Sizes.
    tiny       (default; CPU, ~1.5 min) fusion.demo's data and encoders: the synthetic IsoFormer-schema
               data set (400 genes, ~1,200 transcripts), tiny random ESM2 / NT (hidden 64, 2 layers) and
               Enformer (dim 48, the whole 2-kb window as 16 bins), the demo's cross-attention model. It runs
               both fusion inputs the demo trains: per-token rows group-averaged to 32 (its headline run)
               and pooled vectors (its ablation grid).
    isoformer  random weights at the released IsoFormer encoders' shapes: ESM2-150M, an NT-v2-250M-like
               ESM model (see ISOFORMER_NOTES) and the official Enformer on its 196,608-bp window, on a
               handful of synthetic genes with longer transcripts, every per-token row. Made for a GPU
               (bf16 autocast); on a CPU it runs cached and frozen only, in full precision, at about
               30 s per Enformer window on 2 cores (use --n-genes 10 --steps 3 --warmup-steps 1).

    .venv/bin/python benchmarks/bench_fusion.py [--size tiny|isoformer] [--features tokens|pooled] [--max-tokens K] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # every model is made locally; never reach for the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import itertools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the library is the checkout's
    sys.path.insert(0, str(REPO))

from benchlib import load_average, machine_info, reuse_or_clear, write_json  # noqa: E402  (after the path line above)
from cli.common import HelpFormatter  # noqa: E402
from fusion.demo import MODALITY_ENCODERS, DemoConfig, build_modality_stores, make_demo_encoders  # noqa: E402

MODES = ("cached", "frozen", "full")
SPLITS = ("train", "validation", "test")
SETUP_FILE = "bench_setup.json"
CRITERION = 10.0  # the cached epoch must be at least this many times faster than the frozen-finetune epoch

TINY_NOTES = (
    "tiny ESM2 / NT come from embedcache.tiny_models (dropout 0.0 as in the released checkpoints); the tiny "
    "encoders (0.07-0.16M parameters each outside embedding tables) do about as much arithmetic as the fusion "
    "model (0.34M), unlike IsoFormer's 150M-250M encoders",
)
ISOFORMER_NOTES = (
    "ESM2-150M: EsmConfig as facebook/esm2_t30_150M_UR50D's (hidden 640, 30 layers, 20 heads, "
    "intermediate 2560, rotary, token dropout, dropout 0.0), random weights",
    "NT-v2-250M-like: transformers' ESM code with rotary positions, hidden 768, 24 layers, 16 heads, "
    "intermediate 3072, 4,107-token 6-mer vocabulary, 2,050 positions. The real v2 runs remote code whose "
    "feed-forward is a GLU without biases (a third 768x3072 matrix per layer): this model has ~25% fewer "
    "FLOPs per token and ~55M fewer parameters. 16 heads as the v2-100m/500m configs declare (the 250m "
    "config's head count is not verified here; it does not change FLOPs)",
    "Enformer: enformer-pytorch's official hparams (dim 1536, depth 11, 8 heads, target_length 896, "
    "output heads human 5313 / mouse 1643), random weights, on the full 196,608-bp window: 896 bins x 3072",
    "data: a handful of synthetic genes only (the 196,608-bp windows make each gene's DNA the dominant cost); "
    "transcripts and proteins longer than the demo's (3'UTR 0.5-3 kb, non-coding 1-6 kb, proteins 200-1000 aa)",
)


# -- sizes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """One benchmark size: data, encoders and fusion-model defaults."""

    name: str
    n_genes: int  # synthetic genes (~3 transcripts = samples each)
    batch_size: int  # samples per batch
    d_model: int  # fusion width
    n_heads: int  # fusion attention heads
    head_hidden: int  # fusion MLP head width
    configurations: tuple[dict, ...]  # the fusion inputs run by default: {"label", "features", "max_tokens"}
    synthetic: dict = field(default_factory=dict)  # SyntheticConfig overrides
    cpu_modes: tuple[str, ...] = MODES  # the default --modes without a GPU


SIZES = {
    "tiny": Size(
        "tiny", n_genes=400, batch_size=32, d_model=64, n_heads=4, head_hidden=128,
        # The two fusion inputs the demo trains (fusion.demo.DemoConfig): its per-token headline run
        # and the pooled vectors of its ablation grid.
        configurations=(
            {"label": "demo headline run", "features": "tokens", "max_tokens": DemoConfig.max_tokens},
            {"label": "demo ablation grid", "features": DemoConfig.ablation_features, "max_tokens": None},
        ),
    ),  # fmt: skip
    "isoformer": Size(
        "isoformer",
        n_genes=24,
        # Full finetuning keeps Enformer's conv-tower activations for every distinct 196,608-bp window
        # of a batch (enformer-pytorch checkpoints only the transformer blocks): 2 samples fit an H100.
        batch_size=2,
        d_model=256,
        n_heads=8,
        head_hidden=512,
        configurations=({"label": "IsoFormer, every per-token row", "features": "tokens", "max_tokens": None},),
        synthetic={
            "dna_window": 196_608,
            "utr3_length": (500, 3000),
            "noncoding_length": (1000, 6000),
            "protein_length": (200, 1000),
        },
        # Full finetuning backpropagates through Enformer's conv tower on 196,608-bp windows: hours and
        # tens of GB per step on a CPU. Cached and frozen run there (frozen: ~30 s per window on 2 cores).
        cpu_modes=("cached", "frozen"),
    ),
}


# -- setup: data, encoders, stores ------------------------------------------------------------------


def make_isoformer_encoders(models: Path, seed: int, log: Callable[[str], None]) -> dict[str, Path]:
    """Random weights at the released IsoFormer encoders' shapes, saved like checkpoints (ISOFORMER_NOTES)."""
    from enformer_pytorch import Enformer

    from embedcache.tiny_models import ESM2_VOCAB, NT_VOCAB, save_enformer, save_esm_model

    t0 = time.perf_counter()
    esm2 = save_esm_model(
        models / "esm2-150m", ESM2_VOCAB, hidden=640, layers=30, heads=20, seed=seed, tokenizer_kwargs={},
        max_position_embeddings=1026, position_embedding_type="rotary", token_dropout=True,
    )  # fmt: skip
    log(f"  ESM2-150M shape saved ({time.perf_counter() - t0:.0f} s)")

    t0 = time.perf_counter()
    # NT's tokenizer adds <cls> only; 2,048 positions of rotary context as in v2.
    nt = save_esm_model(
        models / "nt-v2-250m-like", NT_VOCAB, hidden=768, layers=24, heads=16, seed=seed,
        tokenizer_kwargs={"eos_token": None, "model_max_length": 2048}, layer_norm_eps=1e-12,
        max_position_embeddings=2050, position_embedding_type="rotary", token_dropout=False,
    )  # fmt: skip
    log(f"  NT-v2-250M-like saved ({time.perf_counter() - t0:.0f} s)")

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    enformer = models / "enformer-official-shape"
    save_enformer(Enformer.from_hparams(), enformer)  # defaults = the official model
    log(f"  Enformer (official hparams) saved ({time.perf_counter() - t0:.0f} s)")
    return {"protein": esm2, "rna": nt, "dna": enformer}


def make_data(work: Path, size: Size, n_genes: int, seed: int, log: Callable[[str], None]) -> tuple[Path, dict[str, str], float]:
    """(prepared dir, modality -> store, seconds): synthetic data -> IsoFormer adapter -> embedcache stores.

    A --workdir whose bench_setup.json matches is reused as it is.
    """
    from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
    from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic

    stamp_value = {"size": size.name, "n_genes": n_genes, "seed": seed, "synthetic": size.synthetic}
    prepared, stores = work / "prepared", {m: str(work / "stores" / f"{m}.zarr") for m in MODALITY_ENCODERS}
    if reuse_or_clear(work, SETUP_FILE, stamp_value, made=("synthetic", "prepared", "models", "stores", "runs")):
        log(f"  reusing the data set and stores in {work} ({SETUP_FILE} matches)")
        return prepared, stores, 0.0

    started = time.perf_counter()
    info = generate_synthetic(work / "synthetic", SyntheticConfig(n_genes=n_genes, seed=seed, **size.synthetic))
    done = prepare_isoformer(info.csv_path, info.genome_path, prepared, IsoformerPrepareConfig(dna_window=info.dna_window))
    log(f"  synthetic {n_genes} genes -> prepared {done.counts['transcripts']} transcripts")
    if size.name == "isoformer":
        model_dirs = make_isoformer_encoders(work / "models", seed, log)
    else:  # the demo's recipe
        model_dirs = make_demo_encoders(work / "models", hidden=DemoConfig.encoder_hidden, dna_window=info.dna_window, seed=seed)
    t0 = time.perf_counter()
    build_modality_stores(prepared, model_dirs, work / "stores", info.dna_window, progress=False, log=lambda s: None)
    log(f"  built the stores in {time.perf_counter() - t0:.1f} s")
    (work / SETUP_FILE).write_text(json.dumps(stamp_value))  # last: its presence marks a whole data set
    return prepared, stores, time.perf_counter() - started


def data_summary(prepared: Path, stores: dict[str, str], batch_size: int) -> dict:
    """Samples per split, batches per epoch, and per modality: records, encoder input tokens, stored rows."""
    from embedcache import open_store
    from fusion.experiment import read_manifest

    manifest = read_manifest(prepared)
    samples = {s: len(manifest.split(s)) for s in SPLITS}
    train = manifest.split("train")
    out: dict[str, Any] = {
        "samples": samples,
        "batch_size": batch_size,
        "train_batches": -(-samples["train"] // batch_size),
        "validation_batches": -(-samples["validation"] // batch_size),
        "modalities": {},
    }
    for m, path in stores.items():
        store = open_store(path)
        config = store.attrs["config"]
        keys = list(dict.fromkeys(manifest.keys(m)))
        content = store.root["content_index"][: store.committed.records][store.rows(keys)]
        n_input = store.root["n_input_tokens"][: store.committed.content][content]
        n_windows = store.root["n_windows"][: store.committed.content][content]
        rows = np.array([store.token_span(k)[1] for k in keys])
        train_present = train.present(m)
        train_rows = [store.token_span(k)[1] for k in train.keys(m)]
        provenance = store.attrs["provenance"]
        out["modalities"][m] = {
            "encoder": config["encoder"],
            "model": Path(config["model"]).name,
            "encoder_window": provenance.get("window"),
            "records": len(keys),
            "input_tokens_mean": float(n_input.mean()),
            "input_tokens_max": int(n_input.max()),
            "windows_per_record_max": int(n_windows.max()),
            "rows_per_record_mean": float(rows.mean()),
            "rows_per_record_max": int(rows.max()),
            "embed_dim": store.embed_dim,
            "train_samples_with_it": int(train_present.sum()),
            "train_rows_per_sample_mean": float(np.mean(train_rows)) if train_rows else 0.0,
            "token_unit": "bp" if config["encoder"] == "enformer" else "tokens",
        }
    return out


# -- one mode, in a child process ---------------------------------------------------------------------


class TimedBatches:
    """A run's StoreBatches as `train()` sees it, with the train split cut to `train_batches` batches
    and the moment the loop asks for every batch recorded (one list of stamps per pass)."""

    def __init__(self, inner, train_batches: int | None, *, keep_train_batches: bool = False, memory: Callable[[], dict] | None = None):
        self.inner = inner
        self.train_batches = train_batches  # None: the whole split
        self.keep = keep_train_batches  # keep the shuffled train batches (sequences only) for the padding figures
        self.memory = memory  # sampled after every training step (peak RSS / CUDA peak so far: cheap counters)
        self.passes: list[dict] = []  # {"split", "shuffle", "epoch", "stamps", "batches", "memory"}

    def __getattr__(self, name: str):  # fingerprints, target_names, modalities, stores, ...
        return getattr(self.inner, name)

    def n_batches(self, split: str) -> int:
        n = self.inner.n_batches(split)
        return min(n, self.train_batches) if split == "train" and self.train_batches else n

    def __call__(self, split: str, *, shuffle: bool = False, epoch: int = 0) -> Iterator:
        it = self.inner(split, shuffle=shuffle, epoch=epoch)
        if split == "train" and self.train_batches:
            it = itertools.islice(it, self.train_batches)
        record = {"split": split, "shuffle": shuffle, "epoch": epoch, "stamps": [], "waits": [], "batches": [], "memory": []}
        self.passes.append(record)
        training = split == "train" and shuffle
        return self._timed(it, record, keep=self.keep and training, memory=self.memory if training else None)

    @staticmethod
    def _timed(it, record: dict, keep: bool, memory: Callable[[], dict] | None) -> Iterator:
        stamps, waits = record["stamps"], record["waits"]
        stamps.append(time.perf_counter())  # asked for the first batch
        for batch in it:
            waits.append(time.perf_counter() - stamps[-1])  # the step waited this long for its batch
            if keep:
                record["batches"].append(batch.features)
            yield batch
            stamps.append(time.perf_counter())  # asked for the next one: this batch's step is done
            if memory is not None:
                record["memory"].append(memory())


class Probe:
    """Durations of named regions, each stamped with the host time it began (to assign it to a step).

    CUDA: a pair of events per region, read after training (no synchronisation inside the step).
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.records: list[tuple] = []

    def start(self, name: str) -> tuple:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return name, time.perf_counter(), event

    def stop(self, token: tuple) -> None:
        name, t0, event = token
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.records.append((name, t0, event, end))
        else:
            self.records.append((name, t0, time.perf_counter() - t0))

    def durations(self) -> list[tuple[str, float, float]]:
        """(name, host start, seconds) per region."""
        if self.cuda:
            torch.cuda.synchronize()
            return [(n, t0, a.elapsed_time(b) / 1e3) for n, t0, a, b in self.records]
        return list(self.records)


def instrument_(model, probe: Probe) -> None:
    """Time EndToEndModel.embed (the whole live-feature path) and each encoder module's forward."""
    embed = model.embed

    def timed_embed(features):
        token = probe.start("features")
        out = embed(features)
        probe.stop(token)
        return out

    model.embed = timed_embed  # an instance attribute: forward() and the statistics pass call it
    for m, module in model.encoders.items():
        tokens: list[tuple] = []
        module.register_forward_pre_hook(lambda _mod, _args, m=m, tokens=tokens: tokens.append(probe.start(f"encoder:{m}")))
        module.register_forward_hook(lambda _mod, _args, _out, tokens=tokens: probe.stop(tokens.pop()))


def rss_now() -> int:
    """Current resident set of this process in bytes (/proc/self/statm)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def ru_maxrss() -> int:
    """getrusage's peak resident set in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def max_rss() -> int:
    """Peak resident set of this process image so far, in bytes: VmHWM of /proc/self/status.

    Not ru_maxrss: Linux carries the pre-exec high-water mark across exec, so a child's ru_maxrss
    starts at its parent's RSS at spawn time (here ~1 GiB: torch plus the data set just built) and
    hides any smaller peak. VmHWM belongs to the new image alone. ru_maxrss where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return ru_maxrss()


def run_child(plan: dict, mode: str) -> dict:
    """Train one mode as planned and return its timings, memory and (finetune) breakdown."""
    # Import everything a mode touches before the memory baseline: the figures are then the mode's own.
    import enformer_pytorch  # noqa: F401
    import transformers.models.esm.modeling_esm  # noqa: F401

    from fusion.data import DataConfig, open_batches
    from fusion.experiment import build_model, read_manifest
    from fusion.finetune import (
        EndToEndModel,
        FinetuneConfig,
        encoder_precision,
        fit_live_feature_stats_,
        load_live_encoders,
        make_finetune_optimizer,
        open_sequence_batches,
    )
    from fusion.models.fusion_model import fit_feature_stats_
    from fusion.train import TrainConfig, resolve_device, seed_everything, train

    if plan["threads"]:
        torch.set_num_threads(plan["threads"])
    data = DataConfig.from_dict(plan["data"])
    epochs = plan["cached_epochs"] if mode == "cached" else 1
    train_config = TrainConfig.from_dict({**plan["train"], "epochs": epochs})
    device = resolve_device(train_config.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    rss_start, peak_start = rss_now(), max_rss()

    def memory_now() -> dict:
        return {"peak_rss": max_rss(), "cuda_max_allocated": torch.cuda.max_memory_allocated(device) if cuda else None}

    quiet: list[str] = []
    log = quiet.append
    setup: dict[str, float] = {}
    result: dict[str, Any] = {"mode": mode, "device": str(device), "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    manifest = read_manifest(data.manifest)
    probe = None
    if mode == "cached":
        inner = open_batches(data, manifest, log=log)
        setup["open_data"] = time.perf_counter() - t0
        batches = TimedBatches(inner, None, memory=memory_now)
        t0 = time.perf_counter()
        seed_everything(train_config.seed)
        model = build_model(batches, plan["aggregator"], plan["model_options"])
        t1 = time.perf_counter()
        fit_feature_stats_(model, batches("train", shuffle=False, epoch=0))
        setup["build_model"], setup["feature_stats"] = t1 - t0, time.perf_counter() - t1
        optimizer, extra = None, {"mode": "cached"}
        full_train_batches = inner.n_batches("train")
    else:
        inner = open_sequence_batches(data, manifest, log=log)
        setup["open_data"] = time.perf_counter() - t0
        full_train_batches = inner.n_batches("train")
        cut = plan["warmup_steps"] + plan["steps"] if plan["steps"] else None
        if cut is not None and cut >= full_train_batches:
            cut = None  # asked for at least an epoch: run the whole epoch
        batches = TimedBatches(inner, cut, keep_train_batches=True, memory=memory_now)
        t0 = time.perf_counter()
        live = load_live_encoders(batches, device=device, precision=encoder_precision(train_config, device), log=log)
        setup["load_encoders"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        seed_everything(train_config.seed)
        fusion = build_model(batches, plan["aggregator"], plan["model_options"])
        model = EndToEndModel(live, fusion, features=data.features, max_tokens=data.max_tokens).to(device)
        setup["build_model"] = time.perf_counter() - t0
        if plan["breakdown"]:
            probe = Probe(cuda)
            instrument_(model, probe)
        t0 = time.perf_counter()
        fit_live_feature_stats_(model, batches("train", shuffle=False, epoch=0))
        setup["feature_stats"] = time.perf_counter() - t0
        modes = {m: "frozen" if mode == "frozen" else "full" for m in batches.modalities}
        finetune = FinetuneConfig(
            encoder_modes=modes, encoder_lr=plan["encoder_lr"],
            gradient_checkpointing=plan["gradient_checkpointing"] and mode == "full",
        )  # fmt: skip
        model.configure_(finetune, log=log)
        optimizer = make_finetune_optimizer(model, train_config, finetune)
        extra = {"mode": "finetune", "encoder_modes": model.modes}
        result["encoders"] = {
            m: {k: d[k] for k in ("model", "architecture", "precision", "parameters", "trainable_parameters")}
            for m, d in model.describe().items()
        }
    result["fusion_parameters"] = sum(p.numel() for p in (model.fusion if mode != "cached" else model).parameters())
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["setup_seconds"] = setup

    run_dir = Path(plan["workdir"]) / "runs" / plan["tag"] / mode
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    trained = train(
        model, batches, train_config, run_dir,
        target_names=batches.target_names, fingerprints=batches.fingerprints,
        model_config=(model.fusion if mode != "cached" else model).config.to_dict(),
        extra_checkpoint_info=extra, optimizer=optimizer, progress=False, log=log,
    )  # fmt: skip
    result["train_call_seconds"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize(device)
    # The modes run different numbers of steps (cached: whole epochs), and on the CPU glibc keeps freed
    # blocks of ever-changing padded shapes, so peak RSS creeps up with every step: the comparable figure
    # is the peak over setup + the first `compare_steps` training steps, the same count in every mode.
    first = next(p for p in batches.passes if p["split"] == "train" and p["shuffle"])
    wanted = plan["warmup_steps"] + plan["steps"] if plan["steps"] else len(first["memory"])
    compare_steps = min(wanted, len(first["memory"]))
    at = first["memory"][compare_steps - 1]
    result["memory"] = {
        "method": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) increase in a fresh process",
        "compare_steps": compare_steps,
        "rss_start_bytes": rss_start,
        "peak_rss_start_bytes": peak_start,
        "peak_rss_bytes_at_compare": at["peak_rss"],
        "peak_rss_increase_bytes_at_compare": at["peak_rss"] - peak_start,
        "cuda_max_allocated_bytes_at_compare": at["cuda_max_allocated"],
        "peak_rss_bytes": max_rss(),
        "peak_rss_increase_bytes": max_rss() - peak_start,
        "ru_maxrss_bytes": ru_maxrss(),  # includes the parent's RSS at spawn (see max_rss)
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
    }
    result.update(epoch_figures(batches, trained.history, full_train_batches, plan["warmup_steps"]))
    if probe is not None:
        result["breakdown"] = step_breakdown(batches, probe, plan["warmup_steps"])
        result["encoder_calls"] = encoder_call_padding(batches, model)
    result["log_tail"] = quiet[-3:]
    return result


def epoch_figures(batches: TimedBatches, history: list[dict], full_train_batches: int, warmup: int) -> dict:
    """Per-step medians, the validation pass, the rest of the epoch, and s/epoch (measured or extrapolated)."""
    train_passes = [p for p in batches.passes if p["split"] == "train" and p["shuffle"]]
    val_passes = [p for p in batches.passes if p["split"] == "validation"]
    steps = [list(np.diff(p["stamps"])) for p in train_passes]
    timed = [s for e, per_epoch in enumerate(steps) for i, s in enumerate(per_epoch) if e > 0 or i >= warmup]
    if not timed:
        raise ValueError(f"no timed step: {sum(map(len, steps))} steps ran ({full_train_batches} train batches per epoch), "
                         f"{warmup} of them warm-up; raise --steps, or lower --warmup-steps or --batch-size")
    train_seconds = [p["stamps"][-1] - p["stamps"][0] for p in train_passes]
    val_seconds = [p["stamps"][-1] - p["stamps"][0] for p in val_passes]
    epoch_seconds = [row["seconds"] for row in history]
    rest = [e - t - v for e, t, v in zip(epoch_seconds, train_seconds, val_seconds)]
    # train()'s loop waits for the GPU every step (loss.item(), then the batch's target count, queued after
    # the backward and the optimizer step), so time blocked in the loader is time the accelerator had nothing to do
    waited = [w for e, p in enumerate(train_passes) for i, w in enumerate(p["waits"]) if e > 0 or i >= warmup]
    ran = len(steps[0])
    whole = ran == full_train_batches
    step = statistics.median(timed)
    extrapolated = step * full_train_batches + statistics.median(val_seconds) + statistics.median(rest)
    measured = statistics.median(epoch_seconds[1:] or epoch_seconds) if whole else None
    return {
        "train_batches_full": full_train_batches,
        "train_batches_run": ran,
        "epochs_run": len(history),
        "warmup_steps": warmup,
        "step_seconds": steps,  # per epoch, every step (warm-up included)
        "timed_steps": len(timed),
        "step_seconds_median": step,
        "data_wait_share": sum(waited) / sum(timed),  # of the timed steps' time: waiting for the next batch
        "step_seconds_min": min(timed),
        "step_seconds_max": max(timed),
        "validation_pass_seconds": val_seconds,
        "rest_seconds": rest,
        "epoch_seconds_history": epoch_seconds,
        "epoch_seconds_measured": measured,
        "epoch_seconds_extrapolated": extrapolated,
        "epoch_seconds": measured if measured is not None else extrapolated,
        "epoch_method": (f"measured (median of {len(history) - 1} whole epochs after the first)" if len(history) > 1
                         else "measured (one whole epoch)") if whole else f"extrapolated from {len(timed)} timed steps",
    }


def step_breakdown(batches: TimedBatches, probe: Probe, warmup: int) -> dict:
    """Mean seconds per timed training step: live features (of which each encoder's forward), the rest.

    Means, not medians: the parts must add up to the whole, and with few steps of different
    content (one or two distinct DNA windows, a protein or none) separate medians do not.
    """
    regions = probe.durations()
    train_passes = [p for p in batches.passes if p["split"] == "train" and p["shuffle"]]
    names = sorted({n for n, _, _ in regions})
    per_step: dict[str, list[float]] = {n: [] for n in names}
    per_step["step"] = []
    for e, p in enumerate(train_passes):
        stamps = p["stamps"]
        for i in range(len(stamps) - 1):
            if e == 0 and i < warmup:
                continue
            inside = [(n, d) for n, t, d in regions if stamps[i] <= t < stamps[i + 1]]
            for n in names:
                per_step[n].append(sum(d for name, d in inside if name == n))
            per_step["step"].append(stamps[i + 1] - stamps[i])
    return {n: statistics.mean(v) for n, v in per_step.items() if v}


def encoder_call_padding(batches: TimedBatches, model) -> dict:
    """Per modality, over the train batches of the finetune epoch (warm-up included): distinct sequences and encoder calls per step,
    and the share of real tokens in the padded calls (`embed_sequences` batches a step's windows as the
    build does: length-sorted, under the store's token budget)."""
    from embedcache.embed import make_batches, plan_windows

    out = {}
    for m, live in model.live.items():
        encoder = live.encoder
        fixed = getattr(encoder, "fixed_window", False)  # Enformer: every window is N-padded to the full input
        n_special = 0 if fixed else encoder.layout.n_special
        distinct, calls, real, padded = [], [], 0, 0
        for p in batches.passes:
            for features in p["batches"]:
                unique = list(dict.fromkeys(s for s in features[m].sequences if s is not None))
                distinct.append(len(unique))
                items = []
                for s in unique:
                    plan = plan_windows(encoder, len(encoder.tokenize(s)), live.build)
                    items += [(encoder.cost(e - b), e - b, e - b + n_special) for b, e in plan.windows]  # payload: real positions
                step_calls = make_batches(items, live.build.max_tokens, encoder.equal_length_batches)
                calls.append(len(step_calls))
                real += sum(sum(call) for call in step_calls)
                padded += sum(len(call) * (encoder.window if fixed else max(call)) for call in step_calls)
        out[m] = {
            "distinct_sequences_per_step": statistics.mean(distinct) if distinct else 0.0,
            "calls_per_step": statistics.mean(calls) if calls else 0.0,
            "real_token_share": real / padded if padded else None,
            "unit": "bp" if fixed else "tokens",
        }
    return out


# -- the parent: setup, children, report ----------------------------------------------------------------


def run_mode_process(mode: str, plan_path: Path, work: Path, tag: str, threads: int | None, verbose: bool) -> dict:
    """This script with --child MODE in a fresh interpreter; its result JSON, or the failure and log tail."""
    result_path = work / f"result_{tag}_{mode}.json"
    log_path = work / f"child_{tag}_{mode}.log"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--plan", str(plan_path), "--result", str(result_path)]
    t0 = time.perf_counter()
    with open(log_path, "w") as logfile:
        proc = subprocess.run(cmd, stdout=None if verbose else logfile, stderr=subprocess.STDOUT if not verbose else None, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text().splitlines()[-15:] if log_path.exists() else []
        result = {"mode": mode, "error": f"child exited with status {proc.returncode} and wrote no result", "log_tail": tail}
    result["process_seconds"] = wall
    return result


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_cell(r: dict) -> str:
    """The comparable figure: peak over setup + the same number of training steps in every mode."""
    mem = r["memory"]
    if mem["cuda_max_allocated_bytes"] is not None:
        return f"{fmt_bytes(mem['cuda_max_allocated_bytes_at_compare'])} GPU allocated"
    return f"+{fmt_bytes(mem['peak_rss_increase_bytes_at_compare'])} (peak RSS {fmt_bytes(mem['peak_rss_bytes_at_compare'])})"


def memory_whole_run(r: dict) -> str:
    mem = r["memory"]
    if mem["cuda_max_allocated_bytes"] is not None:
        return (f"whole run {fmt_bytes(mem['cuda_max_allocated_bytes'])} GPU allocated, "
                f"{fmt_bytes(mem['cuda_max_reserved_bytes'])} reserved, peak RSS {fmt_bytes(mem['peak_rss_bytes'])}")
    return f"whole run peak RSS +{fmt_bytes(mem['peak_rss_increase_bytes'])} ({fmt_bytes(mem['peak_rss_bytes'])})"


def print_setup(report: dict) -> None:
    """Machine and data: shared by every configuration of a run."""
    m, d, cfg = report["machine"], report["data"], report["config"]
    print("\n== machine")
    print(f"  {m['platform']}")
    print(f"  CPU: {m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable); "
          f"load average {m['load_average_at_start']:.2f} at start, {report['load_average_at_end']:.2f} at end")
    print(f"  python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; torch threads per mode: {cfg['threads_effective']}")
    if m["gpu"]:
        g = m["gpu"]
        peak = f"{g['bf16_dense_peak_tflops']:g} TFLOP/s dense bf16 (data sheet)" if g["bf16_dense_peak_tflops"] else "bf16 peak unknown"
        print(f"  GPU: {g['name']}, {g['memory_gib']} GiB, CUDA {g['cuda']}, {peak}")
    else:
        print("  GPU: none (CPU run, full precision)")

    print(f"\n== data (--size {cfg['size']}): synthetic IsoFormer-schema set, {cfg['n_genes']} genes, seed {cfg['seed']}"
          + (f"; made in {report['setup_seconds']:.0f} s" if report["setup_seconds"] else ""))
    s = d["samples"]
    print(f"  samples: train {s['train']}, validation {s['validation']}, test {s['test']}; batch {d['batch_size']} -> "
          f"{d['train_batches']} train + {d['validation_batches']} validation batches per epoch")
    for mod, x in d["modalities"].items():
        unit = x["token_unit"]
        print(f"  {mod:8s} {x['encoder']:23s} {x['records']:5d} records | encoder input {x['input_tokens_mean']:,.0f} {unit} mean "
              f"(max {x['input_tokens_max']:,}; window {x['encoder_window']:,}) | stored {x['rows_per_record_mean']:.0f} rows mean "
              f"(max {x['rows_per_record_max']}) x {x['embed_dim']} | in {x['train_samples_with_it']} train samples")
    for note in cfg["notes"]:
        print(f"  note: {note}")


def print_configuration(report: dict, run: dict) -> None:
    """Config, per-mode results, finetune step breakdown and verdict of one fusion-input configuration."""
    m, d = report["machine"], report["data"]
    cfg = {**report["config"], **run["config"]}
    results = run["results"]
    print(f"\n== configuration: {run['label']}")
    rows = cfg["data"]["max_tokens"]
    print(f"  fusion model: {cfg['aggregator']} {cfg['model_options']}; features {cfg['data']['features']}, "
          + (f"group-averaged to <= {rows} rows per modality (max_tokens)" if rows else "every per-token row (max_tokens None)"))
    t = cfg["train"]
    print(f"  TrainConfig: batch {t['batch_size']}, lr {t['lr']}, amp {t['amp']}, device {t['device']}, seed {t['seed']} "
          f"(same in every mode; epochs: cached {cfg['cached_epochs']}, finetune 1)")
    print(f"  finetune: encoder_lr {cfg['encoder_lr']}, gradient checkpointing {'on (full)' if cfg['gradient_checkpointing'] else 'off'}")
    if cfg["steps"]:
        print(f"  timing: frozen / full run {cfg['warmup_steps']} warm-up + {cfg['steps']} timed training steps, then the whole "
              f"validation split; s/epoch = {d['train_batches']} train batches x median s/step + validation pass + rest "
              f"(EXTRAPOLATED, marked *). cached: {cfg['cached_epochs']} whole epochs, median after the first (measured).")
    else:
        print(f"  timing: every mode runs whole epochs (cached {cfg['cached_epochs']}, finetune 1); s/epoch measured.")
    compare = next((r["memory"]["compare_steps"] for r in results.values() if "memory" in r), None)
    print("  memory: each mode in a fresh process; " + (
        "torch.cuda.max_memory_allocated (reset after the imports)" if m["gpu"] else
        "increase of the peak resident set (VmHWM; ru_maxrss would include the parent's RSS, which Linux carries across "
        "exec) over its value after the imports (tracemalloc cannot see torch)")
        + f"; the table's figure is the peak over setup + the first {compare} training steps of every mode "
        "(whole-run peaks below: on the CPU glibc keeps freed blocks, so peak RSS creeps up with the number of steps run)")

    print("\n== results (per training epoch of the train split; validation pass and checkpoint included)")
    header = (f"  {'mode':7s} | {'s/epoch':>9s} | {'s/step':>8s} | {'data wait':>9s} | {'train samples/s':>15s} | {'peak memory':32s} | "
              f"{'vs cached':>9s}")  # fmt: skip
    print(header)
    print("  " + "-" * (len(header) - 2))
    cached = results.get("cached", {})
    base = cached.get("epoch_seconds")
    for mode in cfg["modes"]:
        r = results[mode]
        if "error" in r:
            print(f"  {mode:7s} | failed: {r['error']}")
            for line in r.get("log_tail", [])[-6:]:
                print(f"          {line}")
            continue
        mark = "" if r["epoch_seconds_measured"] is not None else "*"
        samples_per_s = d["samples"]["train"] / (r["step_seconds_median"] * r["train_batches_full"])
        ratio = f"{r['epoch_seconds'] / base:.1f}x" if base else "-"
        print(f"  {mode:7s} | {r['epoch_seconds']:8.2f}{mark:1s} | {r['step_seconds_median']:8.3f} | {r['data_wait_share']:9.0%} | {samples_per_s:15.1f} | "
              f"{memory_cell(r):32s} | {ratio:>9s}")
    print("  s/step: median over timed steps; data wait: the timed steps' share of time spent waiting for the next batch; "
          "train samples/s = train samples / (train batches x s/step).")
    for mode in cfg["modes"]:
        r = results[mode]
        if "error" in r:
            continue
        val, rest = statistics.median(r["validation_pass_seconds"]), statistics.median(r["rest_seconds"])
        setup = ", ".join(f"{k} {v:.1f} s" for k, v in r["setup_seconds"].items())
        line = (f"  {mode}: {r['timed_steps']} timed steps (min {r['step_seconds_min']:.3f}, max {r['step_seconds_max']:.3f} s); "
                f"validation pass {val:.2f} s; rest {rest:.2f} s; {r['epoch_method']}")
        if r["epoch_seconds_measured"] is not None:
            line += f" (extrapolation would give {r['epoch_seconds_extrapolated']:.2f} s)"
        print(line)
        print(f"      once per run: {setup}; trainable parameters {r['trainable_parameters']:,}; {memory_whole_run(r)}; "
              f"child process {r['process_seconds']:.0f} s")

    finetune = [mode for mode in ("frozen", "full") if mode in results and "breakdown" in results[mode]]
    if finetune:
        print("\n== where a finetune training step goes (mean seconds per timed step)")
        for mode in finetune:
            b, r = results[mode]["breakdown"], results[mode]
            encoders = {k.split(":", 1)[1]: v for k, v in b.items() if k.startswith("encoder:")}
            features = b.get("features", 0.0)
            enc = ", ".join(f"{k} {v:.3f}" for k, v in encoders.items())
            print(f"  {mode}: step {b['step']:.3f} = live features {features:.3f} ({features / b['step']:.0%}; encoder forwards: {enc}; "
                  f"tokenise / stitch / pad {features - sum(encoders.values()):.3f}) + the rest {b['step'] - features:.3f} "
                  f"(fusion forward, backward{' through the encoders' if mode == 'full' else ''}, optimiser, data)")
        calls = results[finetune[0]].get("encoder_calls", {})
        if calls:
            shares = "; ".join(
                f"{k} {v['distinct_sequences_per_step']:.1f} distinct sequences in {v['calls_per_step']:.1f} calls, "
                f"{v['real_token_share']:.0%} real {v['unit']}"
                for k, v in calls.items() if v["real_token_share"] is not None
            )
            print(f"  per step, each encoder's length-sorted calls under the store's token budget: {shares}")

    v = run["verdict"]
    print(f"\n== verdict ({run['label']})")
    if v["ratio"] is None:
        print(f"  no ratio: {v['why']}")
    else:
        print(f"  cached-mode epoch {v['cached_s']:.2f} s vs frozen-finetune epoch {v['frozen_s']:.2f} s{'' if v['frozen_measured'] else ' (extrapolated)'}: "
              f"cached is {v['ratio']:.1f}x faster -> {'PASS' if v['pass'] else 'FAIL'} (criterion: >= {CRITERION:g}x)")
        if "full_ratio" in v:
            print(f"  full finetune epoch: {v['full_ratio']:.1f}x the cached epoch")


def print_summary(report: dict) -> None:
    """One line per configuration: the figures the criterion is about."""
    print(f"\n== summary: frozen-finetune epoch / cached epoch (criterion >= {CRITERION:g}x), torch threads "
          f"{report['config']['threads_effective']}")
    for run in report["runs"]:
        v = run["verdict"]
        if v["ratio"] is None:
            print(f"  {run['label']:32s} no ratio ({v['why']})")
            continue
        full = f"; full / cached {v['full_ratio']:.1f}x" if "full_ratio" in v else ""
        print(f"  {run['label']:32s} cached {v['cached_s']:7.2f} s, frozen {v['frozen_s']:8.2f} s{'' if v['frozen_measured'] else '*'}"
              f" -> {v['ratio']:6.1f}x {'PASS' if v['pass'] else 'FAIL'}{full}")


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Seconds per training epoch and peak memory of fusion on cached stores vs frozen and full finetuning.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--size", choices=list(SIZES), default="tiny",
                   help="tiny: the demo's data and tiny encoders (CPU, minutes); isoformer: the released encoders' shapes "
                   "(made for a GPU; on a CPU only cached and frozen run by default, at minutes per step)")
    p.add_argument("--n-genes", type=int, default=None, help="synthetic genes, ~3 samples each (default: 400 tiny, 24 isoformer)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: 32 tiny, 2 isoformer)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="modes to run, in this order (default: all three; isoformer on a CPU: cached frozen)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed training steps of frozen / full (their s/epoch is extrapolated); 0 = a whole epoch")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps before the timed ones (every mode)")
    p.add_argument("--cached-epochs", type=int, default=3, help="whole epochs of the cached mode (the first is not counted)")
    p.add_argument("--aggregator", default="cross-attention", help="fusion aggregator (fusion.models.AGGREGATORS)")
    p.add_argument("--features", choices=("tokens", "pooled"), default=None,
                   help="run only this fusion input: per-token rows or pooled vectors (default: the size's configurations: "
                   "tiny runs both of the demo's, its per-token headline run with max_tokens 32 and its pooled ablation "
                   "grid; isoformer runs every per-token row)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="with --features tokens (implied): DataConfig.max_tokens, per-token inputs group-averaged to at "
                   "most this many rows (default: all rows)")
    p.add_argument("--d-model", type=int, default=None, help="fusion width (default: 64 tiny, 256 isoformer)")
    p.add_argument("--n-heads", type=int, default=None, help="fusion attention heads (default: 4 tiny, 8 isoformer)")
    p.add_argument("--head-hidden", type=int, default=None, help="fusion MLP head width (default: 128 tiny, 512 isoformer)")
    p.add_argument("--encoder-lr", type=float, default=1e-5, help="peak learning rate of the encoders in full mode")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the trained encoders' activations (full mode)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per mode (default: 1 on CPU for stable figures on a shared machine; torch's own on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data, the encoders' weights and training")
    p.add_argument("--no-breakdown", action="store_true", help="do not time the live-feature path inside finetune steps")
    p.add_argument("--workdir", default=None, help="keep data, stores, runs and logs here and reuse them (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="write machine, data, config and every figure to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show the child processes' output instead of logging it to files")
    p.add_argument("--child", choices=MODES, default=None, help="internal: run one mode in this process (used by the parent)")
    p.add_argument("--plan", default=None, help="internal: the plan JSON a --child reads")
    p.add_argument("--result", default=None, help="internal: where a --child writes its result JSON")
    return p


def child_main(args: argparse.Namespace) -> int:
    plan = json.loads(Path(args.plan).read_text())
    try:
        result = run_child(plan, args.child)
    except Exception as e:  # reported in the parent's table, not fatal to the other modes
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        result = {
            "mode": args.child,
            "error": ("CUDA out of memory (try a smaller --batch-size or --gradient-checkpointing): " if oom else "")
            + f"{type(e).__name__}: {str(e)[:300]}",
            "log_tail": traceback.format_exc().splitlines()[-12:],
        }
    Path(args.result).write_text(json.dumps(result, indent=1, default=float))
    return 0 if "error" not in result else 1


def fusion_inputs(args: argparse.Namespace, size: Size) -> list[dict]:
    """The configurations to run: the one --features / --max-tokens ask for, else the size's defaults."""
    if args.features is None and args.max_tokens is None:
        return [dict(c) for c in size.configurations]
    features = args.features or "tokens"
    if features == "pooled" and args.max_tokens is not None:
        raise SystemExit(f"--max-tokens {args.max_tokens} applies to --features tokens only")
    label = "pooled vectors" if features == "pooled" else f"per-token, max_tokens {args.max_tokens}"
    return [{"label": label, "features": features, "max_tokens": args.max_tokens}]


def run_configuration(base_plan: dict, work: Path, configuration: dict, tag: str, modes: list[str], verbose: bool) -> dict:
    """Every mode of one fusion-input configuration, each in a fresh process; its results and verdict."""
    plan = {**base_plan, "tag": tag, "data": {**base_plan["data"], "features": configuration["features"],
                                              "max_tokens": configuration["max_tokens"]}}  # fmt: skip
    plan_path = work / f"plan_{tag}.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    print(f"== {configuration['label']}: features {configuration['features']}, max_tokens {configuration['max_tokens']}")
    results = {}
    for mode in modes:
        print(f"   {mode}: running in a fresh process ...", flush=True)
        results[mode] = r = run_mode_process(mode, plan_path, work, tag, plan["threads"], verbose)
        if "error" in r:
            print(f"   {mode} failed: {r['error']}")
        else:
            print(f"   {mode}: {r['epoch_seconds']:.2f} s/epoch ({r['epoch_method']}), {r['process_seconds']:.0f} s in all")

    verdict: dict[str, Any] = {"criterion": CRITERION, "ratio": None}
    ok = lambda m: m in results and "error" not in results[m]  # noqa: E731
    if ok("cached") and ok("frozen"):
        c, f = results["cached"], results["frozen"]
        ratio = f["epoch_seconds"] / c["epoch_seconds"]
        verdict.update(ratio=ratio, cached_s=c["epoch_seconds"], frozen_s=f["epoch_seconds"],
                       frozen_measured=f["epoch_seconds_measured"] is not None, **{"pass": ratio >= CRITERION})
        if ok("full"):
            verdict["full_ratio"] = results["full"]["epoch_seconds"] / c["epoch_seconds"]
    else:
        verdict["why"] = "the cached and frozen modes must both run and succeed"
    return {"label": configuration["label"], "config": {"data": plan["data"]}, "results": results, "verdict": verdict}


def run(args: argparse.Namespace) -> dict:
    size = SIZES[args.size]
    cuda = torch.cuda.is_available()
    modes = args.modes or list(MODES if cuda else size.cpu_modes)
    if args.size == "isoformer" and not cuda:
        print(f"note: no CUDA GPU: --size isoformer runs on the CPU in full precision (modes {modes}); expect minutes per step")
    if args.steps < 0 or args.warmup_steps < 0 or args.cached_epochs < 1:
        raise SystemExit(f"--steps ({args.steps}) and --warmup-steps ({args.warmup_steps}) must be >= 0, --cached-epochs ({args.cached_epochs}) >= 1")
    configurations = fusion_inputs(args, size)
    threads = args.threads if args.threads is not None else (None if cuda else 1)
    n_genes = args.n_genes or size.n_genes
    batch_size = args.batch_size or size.batch_size
    machine = machine_info()

    temp = None
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="bench_fusion_")
        work = Path(temp.name)
    try:
        print(f"== setup in {work}")
        prepared, stores, setup_seconds = make_data(work, size, n_genes, args.seed, print)
        from fusion.data import DataConfig
        from fusion.train import TrainConfig

        data = DataConfig(manifest=str(prepared), stores=stores, batch_size=batch_size, seed=args.seed)
        train_config = TrainConfig(batch_size=batch_size, seed=args.seed)  # amp auto: bf16 on CUDA, off on CPU
        model_options = {
            "d_model": args.d_model or size.d_model,
            "n_heads": args.n_heads or size.n_heads,
            "head_hidden": args.head_hidden or size.head_hidden,
        }
        base_plan = {
            "workdir": str(work),
            "data": data.to_dict(),
            "train": train_config.to_dict(),
            "aggregator": args.aggregator,
            "model_options": model_options,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "cached_epochs": args.cached_epochs,
            "encoder_lr": args.encoder_lr,
            "gradient_checkpointing": args.gradient_checkpointing,
            "threads": threads,
            "breakdown": not args.no_breakdown,
        }
        summary = data_summary(prepared, stores, batch_size)
        runs = [run_configuration(base_plan, work, c, f"config{i}", modes, args.verbose) for i, c in enumerate(configurations)]
        report = {
            "format": "bench-fusion",
            "machine": machine,
            "load_average_at_end": load_average(),
            "setup_seconds": setup_seconds,
            "data": summary,
            "config": {
                "size": args.size, "n_genes": n_genes, "seed": args.seed, "modes": modes, "aggregator": args.aggregator,
                "model_options": model_options, "train": train_config.to_dict(), "steps": args.steps,
                "warmup_steps": args.warmup_steps, "cached_epochs": args.cached_epochs, "encoder_lr": args.encoder_lr,
                "gradient_checkpointing": args.gradient_checkpointing, "threads": threads,
                "threads_effective": threads or torch.get_num_threads(),
                "notes": list(ISOFORMER_NOTES if args.size == "isoformer" else TINY_NOTES),
            },  # fmt: skip
            "runs": runs,
        }
        print_setup(report)
        for r in runs:
            print_configuration(report, r)
        print_summary(report)
        write_json(args.json, report)
        return report
    finally:
        if temp is not None:
            temp.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    if args.child:
        if not (args.plan and args.result):
            raise SystemExit("--child needs --plan and --result (it is started by the parent run, not by hand)")
        return child_main(args)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
