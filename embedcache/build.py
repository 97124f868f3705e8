"""`embedcache build`: plan, embed only what the store lacks, and write it in committed groups."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from embedcache import __version__
from embedcache.alphabets import check_sequence
from embedcache.config import BuildConfig, content_key, fingerprint, fingerprint_fields
from embedcache.encoders import Encoder, load_encoder
from embedcache.errors import InputError, StoreError
from embedcache.inputs import Record, read_records, unique_records
from embedcache.store import (
    FORMAT,
    ContentResult,
    StoreWriter,
    check_fingerprint,
    create_store,
    open_writer,
    read_store_index,
    token_chunking,
)
from embedcache.embed import assemble, embed_batch, make_batches, plan_windows, resolve_overlap, to_numpy
from embedcache.windows import SequencePlan

Log = Callable[[str], None]


@dataclass
class BuildPlan:
    """What a build will do, before any model call. `--dry-run` prints it."""

    store: Path
    fingerprint: str
    n_records: int  # distinct input records
    n_unique: int  # distinct sequences among them
    already_stored: int  # records whose id is already in the store (same sequence)
    reused: int  # new records whose sequence the store already holds
    new_keys: list[str]  # sequences to embed, in the order they were first seen
    plans: dict[str, SequencePlan]  # per new key
    n_tokens: int  # content tokens to embed (after crops)
    n_windows: int
    n_cropped_sequences: int
    estimated_bytes: int  # added to the store (uncompressed; fp16 embeddings barely compress)
    embed_dim: int

    def describe(self) -> str:
        return "\n".join(
            [
                f"store: {self.store} (fingerprint {self.fingerprint})",
                f"records: {self.n_records} ({self.n_unique} unique sequences)",
                f"already stored: {self.already_stored} records; reusing stored sequences for {self.reused} new records",
                f"to embed: {len(self.new_keys)} sequences, {self.n_tokens:,} tokens in {self.n_windows} model windows",
                f"cropped on request: {self.n_cropped_sequences} sequences",
                f"estimated size added: {self.estimated_bytes / 1e6:,.1f} MB (embedding dim {self.embed_dim})",
            ]
        )


@dataclass
class BuildReport:
    plan: BuildPlan
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    committed_groups: int = 0
    summary: str = ""


def read_inputs(inputs: list[str | Path], id_column: str, sequence_column: str) -> list[Record]:
    if not inputs:
        raise InputError("no input files given")
    records = []
    for path in inputs:
        records.extend(read_records(path, id_column=id_column, sequence_column=sequence_column))
    return unique_records(records)


def _store_attrs(config: BuildConfig, encoder: Encoder, fp: str, fp_fields: dict, overlap: int) -> dict:
    chunk, shard = token_chunking(encoder.embed_dim, np.dtype(config.dtype).itemsize, config.shard_mb)
    return {
        "format": FORMAT,
        "schema_version": fp_fields["schema_version"],
        "toolkit_version": __version__,
        "fingerprint": fp,
        "fingerprint_fields": fp_fields,
        "config": config.to_dict(),
        "provenance": encoder.provenance(),
        "embed_dim": encoder.embed_dim,
        "pooling": config.pooling,
        "windowing": {"window": encoder.window, "overlap": overlap, "crop": config.crop, "max_length": config.max_length},
        "source_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[encoder.precision],
        "stored_dtype": {"tokens": config.dtype, "pooled": "float32"},
        "layout": {"token_chunk": chunk, "token_shard": shard},
    }


def plan_build(
    config: BuildConfig, records: list[Record], encoder: Encoder, store_path: Path
) -> tuple[BuildPlan, dict, list[tuple[str, str]], dict[str, str], dict[str, np.ndarray]]:
    """Validate every record, key it, compare with the store, and plan windows for new sequences.

    Returns the plan, the store attrs, the records to add as (id, key), residues by key, and
    content tokens by new key.
    """
    overlap = resolve_overlap(config, encoder)
    if not encoder.fixed_window and not 0 <= overlap < encoder.window:
        raise InputError(f"--overlap {overlap} must be in 0..{encoder.window - 1} for a window of {encoder.window}")
    fp_fields = fingerprint_fields(config, encoder.provenance(), overlap)
    fp = fingerprint(fp_fields)
    attrs = _store_attrs(config, encoder, fp, fp_fields, overlap)

    residues: dict[str, str] = {}
    keyed: list[tuple[str, str]] = []
    for r in records:
        seq = check_sequence(r.sequence, encoder.alphabet, record=r.id, source=r.source, encoder=config.encoder)
        key = content_key(seq)
        residues.setdefault(key, seq)
        keyed.append((r.id, key))
    sources = {r.id: r.source for r in records}

    stored_keys: dict[str, int] = {}
    stored_records: dict[str, int] = {}
    if (store_path / "zarr.json").exists():
        store_attrs, stored_keys, stored_records = read_store_index(store_path)
        check_fingerprint(store_path, store_attrs, fp, fp_fields)
    inverse_keys = {i: k for k, i in stored_keys.items()}
    to_add, already = [], 0
    for rid, key in keyed:
        if rid in stored_records:
            if inverse_keys[stored_records[rid]] != key:
                raise InputError(
                    f"{sources[rid]}: record {rid!r} is already in store {str(store_path)!r} with a different "
                    f"sequence; ids must name one sequence (rename the record or use a new store)"
                )
            already += 1
        else:
            to_add.append((rid, key))
    new_keys = list(dict.fromkeys(k for _, k in to_add if k not in stored_keys))
    reused = sum(1 for _, k in to_add if k in stored_keys)

    first_source = {}
    for rid, key in keyed:
        first_source.setdefault(key, (rid, sources[rid]))
    plans, token_ids = {}, {}
    for key in new_keys:
        ids = encoder.tokenize(residues[key])
        if len(ids) == 0:
            rid, source = first_source[key]
            raise InputError(
                f"{source}: record {rid!r}: the tokenizer of {config.model!r} turned {residues[key][:30]!r} "
                f"into no tokens (characters outside its vocabulary?)"
            )
        try:
            plans[key] = plan_windows(encoder, len(ids), config)
        except ValueError as e:
            rid, source = first_source[key]
            raise InputError(f"{source}: record {rid!r}: {e}") from e
        token_ids[key] = ids

    n_out = sum(_n_output_rows(plans[k], encoder, config) for k in new_keys) if config.tokens else 0
    itemsize = np.dtype(config.dtype).itemsize
    estimated = n_out * encoder.embed_dim * itemsize + len(to_add) * encoder.embed_dim * 4 * (config.pooling != "none")
    estimated += sum(len(residues[k]) for k in new_keys)
    plan = BuildPlan(
        store=store_path,
        fingerprint=fp,
        n_records=len(records),
        n_unique=len(residues),
        already_stored=already,
        reused=reused,
        new_keys=new_keys,
        plans=plans,
        n_tokens=sum(p.n_tokens for p in plans.values()),
        n_windows=sum(len(p.windows) for p in plans.values()),
        n_cropped_sequences=sum(p.n_cropped > 0 for p in plans.values()),
        estimated_bytes=estimated,
        embed_dim=encoder.embed_dim,
    )
    return plan, attrs, to_add, residues, token_ids


def _n_output_rows(plan: SequencePlan, encoder: Encoder, config: BuildConfig) -> int:
    n = encoder.n_output_rows(plan.n_tokens)
    return min(n, config.token_bins) if config.token_bins else n


class BackgroundWriter:
    """Commits groups from a thread so that writing overlaps model compute.

    A group is flushed once it holds a shard's worth of token rows (or RECORD rows when per-token
    output is off), so each flush writes whole shards.
    """

    def __init__(self, writer: StoreWriter, ids_by_key: dict[str, list[str]], flush_rows: int, flush_sequences: int):
        self.writer = writer
        self.ids_by_key = ids_by_key
        self.flush_rows, self.flush_sequences = flush_rows, flush_sequences
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.groups = 0
        self.thread = threading.Thread(target=self._run, name="embedcache-writer", daemon=True)
        self.thread.start()

    def put(self, result: ContentResult) -> None:
        if self.error is not None:
            raise StoreError(f"the store writer failed: {self.error}") from self.error
        self.queue.put(result)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise StoreError(f"the store writer failed: {self.error}") from self.error

    def _flush(self, buffer: list[ContentResult]) -> None:
        records = [(rid, r.key) for r in buffer for rid in self.ids_by_key[r.key]]
        self.writer.commit(buffer, records)
        self.groups += 1

    def _run(self) -> None:
        buffer: list[ContentResult] = []
        rows = 0
        try:
            while (item := self.queue.get()) is not None:
                buffer.append(item)
                rows += len(item.tokens) if item.tokens is not None else 0
                if rows >= self.flush_rows or len(buffer) >= self.flush_sequences:
                    self._flush(buffer)
                    buffer, rows = [], 0
            if buffer:
                self._flush(buffer)
        except BaseException as e:  # handed to the main thread on its next put/close
            self.error = e
            while self.queue.get() is not None:  # drain so the producer never blocks
                pass


def build(
    config: BuildConfig,
    inputs: list[str | Path],
    store: str | Path,
    *,
    id_column: str = "id",
    sequence_column: str = "sequence",
    dry_run: bool = False,
    progress: bool = True,
    log: Log = print,
) -> BuildReport:
    """Embed the records of `inputs` into `store`, computing only sequences it does not hold yet."""
    store_path = Path(store)
    records = read_inputs(list(inputs), id_column, sequence_column)
    encoder = load_encoder(config.encoder, config.encoder_settings())
    plan, attrs, to_add, residues, token_ids = plan_build(config, records, encoder, store_path)
    if dry_run:
        log(plan.describe())
        return BuildReport(plan=plan, summary="dry run: nothing computed")

    started = time.time()
    if not (store_path / "zarr.json").exists():
        create_store(
            store_path,
            attrs=attrs,
            embed_dim=encoder.embed_dim,
            pooled=config.pooling != "none",
            tokens=config.tokens,
            token_dtype=config.dtype,
            shard_mb=config.shard_mb,
        )
    writer = open_writer(store_path)  # trims leftovers of an interrupted build
    writer.set_status("incomplete")
    stored_keys = set(writer.keys)
    reused = [(rid, k) for rid, k in to_add if k in stored_keys]
    if reused:
        writer.commit([], reused)
    ids_by_key: dict[str, list[str]] = {}
    for rid, k in to_add:
        if k not in stored_keys:
            ids_by_key.setdefault(k, []).append(rid)

    groups, n_tokens = _embed(config, encoder, plan, residues, token_ids, writer, ids_by_key, progress)
    seconds = time.time() - started
    rate = n_tokens / seconds if seconds > 0 else 0.0
    entry = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [str(p) for p in inputs],
        "records": plan.n_records,
        "new_sequences": len(plan.new_keys),
        "already_stored": plan.already_stored,
        "reused_sequences": plan.reused,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(rate, 1),
        "device": str(encoder.device),
        "precision": encoder.precision,
        "toolkit_version": __version__,
    }
    writer.set_status("complete", builds=[*writer.build.attrs.get("builds", []), entry])
    summary = (
        f"{len(plan.new_keys)} new, {plan.already_stored + plan.reused} already stored "
        f"({plan.reused} of them under new ids); {n_tokens:,} tokens in {seconds:.1f} s -> {store_path}"
    )
    log(summary)
    return BuildReport(plan=plan, seconds=seconds, tokens_per_second=rate, committed_groups=groups, summary=summary)


def _embed(
    config: BuildConfig,
    encoder: Encoder,
    plan: BuildPlan,
    residues: dict[str, str],
    token_ids: dict[str, np.ndarray],
    writer: StoreWriter,
    ids_by_key: dict[str, list[str]],
    progress: bool,
) -> tuple[int, int]:
    """Run the model over all windows of new sequences; hand each finished sequence to the writer."""
    items = []
    for key in plan.new_keys:
        p = plan.plans[key]
        for w, (s, e) in enumerate(p.windows):
            items.append((encoder.cost(e - s), e - s, (key, w)))
    batches = make_batches(items, config.max_tokens, encoder.equal_length_batches)
    flush_rows = writer.shard_tokens or 0
    background = BackgroundWriter(writer, ids_by_key, flush_rows=max(flush_rows, 1), flush_sequences=4096)
    pending: dict[str, list] = {k: [None] * len(plan.plans[k].windows) for k in plan.new_keys}
    n_tokens, started = 0, time.time()
    bar = tqdm(total=len(plan.new_keys), unit="seq", desc="embedding", disable=not progress, dynamic_ncols=True)
    try:
        for batch in batches:
            windows = []
            for key, w in batch:
                p = plan.plans[key]
                s, e = p.windows[w]
                windows.append(token_ids[key][p.keep_start + s : p.keep_start + e])
            for (key, w), out in zip(batch, embed_batch(encoder, windows)):
                pending[key][w] = out
                if all(o is not None for o in pending[key]):
                    outs = pending.pop(key)
                    p = plan.plans[key]
                    background.put(_assemble(key, residues[key], p, outs, config))
                    n_tokens += p.n_tokens
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{n_tokens / max(time.time() - started, 1e-9):,.0f}", refresh=False)
    finally:
        bar.close()
        background.close()
    return background.groups, n_tokens


def _assemble(key: str, residues: str, plan: SequencePlan, outs: list, config: BuildConfig) -> ContentResult:
    tokens, pooled = assemble(plan, outs, config)
    return ContentResult(
        key=key,
        residues=residues,
        tokens=to_numpy(tokens, config.dtype) if config.tokens else None,
        pooled=None if pooled is None else to_numpy(pooled, "float32"),
        n_input_tokens=plan.n_input_tokens,
        n_cropped=plan.n_cropped,
        n_windows=len(plan.windows),
    )
