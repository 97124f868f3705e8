"""`embedcache`: build, inspect and verify embedding stores. Parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys

from cli.common import HelpFormatter, add_debug_flag, run_main
from embedcache.build import build
from embedcache.config import POOLINGS, TOKEN_DTYPES, BuildConfig
from embedcache.encoders import ENCODERS
from embedcache.encoders.base import PRECISIONS
from embedcache.encoders.hf import ATTN_IMPLEMENTATIONS
from embedcache.errors import StoreError
from embedcache.store import TOKEN_CODECS
from embedcache.location import parse_storage_options
from embedcache.reader import describe, open_store
from embedcache.tiny_models import TINY_MODELS
from embedcache.windows import CROPS


def _encoders_help() -> str:
    return "; ".join(f"{n}: {e.description} (default model: {e.default_model or 'none, --model required'})" for n, e in ENCODERS.items())


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option", action="append", metavar="KEY=VALUE", dest="storage_options",
        help="option for a remote store's filesystem (repeatable), e.g. endpoint_url=http://127.0.0.1:9000, anon=true, "
        "client_kwargs.region_name=eu-west-1; credentials also come from the standard environment (AWS_ACCESS_KEY_ID, ...)",
    )


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedcache",
        description="Run a pretrained sequence encoder once and keep its embeddings in a verified, "
        "content-addressed Zarr store.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build",
        help="embed sequences into a store (only those it does not hold yet)",
        description="Embed the records of INPUT files into STORE. Sequences the store already holds are "
        "not computed again; an interrupted build resumes when run again. Encoders: " + _encoders_help(),
        formatter_class=HelpFormatter,
    )
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="FASTA (plain or .gz), CSV, TSV or Parquet files")
    b.add_argument("-o", "--out", required=True, metavar="STORE", help="store: a directory, or a URL (s3://bucket/x.zarr, gs://, az://, memory://, file://); created if missing")
    b.add_argument("--encoder", required=True, help=f"one of: {', '.join(ENCODERS)}")
    b.add_argument("--model", help="hub id or local directory (default: the encoder's default model)")
    b.add_argument("--revision", help="hub revision: branch, tag or commit (default: the default branch)")
    b.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code (NT v2 needs it)")
    b.add_argument("--layer", dest="layers", type=int, nargs="+", default=[-1], metavar="I", help="hidden states to keep, one or more (as ESM's --repr_layers 0 32 33): -1 last layer, 0 embeddings, i after block i. Several are computed in one forward pass and stored on the store's layer axis (select one with open_store(..., layer=I), xarray's .sel(layer=I) or fusion's --layer MODALITY=I); give them after the INPUT files")
    b.add_argument("--window", type=int, help="content tokens per model call (Enformer: input window in bp, default 196608); default: the model's maximum")
    b.add_argument("--overlap", type=int, help="tokens shared by consecutive windows of a long sequence (default: window // 4)")
    b.add_argument("--crop", choices=CROPS, help="crop long sequences instead of windowing them: left removes the start (keeps the 3' end), right the end, center both; recorded in the store")
    b.add_argument("--max-length", type=int, help="tokens kept by --crop (default: the window)")
    b.add_argument("--pooling", choices=POOLINGS, default="mean", help="mean: over real tokens only (no special tokens, no padding); cls: the leading special token; center: mean of the central --pool-bins rows; none")
    b.add_argument("--pool-bins", type=int, help="rows averaged by --pooling center (e.g. Enformer bins around the TSS)")
    b.add_argument("--no-tokens", dest="tokens", action="store_false", help="store pooled vectors only, no per-token embeddings (default: per-token embeddings are stored)")
    b.add_argument("--token-bins", type=int, help="keep only the central K per-token rows (Enformer: 896 bins x 3072 are 5.5 MB per gene in fp16)")
    b.add_argument("--token-pool", type=int, help="store the mean of every K consecutive per-token rows (after --token-bins): K-fold less per-token data to store and stream; recorded in the store and its fingerprint")
    b.add_argument("--dtype", choices=TOKEN_DTYPES, default="float16", help="stored per-token dtype (pooled is always float32)")
    b.add_argument("--precision", choices=PRECISIONS, default="auto", help="compute precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    b.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, help="transformers attention backend, recorded in the store (default: sdpa where the model supports it, else its own); an unsupported choice is an error")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    b.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per batch (batches are length-sorted)")
    b.add_argument("--shard-mb", type=float, default=32.0, help="target size of one per-token shard file")
    b.add_argument("--token-codec", choices=tuple(TOKEN_CODECS), default="none", help="compression of per-token chunks: none (the default: fp16 embeddings compress by under 10%% and fusion reads them faster raw) or lz4 (blosc lz4 + bitshuffle); both checksum every chunk. Layout only: not part of the fingerprint")
    b.add_argument("--unit-mb", type=float, default=256.0, help="per-token data of one work unit (whole shards): the grain of scheduling and of resume")
    b.add_argument("--scheduler", metavar="WHERE", help="run units on Dask: local (a LocalCluster, one worker per GPU or core), local:N (N worker processes), or tcp://HOST:PORT of a running scheduler (default: this process)")
    b.add_argument("--scheduler-file", metavar="FILE", help="attach to the Dask cluster described by this scheduler file (dask-jobqueue, SLURM, dask scheduler --scheduler-file)")
    b.add_argument("--alphabet", choices=("dna", "rna", "protein"), help="hf encoder: validate and upper-case residues (default: any text, unchanged)")
    b.add_argument("--id-column", default="id", help="id column of CSV/TSV/Parquet input")
    b.add_argument("--sequence-column", default="sequence", help="sequence column of CSV/TSV/Parquet input")
    b.add_argument("--dry-run", action="store_true", help="print the plan (counts, tokens, estimated size) and compute nothing")
    b.add_argument("--wait", action="store_true", help="if another build is writing the store, wait for it to finish instead of stopping")
    _add_storage_options(b)
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (default: a progress bar is shown)")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="summarise a store", description="Ids, counts, shapes, fingerprint, completeness and size of a store.")
    i.add_argument("store", metavar="STORE", help="store path or URL")
    _add_storage_options(i)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=run_info)

    v = sub.add_parser(
        "verify",
        help="check a store is complete and readable",
        description="Check the build finished, every id maps to data, and every shard reads back. "
        "Exits 2 naming each fault.",
    )
    v.add_argument("store", metavar="STORE", help="store path or URL")
    _add_storage_options(v)
    v.set_defaults(func=run_verify)

    t = sub.add_parser(
        "make-tiny-model",
        help="save a tiny random-initialised model of a real architecture (for demos and tests)",
        description="Build a toy-size model from the library's real config class and save it with "
        "save_pretrained to DIR, to use as --model DIR. Offline; random weights.",
    )
    t.add_argument("encoder", choices=list(TINY_MODELS), help="architecture")
    t.add_argument("directory", metavar="DIR")
    t.add_argument("--seed", type=int, default=0, help="initialisation seed")
    t.set_defaults(func=run_make_tiny_model)
    add_debug_flag(parser)
    return parser


def run_build(args: argparse.Namespace) -> int:
    config = BuildConfig.create(
        args.encoder,
        args.model,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        layers=tuple(args.layers),
        window=args.window,
        overlap=args.overlap,
        crop=args.crop,
        max_length=args.max_length,
        pooling=args.pooling,
        pool_bins=args.pool_bins,
        tokens=args.tokens,
        token_bins=args.token_bins,
        token_pool=args.token_pool,
        dtype=args.dtype,
        precision=args.precision,
        alphabet=args.alphabet,
        attn_implementation=args.attn_implementation,
        device=args.device,
        max_tokens=args.max_tokens,
        shard_mb=args.shard_mb,
        token_codec=args.token_codec,
        unit_mb=args.unit_mb,
    )
    build(
        config,
        args.inputs,
        args.out,
        storage_options=parse_storage_options(args.storage_options),
        wait=args.wait,
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
        id_column=args.id_column,
        sequence_column=args.sequence_column,
        dry_run=args.dry_run,
        progress=args.progress,
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    info = open_store(args.store, parse_storage_options(args.storage_options)).info()
    print(json.dumps(info, indent=2) if args.json else describe(info))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    store = open_store(args.store, parse_storage_options(args.storage_options))
    faults = store.verify()
    for f in faults:
        print(f"FAULT {f}", file=sys.stderr)
    if faults:
        raise StoreError(f"{len(faults)} fault(s) in {args.store}")
    print(f"ok: {args.store}: {len(store)} records, {store.committed.content} unique sequences, {store.n_commits} commits, every chunk verified")
    return 0


def run_make_tiny_model(args: argparse.Namespace) -> int:
    path = TINY_MODELS[args.encoder](args.directory, seed=args.seed)
    print(path)
    return 0


# True for builds: every finished batch is committed and a build skips what the store holds.
INTERRUPTED = "what was committed is kept: run the same command again to finish the build"


def main(argv: list[str] | None = None) -> int:
    return run_main(create_parser(), argv, interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
