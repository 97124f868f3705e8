"""Fusion input pipeline: samples/s from stores in RAM vs streamed from disk, beside the model's step rate.

One run builds a small but realistically wide data set, then measures, on the train split:

    data only   one epoch of `StoreBatches("train", shuffle=True)` with no model (every batch is
                materialised and dropped), per loading mode (memory, stream) for per-token
                features, and pooled features as a reference. "cold" is the first epoch after
                opening with the stores' files evicted from the OS page cache beforehand (see
                --cold; whether the eviction worked is checked with mincore and printed), "warm"
                the second epoch. `open_batches` is timed too: for memory it is the load-to-RAM cost.
    model only  forward + masked MSE + backward + clip + AdamW step of the fusion model on batches
                materialised in RAM beforehand (no data cost), per aggregator, at torch's thread
                count and at one thread (on a busy small machine OpenMP teams stall).
    end to end  `fusion.train.train(..., TrainConfig(epochs=1))` on a --e2e-samples subset, fed by
                loading=memory, loading=stream, and by the same batches materialised beforehand
                ("replay": the model-only epoch through the very same loop, validation pass and
                checkpoint write included); data share = 1 - e2e / replay.
    breakdown   where a warm batch's time goes inside fusion/data.py (per-modality gather, `_pad`,
                the manifest/pandas part of `_batch`), and drop-in alternatives timed on the same
                batches with their results checked equal, so the figures point at what to change.

Setup (or reused from --workdir): synthetic IsoFormer-schema data -> the IsoFormer adapter -> DNA /
RNA / protein stores built by embedcache with tiny random models (the recipe of
fusion.demo.make_demo_encoders and build_modality_stores), except that the tiny ESM2 / NT are --hidden wide (default 256:
512 B per fp16 token row) so the per-token data is sized like real inputs. The encoders do not
matter here; only the bytes and the collation do.

    .venv/bin/python benchmarks/bench_fusion_data.py [--n-genes N] [--hidden D] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tiny models are made locally; never reach for the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import ctypes
import json
import mmap
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from benchlib import machine_info, reuse_or_clear, write_json
from cli.common import HelpFormatter
from fusion.demo import MODALITY_ENCODERS

SETUP_FILE = "bench_setup.json"
COLD_MODES = ("drop-caches", "fadvise", "none")


# -- setup ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What the data set was made from; a --workdir holding the same is reused, anything else rebuilt."""

    n_genes: int  # synthetic genes (~3.1 transcripts each)
    hidden: int  # width of the tiny ESM2 / NT encoders = per-token row width of the RNA and protein stores
    seed: int  # synthetic data and model seed
    encoder_layers: int = 1  # layers of the tiny ESM2 / NT: only their output width matters here


def make_data(work: Path, setup: Setup, log: Callable[[str], None]) -> tuple[Path, dict[str, str], float]:
    """(prepared dir, modality -> store path, seconds): synthetic data, prepared, embedded with tiny models."""
    from fusion.demo import build_modality_stores, make_demo_encoders
    from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
    from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic

    prepared = work / "prepared"
    stores = {m: str(work / "stores" / f"{m}.zarr") for m in MODALITY_ENCODERS}
    if reuse_or_clear(work, SETUP_FILE, asdict(setup), made=("synthetic", "prepared", "models", "stores")):
        log(f"  reusing the data set in {work} ({SETUP_FILE} matches)")
        return prepared, stores, 0.0

    started = time.perf_counter()
    info = generate_synthetic(work / "synthetic", SyntheticConfig(n_genes=setup.n_genes, seed=setup.seed))
    done = prepare_isoformer(info.csv_path, info.genome_path, prepared, IsoformerPrepareConfig(dna_window=info.dna_window))
    log(f"  synthetic {setup.n_genes} genes -> prepared {done.counts}")
    model_dirs = make_demo_encoders(
        work / "models", hidden=setup.hidden, layers=setup.encoder_layers, dna_window=info.dna_window, seed=setup.seed
    )
    t0 = time.perf_counter()
    build_modality_stores(prepared, model_dirs, work / "stores", info.dna_window, progress=False, log=lambda s: None)
    log(f"  built the stores in {time.perf_counter() - t0:.1f} s")
    (work / SETUP_FILE).write_text(json.dumps(asdict(setup)))  # last: its presence marks a whole data set
    return prepared, stores, time.perf_counter() - started


def store_sizes(stores: dict[str, str], manifest) -> dict[str, dict]:
    """Per modality: width, dtype, records, per-token bytes (as fusion.data counts them, and as loaded to RAM)."""
    from embedcache import open_store
    from fusion.data import check_keys, token_bytes

    out = {}
    for m, path in stores.items():
        store = open_store(path)
        keys = check_keys(manifest, m, store)
        itemsize = np.dtype(store.attrs["stored_dtype"]["tokens"]).itemsize
        train_keys = list(dict.fromkeys(manifest.split("train").keys(m)))
        out[m] = {
            "embed_dim": store.embed_dim,
            "token_dtype": store.attrs["stored_dtype"]["tokens"],
            "row_bytes": store.embed_dim * itemsize,
            "records": len(keys),
            "tokens_per_record_mean": token_bytes(store, keys) / len(keys) / (store.embed_dim * itemsize),
            "per_token_bytes_manifest": token_bytes(store, keys),  # every manifest record, duplicates counted
            "per_token_bytes_train": token_bytes(store, train_keys),  # what one train epoch reads
            "flat_tokens_bytes": store.committed.tokens * store.embed_dim * itemsize,  # what loading=memory reads
            # rows no content uses: each commit group starts on a shard boundary, the gap before it is fill
            "unused_flat_bytes": (store.committed.tokens - int(store._length.sum())) * store.embed_dim * itemsize,
            "size_on_disk": store.size_on_disk(),
        }
    return out


# -- the OS page cache ------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _files(roots: Iterable[str | Path]) -> list[Path]:
    return [p for r in roots for p in Path(r).rglob("*") if p.is_file()]


def resident_fraction(roots: Iterable[str | Path]) -> float | None:
    """Share of the files' bytes held in the OS page cache (mincore on a shared read-only mapping)."""
    total = resident = 0
    for path in _files(roots):
        size = path.stat().st_size
        if size == 0:
            continue
        pages = -(-size // _PAGE)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if _libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(v & 1 for v in vec) * _PAGE
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages * _PAGE
    return resident / total if total else None


def evict(roots: Iterable[str | Path], how: str) -> dict:
    """Try to push the files out of the page cache; report what was tried and what stayed resident."""
    before = resident_fraction(roots)
    error = None
    if how == "drop-caches":
        # Whole machine; needs root and a writable /proc/sys (not in every container).
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    elif how == "fadvise":
        # Only these files; needs no privilege. Dirty pages cannot be dropped, so flush them first.
        for path in _files(roots):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
            finally:
                os.close(fd)
    after = resident_fraction(roots)
    return {"how": how, "resident_before": before, "resident_after": after, "error": error,
            "worked": how != "none" and error is None and after is not None and after < 0.05}  # fmt: skip


# -- data-only epochs -------------------------------------------------------------------------------


def epoch_seconds(batches, epoch: int) -> tuple[float, int]:
    """(seconds, samples) of iterating one shuffled train epoch, materialising every batch."""
    t0 = time.perf_counter()
    n = 0
    for batch in batches("train", shuffle=True, epoch=epoch):
        n += len(batch)
    return time.perf_counter() - t0, n


def data_pass(prepared: Path, stores: dict[str, str], features: str, loading: str, args, cold: str) -> dict:
    """open_batches + a cold-ish first epoch + a warm second epoch, on a fresh StoreBatches."""
    from fusion.data import DataConfig, open_batches
    from fusion.experiment import read_manifest

    eviction = evict(stores.values(), cold)
    config = DataConfig(
        manifest=str(prepared), stores=stores, features=features, batch_size=args.batch_size,
        loading=loading, prefetch=args.prefetch, seed=args.seed,
    )  # fmt: skip
    manifest = read_manifest(prepared)
    t0 = time.perf_counter()
    batches = open_batches(config, manifest, log=lambda s: None)
    open_s = time.perf_counter() - t0
    cold_s, n = epoch_seconds(batches, epoch=0)
    warm_s, n_warm = epoch_seconds(batches, epoch=1)
    assert n == n_warm
    return {"open_s": open_s, "cold_s": cold_s, "warm_s": warm_s, "samples": n, "eviction": eviction,
            "resident_after_epoch": resident_fraction(stores.values()) if cold != "none" else None}  # fmt: skip


# -- model only, end to end -------------------------------------------------------------------------


def model_options(args) -> dict:
    return {"d_model": args.d_model, "n_heads": args.n_heads, "head_hidden": 2 * args.d_model}


def model_step_rate(batches, train_list: list, aggregator: str, args, threads: int) -> dict:
    """Samples/s of the training step alone (forward, masked MSE, backward, clip, AdamW) on batches already in RAM.

    Every step is timed on its own; the rate is samples / seconds summed over the timed steps.
    """
    from fusion.experiment import build_model
    from fusion.train import TrainConfig, make_optimizer, masked_mse, seed_everything

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(args.seed)
        model = build_model(batches, aggregator, model_options(args))
        config = TrainConfig()
        optimizer = make_optimizer(model, config)
        model.train()

        def step(batch) -> None:  # the body of fusion.train.train's loop, minus logging
            pred = model(batch.features)  # (b, t)
            loss = masked_mse(pred.float(), batch.targets.float(), batch.target_mask)
            loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()

        for batch in train_list[: args.warmup_steps]:  # allocator, first-call costs
            step(batch)
        timed = train_list[args.warmup_steps : args.warmup_steps + args.model_batches] or train_list
        step_s = []
        for batch in timed:
            t0 = time.perf_counter()
            step(batch)
            step_s.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    n_steps = sum(len(b) for b in timed)
    return {
        "aggregator": aggregator, "torch_threads": threads,
        "params": sum(p.numel() for p in model.parameters()),
        "step_seconds": step_s, "step_samples": n_steps,
        "step_samples_per_s": n_steps / sum(step_s),
    }  # fmt: skip


def subset_batches(batches, n_train: int, n_val: int, seed: int):
    """The same loaded features over a random n_train train / n_val validation samples (0 = all of that split)."""
    manifest = batches.manifest
    frame = manifest.frame
    rng = np.random.default_rng(seed)
    keep = np.ones(len(frame), bool)
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = np.flatnonzero(frame[manifest.split_column].to_numpy() == split)
        if 0 < n < len(rows):
            keep[rng.choice(rows, size=len(rows) - n, replace=False)] = False
    return replace(batches, manifest=replace(manifest, frame=frame.loc[keep].reset_index(drop=True)))


class ReplayBatches:
    """A BatchSource that hands out batches materialised beforehand: train() with no data cost at all."""

    def __init__(self, source, splits: tuple[str, ...] = ("train", "validation")):
        # train() asks for (train, shuffle=True, epoch=0), then (validation, shuffle=False, epoch=0).
        self.lists = {s: list(source(s, shuffle=(s == "train"), epoch=0)) for s in splits}

    def __call__(self, split: str, *, shuffle: bool, epoch: int):
        return iter(self.lists[split])

    def n_batches(self, split: str) -> int:
        return len(self.lists[split])


E2E_SOURCES = ("replay", "memory", "stream")  # replay: batches pre-materialised in RAM (the model-only reference)


def e2e_rate(prepared: Path, stores: dict[str, str], source: str, aggregator: str, work: Path, args) -> dict:
    """One real `fusion.train.train` epoch fed by `source`: samples/s of its epoch seconds."""
    from fusion.data import DataConfig, open_batches
    from fusion.experiment import build_model, read_manifest
    from fusion.train import TrainConfig, seed_everything, train

    config = DataConfig(
        manifest=str(prepared), stores=stores, features="tokens", batch_size=args.batch_size,
        loading="memory" if source == "replay" else source, prefetch=args.prefetch, seed=args.seed,
    )  # fmt: skip
    batches = open_batches(config, read_manifest(prepared), log=lambda s: None)
    batches = subset_batches(batches, args.e2e_samples, -(-args.e2e_samples // 4), args.seed)
    n_train, n_val = len(batches.split_manifest("train")), len(batches.split_manifest("validation"))
    seed_everything(args.seed)
    model = build_model(batches, aggregator, model_options(args))
    feed = ReplayBatches(batches) if source == "replay" else batches
    run_dir = work / "runs" / f"{aggregator}-{source}"
    t0 = time.perf_counter()
    result = train(
        model, feed, TrainConfig(epochs=1, batch_size=args.batch_size, seed=args.seed), run_dir,
        target_names=batches.target_names, progress=False, log=lambda s: None,
    )  # fmt: skip
    call_s = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)
    epoch_s = result.history[0]["seconds"]
    return {"train_samples": n_train, "val_samples": n_val, "epoch_seconds": epoch_s,
            "train_call_seconds": call_s, "samples_per_s": n_train / epoch_s}  # fmt: skip


# -- where a batch's time goes ----------------------------------------------------------------------


class _Timer:
    """Wraps a callable and sums its wall time (works from the prefetch thread too)."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def breakdown(prepared: Path, stores: dict[str, str], loading: str, args) -> dict:
    """A warm epoch with timers around StoreBatches._batch, each modality's gather and fusion.data._pad.

    The timers are set on this one object (and on the module global `_pad` for the duration): fusion/
    is not edited.
    """
    import fusion.data as fd
    from fusion.experiment import read_manifest

    config = fd.DataConfig(
        manifest=str(prepared), stores=stores, features="tokens", batch_size=args.batch_size,
        loading=loading, prefetch=args.prefetch, seed=args.seed,
    )  # fmt: skip
    # The data-only passes before this left the page cache warm and paid the first-call costs.
    batches = fd.open_batches(config, read_manifest(prepared), log=lambda s: None)
    whole = _Timer(batches._batch)
    batches._batch = whole  # instance attribute shadows the method for this object only
    gathers = {}
    for m, feats in batches.features.items():
        gathers[m] = _Timer(feats.gather)
        feats.gather = gathers[m]
    pad = _Timer(fd._pad)
    fd._pad = pad  # module global looked up at call time by gather
    try:
        wall, _ = epoch_seconds(batches, epoch=1)
    finally:
        fd._pad = pad.fn
    n = whole.calls
    gather_ms = {m: 1e3 * t.seconds / n for m, t in gathers.items()}
    out = {
        "loading": loading,
        "batches": n,
        "wall_ms_per_batch": 1e3 * wall / n,
        "batch_ms": 1e3 * whole.seconds / n,
        "gather_ms": gather_ms,
        "pad_ms": 1e3 * pad.seconds / n,  # inside the gathers
        "manifest_pandas_ms": 1e3 * whole.seconds / n - sum(gather_ms.values()),
    }
    return out


def vectorised_gather(
    flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype | None = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, L, d) + (b, L) mask with one index_select of the flat rows: a handful of torch calls per modality
    and batch instead of ~3 per sample (an alternative to InMemoryTokens.gather/_pad). dtype None keeps
    the stored dtype (fp16), to be cast after the host-to-device copy (ModalityBatch.to takes a dtype)."""
    width = max(int(lengths.max()), 1)
    pos = torch.arange(width)  # (L,)
    mask = pos[None, :] < lengths[:, None]  # (b, L)
    idx = torch.where(mask, offsets[:, None] + pos[None, :], 0)  # (b, L); padding points at row 0
    x = flat.index_select(0, idx.reshape(-1)).reshape(len(lengths), width, -1)  # (b, L, d)
    x = x if dtype is None else x.to(dtype)
    x.masked_fill_(~mask[..., None], 0.0)
    return x, mask


def copy_gather(flat: torch.Tensor, offsets: list[int], lengths: list[int]) -> torch.Tensor:
    """(b, L, d) float32: _pad's loop, but each sample's fp16 rows converted once, straight into the batch
    (no per-sample .float() copy and no group_mean call when max_tokens is None)."""
    x = torch.zeros(len(lengths), max(max(lengths), 1), flat.shape[1])  # (b, L, d)
    for i, (o, n) in enumerate(zip(offsets, lengths)):
        if n:
            x[i, :n].copy_(flat[o : o + n])
    return x


def numpy_gather(flat: np.ndarray, offsets: list[int], lengths: list[int]) -> torch.Tensor:
    """copy_gather in numpy: the fp16 -> fp32 conversion happens in the assignment, and no torch
    (OpenMP) call is made per sample; torch.from_numpy shares the memory."""
    x = np.zeros((len(lengths), max(max(lengths), 1), flat.shape[1]), np.float32)  # (b, L, d)
    for i, (o, n) in enumerate(zip(offsets, lengths)):
        if n:
            x[i, :n] = flat[o : o + n]
    return torch.from_numpy(x)


def _times_ms(fn: Callable[[], object], repeats: int, per: int) -> tuple[float, float]:
    """(best, median) over `repeats` of fn()'s wall time, in ms per item (fn covers `per` items)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times) / per, 1e3 * statistics.median(times) / per


def alternatives(prepared: Path, stores: dict[str, str], args, repeats: int = 3) -> dict:
    """Per batch ms of pieces of fusion/data.py against drop-in alternatives, same keys, results checked equal.

    - InMemoryTokens.gather (per-sample slice + .float(), then _pad) vs copy_gather, numpy_gather and
      vectorised_gather (fp32, and fp16 kept), each at torch's thread count and at one thread: every small torch call
      enters an OpenMP parallel region, which stalls when another process holds a core;
    - the manifest part of StoreBatches._batch (pandas per batch) vs arrays made once per epoch;
    - StreamedTokens' per-record EmbeddingStore.tokens(key) (which looks the array up in the Zarr
      group on every call) vs the same slice of an array handle opened once (warm page cache).
    """
    import fusion.data as fd
    from embedcache import open_store
    from fusion.experiment import read_manifest

    config = fd.DataConfig(
        manifest=str(prepared), stores=stores, features="tokens", batch_size=args.batch_size, loading="memory"
    )
    manifest = read_manifest(prepared)
    batches = fd.open_batches(config, manifest, log=lambda s: None)
    part = manifest.split("train")
    order = np.random.default_rng(args.seed).permutation(len(part))
    rows_list = [order[s : s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    threads = torch.get_num_threads()
    out: dict = {"torch_threads": threads, "repeats": repeats}
    for m, feats in batches.features.items():
        column = part.frame[part.key_columns[m]].to_numpy()
        key_batches = [[None if fd._is_missing(k) else str(k) for k in column[rows]] for rows in rows_list]
        key_batches = [keys for keys in key_batches if any(k is not None for k in keys)][: args.alt_batches]
        spans = [
            ([feats.span[k][0] if k else 0 for k in keys], [feats.span[k][1] if k else 0 for k in keys])
            for keys in key_batches
        ]  # fmt: skip
        tspans = [(torch.tensor(o), torch.tensor(n)) for o, n in spans]
        flat_np = feats.flat.numpy()
        for keys, (o, n), (to, tn) in zip(key_batches[:3], spans[:3], tspans[:3]):  # the same numbers every way
            ref = feats.gather(keys)
            x, mask = vectorised_gather(feats.flat, to, tn)
            x16, _ = vectorised_gather(feats.flat, to, tn, dtype=None)
            same = torch.equal(ref.x, x) and torch.equal(ref.mask, mask) and torch.equal(ref.x, x16.float())
            same = same and torch.equal(ref.x, numpy_gather(flat_np, o, n))
            if not (same and torch.equal(ref.x, copy_gather(feats.flat, o, n))):
                raise AssertionError(f"{m}: an alternative gather differs from InMemoryTokens.gather")
        ways = {
            "gather": lambda: [feats.gather(keys) for keys in key_batches],
            "copy_gather": lambda: [copy_gather(feats.flat, o, n) for o, n in spans],
            "numpy_gather": lambda: [numpy_gather(flat_np, o, n) for o, n in spans],
            "vectorised_fp32": lambda: [vectorised_gather(feats.flat, o, n) for o, n in tspans],
            "vectorised_fp16": lambda: [vectorised_gather(feats.flat, o, n, dtype=None) for o, n in tspans],
        }
        res: dict = {"batches": len(key_batches)}
        for t in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(t)
            try:
                for name, fn in ways.items():
                    best, median = _times_ms(fn, repeats, len(key_batches))
                    res[f"{name}_{t}t"] = {"best_ms": best, "median_ms": median}
            finally:
                torch.set_num_threads(threads)
        out[m] = res

    targets_cols = list(part.target_columns)

    def pandas_way(rows):  # what StoreBatches._batch does besides gather
        frame = part.frame.iloc[rows]
        keys = {m: [None if fd._is_missing(k) else str(k) for k in frame[part.key_columns[m]]] for m in batches.features}
        t = torch.from_numpy(part.frame[targets_cols].to_numpy(np.float32, na_value=np.nan)[rows])
        return keys, t, frame[part.sample_id_column].astype(str).tolist()

    key_arrays = {m: np.array([None if fd._is_missing(k) else str(k) for k in part.frame[part.key_columns[m]]], dtype=object)
                  for m in batches.features}  # fmt: skip
    target_array = torch.from_numpy(part.frame[targets_cols].to_numpy(np.float32, na_value=np.nan))
    ids = np.array(part.frame[part.sample_id_column].astype(str).tolist(), dtype=object)

    def array_way(rows):
        return {m: a[rows].tolist() for m, a in key_arrays.items()}, target_array[rows], ids[rows].tolist()

    out["manifest"] = {
        "batches": len(rows_list),
        "pandas_ms": _times_ms(lambda: [pandas_way(r) for r in rows_list], repeats, len(rows_list))[1],
        "arrays_ms": _times_ms(lambda: [array_way(r) for r in rows_list], repeats, len(rows_list))[1],
    }

    # streaming: one record at a time, in this thread, warm page cache
    store = open_store(stores["rna"])
    keys = list(dict.fromkeys(part.keys("rna")))[: 4 * args.batch_size]
    spans = [store.token_span(k) for k in keys]
    array = store.root["tokens"]
    for k, (o, n) in zip(keys[:3], spans[:3]):
        assert np.array_equal(store.tokens(k), array[o : o + n])
    chunk_rows = array.chunks[0]  # inner chunk of the shard: the unit a read decodes
    touched = [(o + n - 1) // chunk_rows - o // chunk_rows + 1 for o, n in spans]
    out["stream_rna_per_record"] = {
        "records": len(keys),
        "store_tokens_ms": _times_ms(lambda: [store.tokens(k) for k in keys], repeats, len(keys))[1],
        "cached_array_ms": _times_ms(lambda: [array[o : o + n] for o, n in spans], repeats, len(keys))[1],
        "group_lookup_ms": _times_ms(lambda: [store.root["tokens"] for _ in keys], repeats, len(keys))[1],
        "inner_chunk_rows": int(chunk_rows),
        "mean_record_rows": float(np.mean([n for _, n in spans])),
        "decoded_rows_per_record_row": float(sum(touched) * chunk_rows / sum(n for _, n in spans)),
    }
    return out


# -- machine ----------------------------------------------------------------------------------------


def disk_note(path: Path) -> dict:
    """Filesystem, block device and whether it is rotational, for the directory the stores live in."""
    path = path.resolve()
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    except OSError:
        pass
    mnt, dev, fstype = best
    name = Path(dev).name
    base = name.rstrip("0123456789") if not name.startswith("nvme") else name.split("p")[0]
    rotational = None
    try:
        rotational = Path(f"/sys/block/{base}/queue/rotational").read_text().strip() == "1"
    except OSError:
        pass
    kind = "virtio block device (host-side caching possible)" if base.startswith("vd") else ""
    return {"mount": mnt, "device": dev, "fstype": fstype, "rotational": rotational, "kind": kind}


def data_libraries_and_disk(work: Path) -> dict:
    """What this benchmark adds to benchlib.machine_info: the data libraries and the disk under `work`."""
    import pandas
    import zarr

    return {"zarr": zarr.__version__, "numpy": np.__version__, "pandas": pandas.__version__, "disk": disk_note(work)}


# -- run --------------------------------------------------------------------------------------------


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Samples/s of the fusion input pipeline (stores in RAM vs streamed) beside the model's step rate.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--n-genes", type=int, default=400, help="synthetic genes (~3 transcripts = samples each)")
    p.add_argument("--hidden", type=int, default=256, help="width of the tiny ESM2/NT = per-token row width (fp16)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--prefetch", type=int, default=4, help="batches the streaming loader prepares ahead")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each data-only pass (medians reported)")
    p.add_argument(
        "--aggregators", nargs="+", default=["cross-attention", "mean-concat"], help="fusion aggregators to time"
    )
    p.add_argument("--d-model", type=int, default=64, help="fusion model width")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads of the fusion model")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed training steps before the model-only timing")
    p.add_argument("--model-batches", type=int, default=4, help="timed training steps of the model-only measurement")
    p.add_argument(
        "--e2e-samples",
        type=int,
        default=128,
        help="train samples of each end-to-end epoch (validation: a quarter as many); 0 = the whole splits",
    )
    p.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end epochs per loading mode and aggregator")
    p.add_argument(
        "--cold",
        choices=COLD_MODES,
        default="fadvise",
        help="how to evict the stores from the page cache before a cold pass: drop-caches (whole machine, root), "
        "fadvise (POSIX_FADV_DONTNEED on the store files only), none (cold = first pass after opening)",
    )
    p.add_argument("--alt-batches", type=int, default=8, help="batches per modality timed in the alternatives comparison")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-batch time breakdown and the alternatives")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the shuffling")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for every measurement (default: torch's choice)")
    p.add_argument(
        "--setup-threads", type=int, default=1, help="torch threads while building the stores (not measured; 1 avoids OpenMP stalls on a busy machine)"
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the data set here (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    small = {k: getattr(args, k) for k in ("repeats", "e2e_repeats", "n_genes", "hidden", "batch_size", "model_batches", "setup_threads")}
    if min(small.values()) < 1 or args.e2e_samples < 0:
        raise SystemExit(f"these must be >= 1: {small}; --e2e-samples >= 0 (got {args.e2e_samples})")
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_fusion_data_")) if own_tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, work)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def _run(args: argparse.Namespace, work: Path) -> dict:
    from fusion.data import DataConfig, open_batches
    from fusion.experiment import read_manifest

    started = time.perf_counter()
    machine = machine_info(**data_libraries_and_disk(work))
    threads = torch.get_num_threads()
    print("== machine")
    print(f"  {machine['platform']}  {machine['cpu_model']}")
    print(
        f"  {machine['cpu_cores']} cores ({machine['cpu_cores_usable']} usable, torch threads {threads}), "
        f"{machine['ram_gib']} GiB RAM; python {machine['python']}, torch {machine['torch']}, zarr {machine['zarr']}, "
        f"numpy {machine['numpy']}, pandas {machine['pandas']}"
    )
    d = machine["disk"]
    print(f"  disk: {d['device']} ({d['fstype']}) at {d['mount']}, rotational={d['rotational']} {d['kind']}")
    load = machine["load_average_at_start"]
    if load is not None:
        busy = load > 0.5
        print(f"  load average (1 min) at start: {load:.2f}" + ("  (other work is running: figures are low and noisy)" if busy else ""))

    print(f"== setup in {work}")
    setup = Setup(n_genes=args.n_genes, hidden=args.hidden, seed=args.seed)
    torch.set_num_threads(args.setup_threads)
    try:
        prepared, stores, setup_s = make_data(work, setup, print)
    finally:
        torch.set_num_threads(threads)
    manifest = read_manifest(prepared)
    sizes = store_sizes(stores, manifest)
    n_split = {s: len(manifest.split(s)) for s in ("train", "validation", "test")}
    print(f"  samples: {n_split}; setup {setup_s:.1f} s")
    for m, s in sizes.items():
        print(
            f"  {m:8s} {s['records']:5d} records, d={s['embed_dim']} {s['token_dtype']} ({s['row_bytes']} B/row), "
            f"{s['tokens_per_record_mean']:.0f} rows/record; per-token {s['per_token_bytes_manifest'] / 1e6:.1f} MB "
            f"(train {s['per_token_bytes_train'] / 1e6:.1f} MB, flat array {s['flat_tokens_bytes'] / 1e6:.1f} MB of which "
            f"{s['unused_flat_bytes'] / 1e6:.1f} MB unused shard-alignment gaps), "
            f"on disk {s['size_on_disk'] / 1e6:.1f} MB"
        )
    mb_manifest = sum(s["per_token_bytes_manifest"] for s in sizes.values()) / 1e6
    mb_flat = sum(s["flat_tokens_bytes"] for s in sizes.values()) / 1e6
    gap_mb = sum(s["unused_flat_bytes"] for s in sizes.values()) / 1e6

    # Does the requested eviction work here? Checked once up front with mincore, and again before every cold pass.
    probe = evict(stores.values(), args.cold)
    evicted = probe["worked"]
    print(
        f"== page cache (--cold {args.cold}): stores resident before {_pct(probe['resident_before'])}, after "
        f"{_pct(probe['resident_after'])}" + (f", error {probe['error']}" if probe["error"] else "")
        + ("  -> cold passes start from disk" if evicted else "  -> NOT evicted: 'cold' = first pass after opening")
    )  # fmt: skip

    # -- data only
    print(f"== data only: one shuffled train epoch ({n_split['train']} samples, batch {args.batch_size}), no model; "
          f"{args.repeats} repeats, cases alternating")  # fmt: skip
    cases = [("memory", "tokens"), ("stream", "tokens"), ("memory", "pooled")]
    data: dict[str, list[dict]] = {f"{lo}/{fe}": [] for lo, fe in cases}
    for r in range(args.repeats):
        for loading, features in cases:
            res = data_pass(prepared, stores, features, loading, args, args.cold)
            data[f"{loading}/{features}"].append(res)
            print(
                f"  repeat {r + 1} {loading:6s} {features:6s}: open {res['open_s']:6.2f} s, first epoch {res['cold_s']:6.2f} s, "
                f"second {res['warm_s']:6.2f} s  (stores resident before open {_pct(res['eviction']['resident_after'])})"
            )
    data_summary = {}
    for key, runs in data.items():
        n = runs[0]["samples"]
        data_summary[key] = {
            "samples": n,
            "open_s": _med([x["open_s"] for x in runs]),
            "cold_samples_per_s": n / _med([x["cold_s"] for x in runs]),
            "warm_samples_per_s": n / _med([x["warm_s"] for x in runs]),
            "runs": runs,
        }
    mem_open = data_summary["memory/tokens"]["open_s"]
    disk_mb = sum(s["size_on_disk"] for s in sizes.values()) / 1e6  # gap rows are fill value: never written, never read
    cold_read_mb_s = {"flat": mb_flat / mem_open, "on_disk": disk_mb / mem_open} if evicted else None

    # -- model only
    thread_counts = sorted({threads, 1}, reverse=True)
    print(f"== model only: d_model {args.d_model}, batches materialised in RAM beforehand, {args.model_batches} timed "
          f"steps after {args.warmup_steps} warm-up; torch threads {thread_counts}")  # fmt: skip
    mem = open_batches(
        DataConfig(manifest=str(prepared), stores=stores, features="tokens", batch_size=args.batch_size,
                   loading="memory", seed=args.seed),
        manifest, log=lambda s: None,
    )  # fmt: skip
    train_list = list(mem("train", shuffle=True, epoch=0))
    model_rates: dict[str, dict[int, dict]] = {}
    for agg in args.aggregators:
        model_rates[agg] = {}
        for t in thread_counts:
            mr = model_step_rate(mem, train_list, agg, args, t)
            model_rates[agg][t] = mr
            print(f"  {agg:16s} {mr['params']:8,d} params, {t} thread(s): train step {mr['step_samples_per_s']:8,.1f} samples/s "
                  f"(steps {', '.join(f'{x:.2f}' for x in mr['step_seconds'])} s)")  # fmt: skip
    del train_list, mem

    # -- end to end
    what = "whole splits" if args.e2e_samples == 0 else f"{args.e2e_samples} train + {-(-args.e2e_samples // 4)} validation samples"
    print(f"== end to end: fusion.train.train, 1 epoch ({what}; train + validation + checkpoint), page cache warm, "
          f"torch threads {threads}, {args.e2e_repeats} run(s) each; replay = batches materialised beforehand")  # fmt: skip
    e2e: dict[str, dict[str, list[dict]]] = {agg: {src: [] for src in E2E_SOURCES} for agg in args.aggregators}
    for r in range(args.e2e_repeats):
        for agg in args.aggregators:
            for src in E2E_SOURCES:
                res = e2e_rate(prepared, stores, src, agg, work, args)
                e2e[agg][src].append(res)
                print(f"  run {r + 1} {agg:16s} {src:6s}: epoch {res['epoch_seconds']:6.2f} s, "
                      f"{res['samples_per_s']:8,.1f} samples/s")  # fmt: skip
    e2e_summary = {
        agg: {src: runs[0]["train_samples"] / _med([x["epoch_seconds"] for x in runs]) for src, runs in per.items()}
        for agg, per in e2e.items()
    }

    # -- breakdown
    parts = comparison = None
    if not args.no_breakdown:
        print("== breakdown and alternatives (warm)")
        parts = {lo: breakdown(prepared, stores, lo, args) for lo in ("memory", "stream")}
        comparison = alternatives(prepared, stores, args)

    # -- tables
    cold_word = "cold" if evicted else "1st pass"
    print()
    print(f"== Table 1: input pipeline alone, no model (train split, {n_split['train']} samples, batch {args.batch_size}, "
          f"torch threads {threads}; medians of {args.repeats})")  # fmt: skip
    print(f"| mode | features | samples/s ({cold_word}) | samples/s (warm) | open s | MB per-token data |")
    print("|---|---|---:|---:|---:|---:|")
    for loading, features in cases:
        s = data_summary[f"{loading}/{features}"]
        mb = f"{mb_manifest:,.0f} ({mb_flat:,.0f} flat)" if features == "tokens" else "- (pooled vectors only)"
        mode = loading if features == "tokens" else "RAM (always)"
        print(f"| {mode} | {features} | {s['cold_samples_per_s']:,.0f} | {s['warm_samples_per_s']:,.0f} | "
              f"{s['open_s']:.2f} | {mb} |")  # fmt: skip
    print(
        "  cold: " + ("the stores' files were evicted from the page cache before open (checked with mincore)"
                      if evicted else "first epoch after opening; the page cache could NOT be dropped") + "; warm: second epoch"
    )  # fmt: skip
    print(
        "  MB per-token data: fp16 rows of every manifest record (as fusion.data logs it); flat = the stores' flat "
        "token arrays, what loading=memory reads and holds (records with the same sequence share rows; commit "
        f"groups start on shard boundaries, so {gap_mb:,.0f} MB of it are unused gap rows)"
    )
    if cold_read_mb_s:
        print(f"  loading=memory open from a cold cache: {cold_read_mb_s['flat']:,.0f} MB/s of flat per-token data, "
              f"{cold_read_mb_s['on_disk']:,.0f} MB/s of store bytes on disk")  # fmt: skip
    mt, st = data_summary["memory/tokens"], data_summary["stream/tokens"]
    ratio_cold = mt["cold_samples_per_s"] / st["cold_samples_per_s"]
    ratio_warm = mt["warm_samples_per_s"] / st["warm_samples_per_s"]
    mem_first = n_split["train"] / (mem_open + _med([x["cold_s"] for x in data["memory/tokens"]]))
    stream_first = n_split["train"] / (st["open_s"] + _med([x["cold_s"] for x in data["stream/tokens"]]))
    print(f"  ratio memory/stream (tokens): {ratio_cold:.2f}x {cold_word}, {ratio_warm:.2f}x warm; "
          f"first epoch counting open: memory {mem_first:,.0f} vs stream {stream_first:,.0f} samples/s "
          f"({mem_first / stream_first:.2f}x)")  # fmt: skip

    print()
    print(f"== Table 2: model vs end to end (samples/s; per-token features, d_model {args.d_model}, CPU, torch threads {threads})")
    one = [t for t in thread_counts if t != threads]
    extra_head = f" model step, {one[0]} thread |" if one else ""
    print(f"| aggregator | model step (RAM batches) |{extra_head} e2e train() RAM batches | e2e train() memory "
          "| e2e train() stream | e2e memory/stream | data share of e2e epoch (memory / stream) |")  # fmt: skip
    print("|---|---:|" + ("---:|" if one else "") + "---:|---:|---:|---:|---:|")
    for agg in args.aggregators:
        mr, es = model_rates[agg][threads], e2e_summary[agg]
        share = {lo: max(0.0, 1 - es[lo] / es["replay"]) for lo in ("memory", "stream")}
        extra = f" {model_rates[agg][one[0]]['step_samples_per_s']:,.1f} |" if one else ""
        print(f"| {agg} | {mr['step_samples_per_s']:,.1f} |{extra} {es['replay']:,.1f} | {es['memory']:,.1f} | "
              f"{es['stream']:,.1f} | {es['memory'] / es['stream']:.2f}x | {share['memory']:.0%} / {share['stream']:.0%} |")  # fmt: skip
    print(
        "  e2e: samples/s of train()'s epoch (its train steps + a validation pass + a checkpoint write); RAM batches = "
        "the same epoch replaying batches materialised beforehand (no data cost); data share = 1 - e2e / RAM batches"
    )

    if parts and comparison:
        print()
        print(f"== Table 3: where a warm batch's time goes (ms per batch of {args.batch_size}, inside fusion/data.py, torch threads {threads})")
        mods = list(parts["memory"]["gather_ms"])
        print("| loading | consumer wait | _batch | " + " | ".join(f"gather {m}" for m in mods) + " | of which _pad | manifest/pandas |")
        print("|---|---:|---:|" + "---:|" * len(mods) + "---:|---:|")
        for lo, p in parts.items():
            print(f"| {lo} | {p['wall_ms_per_batch']:.1f} | {p['batch_ms']:.1f} | "
                  + " | ".join(f"{p['gather_ms'][m]:.1f}" for m in mods)
                  + f" | {p['pad_ms']:.1f} | {p['manifest_pandas_ms']:.1f} |")  # fmt: skip
        print("  stream: _batch runs in the prefetch thread (overlapping); consumer wait is what the training loop saw")
        print(f"== alternatives on the same batches (ms per batch, best / median of {comparison['repeats']}; results checked equal)")
        ways = ("gather", "copy_gather", "numpy_gather", "vectorised_fp32", "vectorised_fp16")
        print("| modality | torch threads | InMemoryTokens.gather | torch copy into fp32 batch | numpy copy into fp32 batch "
              "| index_select -> fp32 | index_select, fp16 kept |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for m in mods:
            for t in thread_counts:
                c = comparison[m]
                cells = " | ".join(f"{c[f'{w}_{t}t']['best_ms']:.2f} / {c[f'{w}_{t}t']['median_ms']:.2f}" for w in ways)
                print(f"| {m} | {t} | {cells} |")
        c = comparison["manifest"]
        print(f"  manifest part of _batch: pandas per batch {c['pandas_ms']:.2f} vs arrays made once per epoch "
              f"{c['arrays_ms']:.3f} ({c['pandas_ms'] / max(c['arrays_ms'], 1e-9):.0f}x)")  # fmt: skip
        c = comparison["stream_rna_per_record"]
        print(f"  stream, per rna record (one thread, warm): EmbeddingStore.tokens {c['store_tokens_ms']:.2f} ms vs "
              f"slice of an array opened once {c['cached_array_ms']:.2f} ms (root['tokens'] lookup alone "
              f"{c['group_lookup_ms']:.2f} ms); inner chunks of {c['inner_chunk_rows']} rows vs "
              f"{c['mean_record_rows']:.0f} rows per record: {c['decoded_rows_per_record_row']:.1f} rows decoded per row used")  # fmt: skip

    total_s = time.perf_counter() - started
    print(f"\n== took {total_s:.0f} s (setup {setup_s:.0f} s); load average (1 min) at the end: {os.getloadavg()[0]:.2f}")

    results = {
        "benchmark": "bench_fusion_data",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "torch_threads": threads,
        "setup": asdict(setup),
        "setup_seconds": setup_s,
        "samples": n_split,
        "stores": {m: {**s, "path": stores[m]} for m, s in sizes.items()},
        "per_token_mb_manifest": mb_manifest,
        "per_token_mb_flat": mb_flat,
        "page_cache": {"cold": args.cold, "probe": probe, "cold_means": "evicted before open" if evicted else "first pass after opening"},
        "data_only": data_summary,
        "ratio_memory_stream_cold": ratio_cold,
        "ratio_memory_stream_warm": ratio_warm,
        "first_epoch_incl_open_samples_per_s": {"memory": mem_first, "stream": stream_first},
        "cold_read_mb_per_s": cold_read_mb_s,
        "model_only": model_rates,
        "end_to_end": {"summary_samples_per_s": e2e_summary, "runs": e2e},
        "breakdown_ms_per_batch": parts,
        "alternatives_ms_per_batch": comparison,
        "seconds": total_s,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    write_json(args.json, results)
    return results


def main() -> None:
    run(create_parser().parse_args())


if __name__ == "__main__":
    main()
