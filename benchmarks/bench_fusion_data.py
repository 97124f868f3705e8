"""Per-token data at IsoFormer shapes: the streamed loader against the disk, a memmap, and the model.

One run writes DNA / RNA / protein embedding stores with the real store code (`create_store`,
`StoreWriter.commit`) holding random fp16 rows at IsoFormer's per-token widths and token counts
(the IsoFormer data set's ~170,000 transcripts of ~20,000 genes; the lengths are assumptions, printed), plus a manifest, then
measures on the same bytes, each case cold (the files evicted from the page cache with
posix_fadvise, checked with mincore) and warm:

    raw        the stores' chunk files read sequentially with os.readv into one buffer: the disk
    memmap     the same decoded rows as one .npy per modality, gathered per batch from np.memmap
    loaders    one shuffled epoch of `StoreBatches` (fusion.data) per way of reading per-token rows:
               - stream:  fusion.data.StreamedTokens (one zarr call per batch decoding into the fp16 batch:
                          EmbeddingStore.read_tokens_into) on stores as `embedcache build` writes them,
                          opened as `fusion` opens them (on Linux through embedcache.mapped_store)
               - stream-read: `stream` with each byte range read into a new buffer (zarr's LocalStore), as
                          before the stores' files were mapped (embedcache.mapped_store)
               - stream-lz4: the same rows stored with --token-codec lz4
               - before:  the loader before fp16 batches, on lz4 stores: float32 batches
               - stream-2-workers: `stream` in 2 torch DataLoader worker processes (fusion --workers 2)
               - stream-read-2-workers: `stream-read` in 2 worker processes
               - zarrs:   StreamedTokens with the zarrs codec pipeline (Rust) on the tokens array
               - memory:  InMemoryTokens (RAM; cold = its load)
               - stream-pooled: stores with every 8 rows averaged (embedcache build --token-pool 8)
               - stream-max-tokens: longer rows averaged down to 512 (the recipe's `fusion --max-tokens 512`):
                          the reduced arrays (fusion.reduced, made once before any loader is timed) streamed
               - stream-max-tokens-2-workers: the same in 2 DataLoader worker processes (`--workers 2 --max-tokens 512`)
               - max-tokens-before: the same rows averaged per batch from the stores, as before reduce-once
                          (per-record arrays, adaptive pooling)
               - recipe:  as examples/isoformer/recipe.toml trains at full scale: RNA streamed, DNA and protein
                          in RAM (under its memory_gb), all averaged to 512 rows (cold: after the load)
    layout     the RNA rows alone, re-stored with other chunk / shard / codec choices, read per batch
               with one zarr call (no collation): what the store layout costs
    model      the cross-attention fusion model (FusionModelConfig defaults, the paper's aggregator)
               training on batches of these shapes (full rows, rows pooled at build, rows up to max-tokens): forward, masked MSE, backward, AdamW, on this CPU;
               its FLOPs per sample (torch FlopCounterMode) give the rate an H200 could reach at
               most (data-sheet bf16 peak), the rate a GPU run would ask the loader for

Samples/s and MB/s of per-token rows delivered (the stored fp16 bytes of the samples' rows, all
modalities, before any --max-tokens averaging) are reported; raw MB/s counts file bytes. Compare figures within one run only: the VM is shared.

    .venv/bin/python benchmarks/bench_fusion_data.py            # 200 genes, 4 GB of rows
    .venv/bin/python benchmarks/bench_fusion_data.py --quick    # fewer genes, no layouts
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import ctypes
import json
import mmap
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from benchlib import GPU_BF16_PEAK_TFLOPS, machine_info, reuse_or_clear, work_directory, write_json
from cli.common import HelpFormatter

SETUP_FILE = "bench_setup.json"
MODALITIES = ("dna", "rna", "protein")
TRANSCRIPTS_PER_GENE = 170_000 / 20_000  # the IsoFormer data set: ~170k transcripts over ~20k genes


# -- shapes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """Per-token widths and token counts at IsoFormer scale (the encoders' caps; lengths are assumptions)."""

    dna_encoder: str = "nt"  # nt: NT-v2 1024 wide, one window per gene | enformer: 3072 wide, 896 bins
    dna_tokens: int = 2_000  # NT-v2 6-mers of a 12 kb window around the TSS (paper: 6-12 kb)
    rna_dim: int = 1024  # an NT-v2 width; the released NT-v2-250M, IsoFormer's RNA encoder, is 768 wide
    rna_median: int = 500  # tokens: an assumed 3 kb median transcript in 6-mers, log-normal (sigma 0.7)
    rna_cap: int = 2_048  # NT-v2 cap, 3' end kept (as IsoFormer crops RNA)
    protein_dim: int = 640  # ESM2-150M
    protein_median: int = 415  # residues: human-proteome median (as in bench_store_layout.py), log-normal (0.75)
    protein_cap: int = 1_022  # ESM2 without <cls>/<eos>
    token_scale: float = 1.0  # multiply every token count (tests use a small fraction)

    @property
    def dna_dim(self) -> int:
        return 3072 if self.dna_encoder == "enformer" else 1024

    def dims(self) -> dict[str, int]:
        return {"dna": self.dna_dim, "rna": self.rna_dim, "protein": self.protein_dim}

    def lengths(self, n_genes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(transcripts' gene, dna rows per gene, rna rows per transcript, protein rows per transcript)."""
        per_gene = 1 + rng.poisson(TRANSCRIPTS_PER_GENE - 1, n_genes)
        gene = np.repeat(np.arange(n_genes), per_gene)
        s = self.token_scale
        dna = np.full(n_genes, max(1, round((896 if self.dna_encoder == "enformer" else self.dna_tokens) * s)))
        rna = np.clip(rng.lognormal(np.log(self.rna_median * s), 0.7, len(gene)), 1, self.rna_cap * s).astype(int)
        protein = np.clip(rng.lognormal(np.log(self.protein_median * s), 0.75, len(gene)), 1, self.protein_cap * s).astype(int)
        return gene, dna, rna, protein


@dataclass(frozen=True)
class Setup:
    """What the data set was made from; a --workdir holding the same is reused, anything else rebuilt."""

    n_genes: int
    shapes: Shapes
    seed: int = 0
    n_targets: int = 30


ATTRS = {"format": "embedcache-store", "schema_version": 2, "fingerprint": "bench", "provenance": {},
         "config": {"encoder": "bench", "model": "random", "pooling": "none", "dtype": "float16"},
         "stored_dtype": {"tokens": "float16", "pooled": "float32"}}  # fmt: skip


def write_store(path: Path, rows: list[np.ndarray], keys: list[str], dim: int, group_mb: float = 32.0, token_codec: str = "none",
                pooled: bool = False) -> None:  # fmt: skip
    """A complete embedcache store of `rows` (one record per key), longest first and committed in ~group_mb
    groups, as a build orders and commits them; `pooled`: with each record's mean row as its pooled vector."""
    from embedcache.store import ContentResult, create_store, open_writer

    attrs = {**ATTRS, "embed_dim": dim, "config": {**ATTRS["config"], "pooling": "mean" if pooled else "none"}}
    create_store(path, attrs=attrs, embed_dim=dim, pooled=pooled, tokens=True, token_dtype="float16", shard_mb=32.0, token_codec=token_codec)
    writer = open_writer(path)
    buffer, size = [], 0
    longest_first = sorted(range(len(keys)), key=lambda i: -len(rows[i]))
    for key, r in ((keys[i], rows[i]) for i in longest_first):
        mean = r.astype(np.float32).mean(0) if pooled else None
        buffer.append(ContentResult(key=f"c-{key}", residues=key, tokens=r, pooled=mean, n_input_tokens=len(r), n_cropped=0, n_windows=1))
        size += r.nbytes
        if size >= group_mb * 1e6:
            writer.commit(buffer, [(b.residues, b.key) for b in buffer])
            buffer, size = [], 0
    if buffer:
        writer.commit(buffer, [(b.residues, b.key) for b in buffer])
    writer.set_status("complete")


def data_setup(args: argparse.Namespace) -> Setup:
    """The data set the command line asks for (measure_in_child passes the same arguments on)."""
    return Setup(n_genes=args.n_genes, shapes=Shapes(dna_encoder=args.dna_encoder, token_scale=args.token_scale), seed=args.seed)


def make_data(work: Path, setup: Setup, log: Callable[[str], None]) -> tuple[Path, dict[str, str], float]:
    """(prepared dir, modality -> store path, seconds): random rows at IsoFormer shapes, three stores, a manifest."""
    prepared = work / "prepared"
    stores = {m: str(work / "stores" / f"{m}.zarr") for m in MODALITIES}
    made = ("prepared", "stores", "stores-lz4", "memmap", "layouts", *(p.name for p in work.glob("stores-pool*")))
    if reuse_or_clear(work, SETUP_FILE, asdict(setup), made=made):
        log(f"  reusing the data set in {work} ({SETUP_FILE} matches)")
        return prepared, stores, 0.0
    started = time.perf_counter()
    rng = np.random.default_rng(setup.seed)
    gene, dna_len, rna_len, protein_len = setup.shapes.lengths(setup.n_genes, rng)
    genes = [f"G{g:05d}" for g in range(setup.n_genes)]
    transcripts = [f"T{t:06d}" for t in range(len(gene))]
    dims = setup.shapes.dims()
    lengths = {"dna": (genes, dna_len), "rna": (transcripts, rna_len), "protein": (transcripts, protein_len)}
    for m, (keys, lens) in lengths.items():
        rows = [rng.standard_normal((int(n), dims[m]), dtype=np.float32).astype(np.float16) for n in lens]
        write_store(Path(stores[m]), rows, keys, dims[m])
        write_store(lz4_path(stores[m]), rows, keys, dims[m], token_codec="lz4")
    write_manifest(prepared, gene, genes, transcripts, setup.n_targets, rng)
    (work / SETUP_FILE).write_text(json.dumps(asdict(setup)))  # last: its presence marks a whole data set
    return prepared, stores, time.perf_counter() - started


def write_manifest(prepared: Path, gene: np.ndarray, genes: list[str], transcripts: list[str], n_targets: int,
                   rng: np.random.Generator) -> None:  # fmt: skip
    """A prepared directory (manifest.csv + prepare.json): one sample per transcript, keyed by its gene (DNA) and itself
    (RNA, protein), random targets, split by gene as the paper does (8:1:1)."""
    import pandas as pd

    prepared.mkdir(parents=True)
    split = np.where(gene % 10 == 8, "validation", np.where(gene % 10 == 9, "test", "train"))
    frame = pd.DataFrame({"sample_id": transcripts, "gene_id": [genes[g] for g in gene], "split": split,
                          "dna": [genes[g] for g in gene], "rna": transcripts, "protein": transcripts})  # fmt: skip
    targets = [f"tissue_{i}" for i in range(n_targets)]
    frame[targets] = rng.standard_normal((len(frame), n_targets)).astype(np.float32)
    frame.to_csv(prepared / "manifest.csv", index=False)
    (prepared / "prepare.json").write_text(json.dumps({"kind": "bench", "targets": targets, "key_columns": {m: m for m in MODALITIES}}))


def lz4_path(store: str) -> Path:
    """The same rows stored with `--token-codec lz4`, beside the default stores."""
    return Path(store).parent.parent / "stores-lz4" / Path(store).name


def write_memmaps(work: Path, stores: dict[str, str]) -> dict[str, Path]:
    """One .npy per modality holding the store's decoded rows (InMemoryTokens' flat layout)."""
    from embedcache import open_store

    out = {}
    for m, path in stores.items():
        out[m] = work / "memmap" / f"{m}.npy"
        if not out[m].exists():
            out[m].parent.mkdir(parents=True, exist_ok=True)
            flat, _, _ = open_store(path).token_arrays()
            np.save(out[m], flat)
    return out


def evictable_files(stores: dict[str, str], memmaps: dict[str, Path], pooled: dict[str, str]) -> list[Path]:
    """Every file a read path may read, all evicted from the page cache before each one is measured."""
    tokens = [Path(p) / "tokens" for p in stores.values()]
    reduced = [d for p in stores.values() for d in (Path(p).parent.parent / "reduced").glob("*.zarr")]
    return [*tokens, *(lz4_path(p) / "tokens" for p in stores.values()), *memmaps.values(), *pooled.values(), *reduced]


def write_pooled(work: Path, stores: dict[str, str], k: int) -> dict[str, str]:
    """The same stores with every k rows averaged, as `embedcache build --token-pool k` stores them."""
    from embedcache import open_store
    from embedcache.reduce import pool_rows

    out = {m: str(work / f"stores-pool{k}" / f"{m}.zarr") for m in stores}
    for m, path in stores.items():
        if Path(out[m]).exists():
            continue
        store = open_store(path)
        flat, offsets, lengths = store.token_arrays()
        rows = [pool_rows(torch.from_numpy(flat[o : o + n]), k).numpy() for o, n in zip(offsets, lengths)]
        write_store(Path(out[m]), rows, store.ids, store.embed_dim)
    return out


# -- the OS page cache ------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _files(roots: Iterable[str | Path]) -> list[Path]:
    return [p for r in roots for p in ([Path(r)] if Path(r).is_file() else Path(r).rglob("*")) if p.is_file()]


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


def evict(roots: Iterable[str | Path]) -> float | None:
    """Drop the files from the page cache (posix_fadvise DONTNEED, no privilege needed); the share left resident."""
    for path in _files(roots):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(roots)


# -- what is timed -----------------------------------------------------------------------------------


def raw_read(roots: list[Path]) -> int:
    """Read every file under `roots` sequentially into one reused 4 MiB buffer; bytes read."""
    buf = bytearray(4 << 20)
    total = 0
    for path in _files(roots):
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total


class MemmapTokens:
    """ModalityFeatures over an np.memmap of the decoded rows: a batch copies its records' rows out of it."""

    def __init__(self, path: Path, store, keys: list[str]):
        self.dim = store.embed_dim
        self.flat = np.load(path, mmap_mode="r")
        _, offsets, lengths = _spans(store)
        rows = store.rows(keys)
        self.span = {k: (int(offsets[r]), int(lengths[r])) for k, r in zip(keys, rows)}

    def gather(self, keys):
        from fusion.data import _pad

        pieces = [None if k is None else torch.from_numpy(np.array(self.flat[self.span[k][0] : sum(self.span[k])])) for k in keys]
        return _pad(pieces, self.dim)


def _spans(store):
    """(flat, offsets, lengths) as InMemoryTokens sees them, without loading the rows."""
    spans = sorted({(t0, t1) for *_, t0, t1 in store.log.ranges.tolist() if t1 > t0})
    starts = np.array([t0 for t0, _ in spans])
    packed = np.cumsum([0] + [t1 - t0 for t0, t1 in spans[:-1]])
    offsets = store._offset[store._content_index]
    span = np.searchsorted(starts, offsets, side="right") - 1
    return None, offsets - starts[span] + packed[span], store._length[store._content_index]


def pad_float32(pieces, dim: int):
    """fusion.data._pad before fp16 batches: every batch float32, fp16 rows cast while copied."""
    from fusion.batch import ModalityBatch

    lengths = [0 if p is None else len(p) for p in pieces]
    x = np.zeros((len(pieces), max(max(lengths), 1), dim), np.float32)  # (b, L, d)
    mask = np.zeros(x.shape[:2], bool)  # (b, L)
    for i, p in enumerate(pieces):
        if p is not None:
            x[i, : len(p)], mask[i, : len(p)] = p.numpy(), True
    return ModalityBatch(x=torch.from_numpy(x), mask=torch.from_numpy(mask), present=torch.tensor([n > 0 for n in lengths]))


class Float32Tokens:
    """StreamedTokens with the float32 batches of the loader before this change."""

    def __init__(self, store):
        self.dim, self.store = store.embed_dim, store

    def gather(self, keys):
        present = [k for k in keys if k is not None]
        rows = iter(self.store.tokens_many(present))
        return pad_float32([None if k is None else torch.from_numpy(next(rows)) for k in keys], self.dim)


class MaxTokensBefore:
    """StreamedTokens with max_rows as it was before group_mean summed row gathers: one array per record
    (`tokens_many`), each averaged by F.adaptive_avg_pool1d (the same numbers), then `_pad`."""

    def __init__(self, store, max_rows: int):
        self.dim, self.store, self.max_rows = store.embed_dim, store, max_rows

    def gather(self, keys):
        import torch.nn.functional as F

        from fusion.data import _pad

        def pooled(x):  # (L, d) -> (max_rows, d) float32
            return x if len(x) <= self.max_rows else F.adaptive_avg_pool1d(x.float().T[None], self.max_rows)[0].T

        present = [k for k in keys if k is not None]
        rows = iter(self.store.tokens_many(present))
        return _pad([None if k is None else pooled(torch.from_numpy(next(rows))) for k in keys], self.dim)


def copying_reads(store) -> None:
    """Bind the store's tokens array to zarr's own LocalStore: each byte range read into a new buffer, as
    every streamed read was before `embedcache.mapped_store` (the stream-read paths), and as zarrs needs it."""
    import zarr
    from zarr.storage import LocalStore

    store._tokens = zarr.open_array(store=LocalStore(store.store.root, read_only=True), path="tokens", mode="r")


def zarrs_store(path: str):
    """The store opened with its tokens array bound to the zarrs codec pipeline (None when zarrs is absent)."""
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return None
    import zarr

    from embedcache import open_store

    store = open_store(path)
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.strict": True}):
        copying_reads(store)  # the pipeline is chosen at open; zarrs reads the files itself from a LocalStore's root
    return store


LOADERS = ("stream", "stream-read", "stream-default-malloc", "stream-lz4", "before", "stream-2-workers", "stream-read-2-workers", "stream-2-workers-default-malloc", "zarrs", "memmap", "memory", "stream-pooled", "stream-max-tokens", "stream-max-tokens-2-workers", "max-tokens-before", "recipe")


def workers_of(way: str) -> int:
    """DataConfig.workers of a read path: `fusion train --workers 2` for the *-2-workers paths, else one loader thread."""
    return 2 if way.endswith("2-workers") else 0


def averages(way: str) -> bool:
    """Whether a read path averages longer rows down to --max-tokens (`fusion --max-tokens`, as the recipe does)."""
    return "max-tokens" in way or way == "recipe"


def open_loader(way: str, prepared: Path, stores: dict[str, str], memmaps: dict[str, Path], batch_size: int, seed: int,
                pooled: dict[str, str] | None = None, max_tokens: int = 512):
    """A StoreBatches whose per-token features are read the given way (stream-pooled: from the `pooled` stores;
    stream-max-tokens, max-tokens-before, recipe: longer rows averaged down to `max_tokens`)."""
    from fusion.data import DataConfig, ReducedTokens, StreamedTokens, open_batches
    from fusion.run import read_manifest

    if way == "stream-pooled":
        way, stores = "stream", pooled
    if way in ("stream-lz4", "before"):
        stores = {m: str(lz4_path(p)) for m, p in stores.items()}
    loading = "memory" if way == "memory" else "stream"
    config = DataConfig(manifest=str(prepared), stores=stores, features="tokens", batch_size=batch_size, loading=loading,
                        workers=workers_of(way), seed=seed, max_tokens=max_tokens if averages(way) else None,
                        reduced_dir=str(Path(prepared).parent / "reduced"))  # fmt: skip
    batches = open_batches(config, read_manifest(prepared), log=lambda s: None)
    keys = {m: list(dict.fromkeys(batches.manifest.keys(m))) for m in MODALITIES}
    if way == "before":
        batches.features = {m: Float32Tokens(batches.stores[m]) for m in MODALITIES}
    elif way == "memmap":
        batches.features = {m: MemmapTokens(memmaps[m], batches.stores[m], keys[m]) for m in MODALITIES}
    elif way == "recipe":  # at IsoFormer scale only RNA (116 GB after averaging) exceeds recipe.toml's memory_gb = 64
        for m in ("dna", "protein"):
            batches.features[m] = ReducedTokens(batches.stores[m], keys[m], batches.features[m].reduced)
            batches.loading[m] = "memory"
    elif way == "max-tokens-before":
        batches.features = {m: MaxTokensBefore(batches.stores[m], max_tokens) for m in MODALITIES}
    elif way == "zarrs":
        batches.features = {m: StreamedTokens(zarrs_store(stores[m]), keys[m]) for m in MODALITIES}
    elif way.startswith("stream-read"):
        for m in MODALITIES:
            copying_reads(batches.features[m].store)
    return batches


def measure(way: str, args: argparse.Namespace, prepared: Path, stores: dict[str, str], memmaps: dict[str, Path],
            pooled: dict[str, str], files: list[Path], reference_loader) -> dict:
    """One read path: its files evicted, a cold then a warm epoch, its first batch checked against the memmap's."""
    resident = evict(files)
    t0 = time.perf_counter()
    batches = open_loader(way, prepared, stores, memmaps, args.batch_size, args.seed, pooled, args.max_tokens)
    open_s = time.perf_counter() - t0
    res = {"open_s": open_s, "resident_before": resident}
    for temp, no in (("cold", 0), ("warm", 1)):
        s, n, nbytes = epoch(batches, no)
        if temp == "cold" and way == "memory":
            s += open_s  # its cold read is the load into RAM
        res[temp] = {"seconds": s, "samples": n, "samples_per_s": n / s, "mb_s": nbytes / 1e6 / s}
    first, order = first_batch(batches)
    if workers_of(way):  # through the worker processes, then shut them down
        workers = batches("train", shuffle=True, epoch=0)
        first = next(workers)
        del workers
    # stream-pooled holds other numbers by design (tests/embedcache/test_reduce.py checks them); the reduced
    # arrays hold the averaged rows in fp16
    reference = reference_loader._batch(reference_loader.split_arrays("train"), order)  # the same samples, from the memmap
    expected = reduced(reference, args.max_tokens, fp16=way != "max-tokens-before") if averages(way) else reference
    if way != "stream-pooled" and not same_batch(first, expected):
        raise AssertionError(f"{way}: the first batch differs from the memmap of the same rows")
    return res


# glibc's own default for this tunable: setting any glibc.malloc tunable makes embedcache.heap leave malloc alone
DEFAULT_MALLOC = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
DEFAULT_MALLOC_SUFFIX = "-default-malloc"


def measure_in_child(way: str, args: argparse.Namespace, work: Path) -> dict:
    """`way` measured in a fresh process whose malloc keeps glibc's default thresholds (no keep_freed_memory):
    malloc's settings are per process and this one's cannot be unset."""
    same_data = ["--n-genes", args.n_genes, "--dna-encoder", args.dna_encoder, "--token-scale", args.token_scale, "--seed", args.seed,
                 "--batch-size", args.batch_size, "--max-tokens", args.max_tokens, "--token-pool", args.token_pool]  # fmt: skip
    cmd = [sys.executable, __file__, "--workdir", str(work), "--measure-default-malloc", way, *map(str, same_data)]
    done = subprocess.run(cmd, env={**os.environ, **DEFAULT_MALLOC}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the default-malloc measurement failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _measure_default_malloc(args: argparse.Namespace) -> None:
    """The child of measure_in_child: the data set in --workdir (made by the parent), one read path measured, JSON printed."""
    from embedcache.heap import keep_freed_memory

    if keep_freed_memory():
        raise RuntimeError(f"with {DEFAULT_MALLOC} set, embedcache.heap should have left malloc alone")
    work = args.workdir
    setup = data_setup(args)
    prepared, stores, _ = make_data(work, setup, lambda s: None)
    memmaps, pooled = write_memmaps(work, stores), write_pooled(work, stores, args.token_pool)
    reference = open_loader("memmap", prepared, stores, memmaps, args.batch_size, args.seed)
    files = evictable_files(stores, memmaps, pooled)
    print(json.dumps(measure(args.measure_default_malloc, args, prepared, stores, memmaps, pooled, files, reference)))


def repeated_share(batches) -> float:
    """Share of the delivered rows of one shuffled train epoch that repeat a record already in the same
    batch (DNA: transcripts of one gene). StoreBatches' streamed paths read such a record once per batch;
    memmap and memory copy it per sample. At IsoFormer scale (20,000 genes) batches rarely repeat one."""
    arrays = batches.split_arrays("train")
    order = np.random.default_rng([batches.config.seed, 0]).permutation(len(arrays.sample_ids))
    size = batches.config.batch_size
    rows = {m: {k: s.token_span(k)[1] * s.embed_dim for k in set(arrays.keys[m]) if k is not None} for m, s in batches.stores.items()}
    delivered = repeated = 0
    for s in range(0, len(order), size):
        for m, keys in arrays.keys.items():
            batch = [keys[i] for i in order[s : s + size] if keys[i] is not None]
            delivered += sum(rows[m][k] for k in batch)
            repeated += sum(rows[m][k] for k in batch) - sum(rows[m][k] for k in set(batch))
    return repeated / delivered


def first_batch(batches):
    """(the first batch of the shuffled epoch 0 as StoreBatches orders it, made in this thread; its samples).

    Not through the prefetching iterator, which would start `prefetch` batches ahead only to drop them.
    """
    arrays = batches.split_arrays("train")
    order = batches._order(arrays, shuffle=True, epoch=0)[: batches.config.batch_size]
    return batches._batch(arrays, order), order


def reduced(batch, max_tokens: int, fp16: bool):
    """`batch` (full rows) with every modality's longer rows averaged as `fusion --max-tokens` averages them
    (`fp16`: rounded as the reduced arrays store them)."""
    from dataclasses import replace

    from fusion.batch import ModalityBatch
    from fusion.data import _pad

    def rows(f):
        return [torch.from_numpy(f.x[i, :n].numpy()) if n else None for i, n in enumerate(f.mask.sum(1).tolist())]

    def rounded(f: ModalityBatch) -> ModalityBatch:
        return ModalityBatch(x=f.x.half(), mask=f.mask, present=f.present) if fp16 else f

    return replace(batch, features={m: rounded(_pad(rows(f), f.x.shape[-1], max_tokens)) for m, f in batch.features.items()})


def same_batch(a, b) -> bool:
    """Equal values and masks (not dtypes: `before` makes float32 batches of the same numbers), over the width both
    batches have: reduced arrays pad every batch to max_tokens rows, with zeros and False beyond the rows."""

    def same(fa, fb) -> bool:
        w = min(fa.x.shape[1], fb.x.shape[1])
        wider = fa if fa.x.shape[1] > w else fb
        return (torch.equal(fa.x[:, :w].float(), fb.x[:, :w].float()) and torch.equal(fa.mask[:, :w], fb.mask[:, :w])
                and not wider.mask[:, w:].any() and not wider.x[:, w:].any())  # fmt: skip

    return a.sample_ids == b.sample_ids and all(same(a.features[m], b.features[m]) for m in MODALITIES)


def sample_bytes(batches) -> dict[str, int]:
    """Train sample id -> the stored fp16 bytes of its per-token rows, all modalities."""
    arrays = batches.split_arrays("train")
    size = {m: {k: s.token_span(k)[1] * s.embed_dim * 2 for k in set(arrays.keys[m]) if k is not None} for m, s in batches.stores.items()}
    return {i: sum(size[m][keys[j]] for m, keys in arrays.keys.items() if keys[j] is not None) for j, i in enumerate(arrays.sample_ids)}


def epoch(batches, epoch_no: int) -> tuple[float, int, int]:
    """(seconds, samples, per-token bytes) of one shuffled train epoch, every batch materialised."""
    stored = sample_bytes(batches)
    t0 = time.perf_counter()
    n = nbytes = 0
    for batch in batches("train", shuffle=True, epoch=epoch_no):
        n += len(batch)
        nbytes += sum(stored[i] for i in batch.sample_ids)  # the samples' stored rows, whatever the batch holds after averaging
    return time.perf_counter() - t0, n, nbytes


# -- the model ----------------------------------------------------------------------------------------


def model_rate(batches, steps: int, batch_size: int, seed: int) -> dict:
    """Training-step samples/s of the cross-attention fusion model at these shapes, and its FLOPs per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusion.run import build_model
    from fusion.train import TrainConfig, make_optimizer, masked_mse, seed_everything

    seed_everything(seed)
    arrays = batches.split_arrays("train")
    order = np.random.default_rng([seed, 99]).permutation(len(arrays.sample_ids))
    ready = [batches._batch(arrays, order[i * batch_size : (i + 1) * batch_size]) for i in range(steps + 1)]
    ready = [b for b in ready if len(b)]
    ready = [b for b in ready if len(b) == batch_size] or ready
    model = build_model(batches, "cross-attention", {})
    config = TrainConfig()
    optimizer = make_optimizer(model, config)
    model.train()

    def step(batch) -> None:  # fusion.train.train's loop body
        pred = model(batch.features)  # (b, t)
        loss = masked_mse(pred.float(), batch.targets.float(), batch.target_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:  # also the warm-up step
        step(ready[0])
    flops_per_sample = counter.get_total_flops() / len(ready[0])
    times = []
    for batch in ready[1:] or ready:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    n = sum(len(b) for b in ready[1:] or ready)
    tokens = {m: float(ready[0].features[m].mask.sum(1).float().mean()) for m in MODALITIES}
    return {"config": model.config.to_dict(), "params": sum(p.numel() for p in model.parameters()),
            "step_seconds": times, "samples_per_s": n / sum(times), "flops_per_sample": flops_per_sample,
            "mean_tokens_per_sample": tokens, "batch_size": len(ready[0])}  # fmt: skip


# -- store layouts ------------------------------------------------------------------------------------

LAYOUTS = {  # name -> (inner chunk KiB, shard MiB or None, codecs); "store" is what embedcache writes by default
    "store: crc32c, 1 MiB chunks in 32 MiB shards": (1024, 32, "crc"),
    "--token-codec lz4: lz4+bitshuffle, crc32c": (1024, 32, "lz4-crc"),
    "no crc32c either": (1024, 32, "none"),
    "256 KiB chunks": (256, 32, "crc"),
    "unsharded 1 MiB chunks": (1024, None, "crc"),
}


def _codecs(kind: str):
    from zarr.codecs import BloscCodec, Crc32cCodec

    lz4 = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    return {"lz4-crc": (lz4, Crc32cCodec()), "crc": (Crc32cCodec(),), "none": ()}[kind]


def layout_reads(work: Path, store_path: str, batch_size: int, seed: int, evicted: bool) -> dict:
    """MB/s of one zarr call per batch of records on the RNA rows stored each LAYOUTS way, cold and warm."""
    import asyncio

    import zarr
    from zarr.core.sync import sync

    from embedcache import open_store

    store = open_store(store_path)
    flat, offsets, lengths = store.token_arrays()
    dim = flat.shape[1]
    order = np.random.default_rng(seed).permutation(len(offsets))
    spans = [(int(offsets[i]), int(lengths[i])) for i in order]
    nbytes = int(sum(n for _, n in spans)) * dim * 2
    out = {}
    for name, (chunk_kb, shard_mb, codecs) in LAYOUTS.items():
        path = work / "layouts" / f"{chunk_kb}-{shard_mb}-{codecs}.zarr"
        chunk = max(1, chunk_kb * 1024 // (dim * 2))
        if not path.exists():
            shards = None if shard_mb is None else (chunk * max(1, round(shard_mb * 1024 / chunk_kb)), dim)
            arr = zarr.create_array(str(path), shape=flat.shape, chunks=(chunk, dim), shards=shards, dtype="float16", compressors=_codecs(codecs))
            arr[:] = flat
        array = zarr.open_array(str(path), mode="r")._async_array

        async def read(batch):
            return await asyncio.gather(*(array.getitem(slice(o, o + n)) for o, n in batch))

        res = {"file_bytes": sum(p.stat().st_size for p in _files([path]))}
        for temp in ("cold", "warm"):
            res[f"resident_{temp}"] = evict([path]) if temp == "cold" else None
            t0 = time.perf_counter()
            for s in range(0, len(spans), batch_size):
                sync(read(spans[s : s + batch_size]))
            res[f"{temp}_mb_s"] = nbytes / 1e6 / (time.perf_counter() - t0)
        out[name] = res
    return out


# -- run -----------------------------------------------------------------------------------------------


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--n-genes", type=int, default=200, help="genes (~8.5 transcripts = samples each; 200 genes ~ 4.4 GB of rows, "
                   "written three times: default and lz4 stores, memmap). Fewer genes make batches repeat a gene's DNA, "
                   "which the stream paths read once: 31%% of delivered rows at 30 genes, 7%% at 200")
    p.add_argument("--quick", action="store_true", help="8 genes, no layout table, 2 model steps (~1 min)")
    p.add_argument("--dna-encoder", choices=("nt", "enformer"), default="nt", help="DNA rows: NT-v2 (1024 x 2,000) or Enformer (3072 x 896)")
    p.add_argument("--token-scale", type=float, default=1.0, help="multiply every token count (tests: 0.02)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per loader batch")
    p.add_argument("--repeats", type=int, default=1, help="passes over every loader (cold + warm epoch each), alternating; medians reported")
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {','.join(LOADERS)}")
    p.add_argument("--token-pool", type=int, default=8, help="rows averaged per stored row in the stream-pooled case (embedcache build --token-pool)")
    p.add_argument("--max-tokens", type=int, default=512, help="rows per modality after averaging in the stream-max-tokens case "
                   "(fusion --max-tokens; 512 in examples/isoformer/recipe.toml)")
    p.add_argument("--no-layouts", action="store_true", help="skip the store-layout table")
    p.add_argument("--model-steps", type=int, default=3, help="timed training steps of the model (after one counted for FLOPs)")
    p.add_argument("--model-batch", type=int, default=8, help="samples per training step of the model (CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the data set here (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--measure-default-malloc", metavar="WAY", choices=LOADERS,
                   help="(used by the *-default-malloc rows) measure read path WAY on the data set in --workdir with glibc's "
                        "default malloc thresholds and print its figures as JSON; run with GLIBC_TUNABLES set (see DEFAULT_MALLOC)")
    return p


def run(args: argparse.Namespace) -> dict | None:
    if args.measure_default_malloc:
        return _measure_default_malloc(args)
    if args.quick:
        args.n_genes, args.no_layouts, args.model_steps = min(args.n_genes, 8), True, min(args.model_steps, 2)
    unknown = sorted(set(args.loaders.split(",")) - set(LOADERS))
    if unknown:
        raise SystemExit(f"bench_fusion_data.py: unknown --loaders {unknown}; expected a subset of {list(LOADERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with work_directory(args.workdir, "bench_fusion_data_") as work:
        return _run(args, work)


def _run(args: argparse.Namespace, work: Path) -> dict:
    import zarr

    from embedcache import open_store
    from embedcache.heap import keep_freed_memory

    started = time.perf_counter()
    # what StreamedTokens sets when the first streamed loader opens, set before any row is timed: every row runs
    # under the same malloc thresholds (process-wide, they cannot be unset)
    heap = keep_freed_memory()
    machine = machine_info(zarr=zarr.__version__, zarrs=_version("zarrs"), numcodecs=_version("numcodecs"), keep_freed_memory=heap)
    print(f"== machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB RAM; torch "
          f"{machine['torch']} ({torch.get_num_threads()} threads), zarr {machine['zarr']}, zarrs {machine['zarrs']}; "
          f"malloc keeps freed chunk buffers (embedcache.heap): {'yes' if heap else 'no'}; "
          f"load average {machine['load_average_at_start']:.2f} (other work shares these cores: compare within this run)")  # fmt: skip
    setup = data_setup(args)
    shapes = setup.shapes
    prepared, stores, setup_s = make_data(work, setup, print)
    memmaps = write_memmaps(work, stores)
    pooled = write_pooled(work, stores, args.token_pool)
    dims = shapes.dims()
    sizes = {}
    for m, path in stores.items():
        s = open_store(path)
        rows = int(s._length.sum())
        sizes[m] = {"records": len(s), "dim": dims[m], "rows_per_record": rows / len(s), "rows_mb": rows * dims[m] * 2 / 1e6,
                    "file_mb": sum(p.stat().st_size for p in _files([Path(path) / "tokens"])) / 1e6,
                    "lz4_file_mb": sum(p.stat().st_size for p in _files([lz4_path(path) / "tokens"])) / 1e6}  # fmt: skip
        print(f"  {m:8s} {len(s):5d} records x {rows / len(s):6.0f} rows x {dims[m]} fp16 = {sizes[m]['rows_mb']:7.1f} MB "
              f"of rows, {sizes[m]['file_mb']:7.1f} MB of chunk files ({sizes[m]['lz4_file_mb']:.1f} MB with --token-codec lz4)")  # fmt: skip
    print(f"  setup {setup_s:.0f} s; lengths: {json.dumps(asdict(shapes))}")
    token_dirs = [Path(p) / "tokens" for p in stores.values()]

    # raw disk, then every loader, cold then warm, on the same files
    raw = {}
    for temp in ("cold", "warm"):
        resident = evict(token_dirs) if temp == "cold" else resident_fraction(token_dirs)
        t0 = time.perf_counter()
        nbytes = raw_read(token_dirs)
        raw[temp] = {"mb_s": nbytes / 1e6 / (time.perf_counter() - t0), "resident_before": resident}
    print(f"== raw read of the chunk files: cold {raw['cold']['mb_s']:,.0f} MB/s (resident before "
          f"{raw['cold']['resident_before']:.0%}), warm {raw['warm']['mb_s']:,.0f} MB/s")  # fmt: skip

    loaders: dict[str, dict] = {}
    reference_loader = open_loader("memmap", prepared, stores, memmaps, args.batch_size, args.seed)
    repeated = repeated_share(reference_loader)
    print(f"  {repeated:.0%} of the rows an epoch delivers repeat a record already in the same batch (DNA of one gene): "
          f"the stream paths read those once, memmap and memory copy them")  # fmt: skip
    ways = [w for w in args.loaders.split(",") if w != "zarrs" or zarrs_store(stores["rna"]) is not None]
    if len(ways) < len(args.loaders.split(",")):
        print("  zarrs: not installed (pip install 'embedcache[zarrs]'): skipped")
    if not heap and any(w.endswith(DEFAULT_MALLOC_SUFFIX) for w in ways):  # malloc was left alone here too: they would repeat rows
        ways = [w for w in ways if not w.endswith(DEFAULT_MALLOC_SUFFIX)]
        print("  *-default-malloc: skipped (not glibc, or malloc tuned by the environment: every row already runs so)")
    if any(averages(w) for w in ways):  # the reduced arrays, made once (as the first run of an ablation makes them)
        t0 = time.perf_counter()
        open_loader("stream-max-tokens", prepared, stores, memmaps, args.batch_size, args.seed, pooled, args.max_tokens)
        print(f"  reduced every store to {args.max_tokens} rows per record once: {time.perf_counter() - t0:.1f} s")
    files = evictable_files(stores, memmaps, pooled)
    width = max(map(len, ways))
    for rep in range(args.repeats):
        for way in ways if rep % 2 == 0 else ways[::-1]:  # alternate the order: drift in the machine's load spreads evenly
            if way.endswith(DEFAULT_MALLOC_SUFFIX):
                res = measure_in_child(way.removesuffix(DEFAULT_MALLOC_SUFFIX), args, work)
            else:
                res = measure(way, args, prepared, stores, memmaps, pooled, files, reference_loader)
            loaders.setdefault(way, {"runs": []})["runs"].append(res)
            print(f"  {way:{width}s} cold {res['cold']['samples_per_s']:7.1f} samples/s {res['cold']['mb_s']:6.0f} MB/s | warm "
                  f"{res['warm']['samples_per_s']:7.1f} samples/s {res['warm']['mb_s']:6.0f} MB/s  (resident before "
                  f"{res['resident_before']:.0%}; opened in {res['open_s']:.1f} s)", flush=True)  # fmt: skip
    for way, r in loaders.items():
        for temp in ("cold", "warm"):
            runs = [x[temp] for x in r["runs"]]
            r[temp] = {"samples": runs[0]["samples"], **{k: statistics.median(x[k] for x in runs) for k in ("samples_per_s", "mb_s")}}

    layouts = None
    if not args.no_layouts:
        print("== store layouts (RNA rows only, one zarr call per batch, no collation)")
        layouts = layout_reads(work, stores["rna"], args.batch_size, args.seed, True)
        for name, r in layouts.items():
            print(f"  {name:62s} cold {r['cold_mb_s']:5.0f} MB/s, warm {r['warm_mb_s']:5.0f} MB/s, {r['file_bytes'] / 1e6:6.1f} MB of files")

    print(f"== model: cross-attention fusion (FusionModelConfig defaults), batch {args.model_batch}, {args.model_steps} timed steps")
    h200 = dict(GPU_BF16_PEAK_TFLOPS)["H200"] * 1e12
    models = {}
    model_inputs = {"full": "memmap", f"pooled x{args.token_pool}": "stream-pooled", f"max-tokens {args.max_tokens}": "stream-max-tokens"}

    def model_rows(way: str) -> str:  # the rows a read path's batches hold: the model_inputs key to compare it with
        return f"pooled x{args.token_pool}" if way == "stream-pooled" else f"max-tokens {args.max_tokens}" if averages(way) else "full"

    for rows, way in model_inputs.items():
        batches = open_loader(way, prepared, stores, memmaps, args.model_batch, args.seed, pooled, args.max_tokens)
        model = models[rows] = model_rate(batches, args.model_steps, args.model_batch, args.seed)
        model["h200_bound_samples_per_s"] = h200 / model["flops_per_sample"]
        print(f"  {rows} rows: {model['params']:,} parameters; {model['flops_per_sample'] / 1e9:.2f} GFLOP per sample and step "
              f"(tokens per sample {', '.join(f'{m} {t:.0f}' for m, t in model['mean_tokens_per_sample'].items())}); "
              f"CPU {model['samples_per_s']:.2f} samples/s; an H200 at its data-sheet bf16 peak: at most "
              f"{model['h200_bound_samples_per_s']:,.0f} samples/s", flush=True)  # fmt: skip

    # the table
    print()
    rows_mb = sum(s["rows_mb"] for s in sizes.values())
    print(f"== per-token loaders, one shuffled train epoch (batch {args.batch_size}, median of {args.repeats}); {rows_mb:,.0f} MB of rows in the stores; "
          f"MB/s = stored fp16 rows of the samples delivered; raw = chunk-file bytes")  # fmt: skip
    print("| read path | cold samples/s | cold MB/s | % of raw cold | warm samples/s | warm MB/s | % of raw warm "
          "| x CPU model step (cold) | x H200 bound (cold) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| raw read of the chunk files | | {raw['cold']['mb_s']:,.0f} | 100% | | {raw['warm']['mb_s']:,.0f} | 100% | | |")
    for way, r in loaders.items():
        c, w = r["cold"], r["warm"]
        model = models[model_rows(way)]  # the model on the rows this path delivers
        print(f"| {way} | {c['samples_per_s']:,.1f} | {c['mb_s']:,.0f} | {c['mb_s'] / raw['cold']['mb_s']:.0%} | "
              f"{w['samples_per_s']:,.1f} | {w['mb_s']:,.0f} | {w['mb_s'] / raw['warm']['mb_s']:.0%} | "
              f"{c['samples_per_s'] / model['samples_per_s']:,.1f}x | {c['samples_per_s'] / model['h200_bound_samples_per_s']:.2g}x |")  # fmt: skip
    for rows, model in models.items():
        print(f"  model step on {rows} rows: CPU {model['samples_per_s']:.2f} samples/s here; H200 bound "
              f"{model['h200_bound_samples_per_s']:,.0f} samples/s ({model['flops_per_sample'] / 1e9:.2f} GFLOP per sample at "
              f"{h200 / 1e12:.0f} TFLOP/s, a ceiling no real step reaches)")  # fmt: skip
    notes = {
        "stream-default-malloc": "`stream` (and stream-2-workers-default-malloc: `stream-2-workers`) in a fresh process with glibc's "
                                 "default malloc thresholds, as before embedcache.heap: chunk buffers freed by a batch's reads go "
                                 "back to the kernel and are faulted in again",
        "stream-pooled": f"the same stores with every {args.token_pool} rows averaged at build (--token-pool); its ratios are to the model "
                         f"on pooled rows; its % of raw compares with the full stores' files",
        "stream-max-tokens": f"`stream` with longer rows averaged to {args.max_tokens} per batch (fusion --max-tokens; max-tokens-before: "
                             f"as before group_mean summed row gathers; stream-max-tokens-2-workers: in 2 DataLoader workers); MB/s counts the stored rows read; ratios are to the model on "
                             f"rows up to {args.max_tokens}",
        "recipe": f"RNA streamed, DNA and protein in RAM (loaded before the cold epoch, not counted in it), all averaged to "
                  f"{args.max_tokens} rows, as examples/isoformer/recipe.toml trains at IsoFormer scale; its MB/s and % of raw count "
                  f"the rows held in RAM too",
    }  # fmt: skip
    for way, note in notes.items():
        if way in loaders:
            print(f"  {way}: {note}")
    total = time.perf_counter() - started
    print(f"== took {total:.0f} s; load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    results = {"benchmark": "bench_fusion_data", "date": time.strftime("%Y-%m-%d"), "machine": machine, "setup": asdict(setup),
               "sizes": sizes, "raw": raw, "repeated_share": repeated, "loaders": loaders, "layouts": layouts, "model": models, "seconds": total,
               "load_average_at_end": os.getloadavg()[0],
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}  # fmt: skip
    write_json(args.json, results)
    return results


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main() -> None:
    run(create_parser().parse_args())


if __name__ == "__main__":
    main()
