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
from embedcache.lease import DEFAULT_TTL_S, WriterLease
from embedcache.location import Location, open_location
from embedcache.store import (
    FORMAT,
    SCHEMA_VERSION,
    ContentResult,
    StoreWriter,
    check_fingerprint,
    create_store,
    open_root,
    open_writer,
    read_index,
    store_state,
    token_chunking,
)
from embedcache.embed import assemble, make_batches, plan_windows, resolve_overlap, to_numpy
from embedcache.memory import MemoryGuard
from embedcache.windows import SequencePlan

Log = Callable[[str], None]


@dataclass
class BuildPlan:
    """What a build will do, before any model call. `--dry-run` prints it."""

    store: str  # path or URL
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
    chunk, shard = token_chunking(encoder.embed_dim * np.dtype(config.dtype).itemsize, config.shard_mb)
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
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


def _stored_index(location: Location, fp: str, fp_fields: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(content key -> row, record id -> content row) of the store's committed rows; empty when new."""
    if store_state(location) != "created":
        return {}, {}
    _, root = open_root(location, mode="r")
    store_attrs = dict(root.attrs["embedcache"])
    check_fingerprint(location.url, store_attrs, fp, fp_fields)
    if store_attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"store {location.url!r} has schema_version {store_attrs.get('schema_version')}, made by an older "
            f"embedcache: it can be read but not extended; build into a new store"
        )
    index = read_index(root, location.url, store_attrs)
    keys = {str(k): i for i, k in enumerate(index.content_keys.tolist()) if index.committed_content[i]}
    return keys, dict(zip(index.ids, index.content_index.tolist()))


def plan_build(
    config: BuildConfig, records: list[Record], encoder: Encoder, location: Location
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

    stored_keys, stored_records = _stored_index(location, fp, fp_fields)
    inverse_keys = {i: k for k, i in stored_keys.items()}
    to_add, already = [], 0
    for rid, key in keyed:
        if rid in stored_records:
            if inverse_keys[stored_records[rid]] != key:
                raise InputError(
                    f"{sources[rid]}: record {rid!r} is already in store {location.url!r} with a different "
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
        store=location.url,
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

    A group is flushed once it holds a shard's worth of token rows (or `flush_sequences` sequences
    when per-token output is off), so each flush writes whole shards. A write error (disk full,
    permission, an unreachable bucket) stops the build with one line naming the store and cause;
    what was committed before it stays, so running the same command again resumes.
    """

    def __init__(self, writer: StoreWriter, lease: WriterLease, ids_by_key: dict[str, list[str]], flush_rows: int,
                 flush_sequences: int):
        self.writer, self.lease = writer, lease
        self.ids_by_key = ids_by_key
        self.flush_rows, self.flush_sequences = flush_rows, flush_sequences
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.groups = 0
        self.thread = threading.Thread(target=self._run, name="embedcache-writer", daemon=True)
        self.thread.start()

    def _raise(self) -> None:
        if self.error is not None:
            raise StoreError(
                f"writing to store {self.writer.where!r} failed: {type(self.error).__name__}: {self.error}; "
                f"everything committed before it is kept: run the same command again to resume"
            ) from self.error

    def put(self, result: ContentResult) -> None:
        self._raise()
        self.queue.put(result)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _flush(self, buffer: list[ContentResult]) -> None:
        self.lease.check()
        records = [(rid, r.key) for r in buffer for rid in self.ids_by_key[r.key]]
        self.writer.commit(buffer, records)
        self.groups += 1

    def _run(self) -> None:
        buffer: list[ContentResult] = []
        rows = 0
        done = False
        try:
            while (item := self.queue.get()) is not None:
                buffer.append(item)
                rows += len(item.tokens) if item.tokens is not None else 0
                if rows >= self.flush_rows or len(buffer) >= self.flush_sequences:
                    self._flush(buffer)
                    buffer, rows = [], 0
            done = True  # the producer's end-of-input sentinel was consumed
            if buffer:
                self._flush(buffer)
        except BaseException as e:  # handed to the main thread on its next put/close
            self.error = e
            while not done:  # drain until the producer's sentinel, so it never blocks on a full queue
                done = self.queue.get() is None


def build(
    config: BuildConfig,
    inputs: list[str | Path],
    store: str | Path,
    *,
    storage_options: dict | None = None,
    id_column: str = "id",
    sequence_column: str = "sequence",
    dry_run: bool = False,
    wait: bool = False,
    lease_ttl_s: float = DEFAULT_TTL_S,
    progress: bool = True,
    log: Log = print,
) -> BuildReport:
    """Embed the records of `inputs` into `store` (a path or URL), computing only sequences it lacks.

    The build holds the store's writer lease throughout: a second build into the same store is
    refused naming this one, or waits (`wait=True`).
    """
    location = Location.of(store, storage_options)
    records = read_inputs(list(inputs), id_column, sequence_column)
    # A dry run plans from the tokenizer and config alone: no weights are loaded (or needed).
    encoder = load_encoder(config.encoder, config.encoder_settings(), weights=not dry_run)
    plan, attrs, to_add, residues, token_ids = plan_build(config, records, encoder, location)
    if dry_run:
        log(plan.describe())
        return BuildReport(plan=plan, summary="dry run: nothing computed")

    lease = WriterLease(open_location(location, read_only=False), location.url, ttl_s=lease_ttl_s, wait=wait, log=log)
    with lease:
        if wait:  # the build we waited for may have stored some of our sequences: plan again
            plan, attrs, to_add, residues, token_ids = plan_build(config, records, encoder, location)
        return _write_build(config, inputs, location, lease, encoder, plan, attrs, to_add, residues, token_ids, progress, log)


def _write_build(config, inputs, location, lease, encoder, plan, attrs, to_add, residues, token_ids, progress, log) -> BuildReport:
    started = time.time()
    state = store_state(location)
    if state == "foreign":
        raise StoreError(f"{location.url!r} exists and holds other data, not an embedcache store; choose another -o")
    if state != "created":
        if state == "partial":
            log(f"{location.url}: a store creation was interrupted before; creating it again")
        create_store(
            location,
            attrs=attrs,
            embed_dim=encoder.embed_dim,
            layers=[encoder.layer_index],
            pooled=config.pooling != "none",
            tokens=config.tokens,
            token_dtype=config.dtype,
            shard_mb=config.shard_mb,
        )
    writer = open_writer(location)  # validates the log and trims leftovers of an interrupted build
    writer.set_status("incomplete")
    stored_keys = set(writer.keys)
    reused = [(rid, k) for rid, k in to_add if k in stored_keys]
    if reused:
        writer.commit([], reused)
    ids_by_key: dict[str, list[str]] = {}
    for rid, k in to_add:
        if k not in stored_keys:
            ids_by_key.setdefault(k, []).append(rid)

    groups, n_tokens = _embed(config, encoder, plan, residues, token_ids, writer, lease, ids_by_key, progress, log=log)
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
    lease.check()
    writer.set_status("complete", entry)
    summary = (
        f"{len(plan.new_keys)} new, {plan.already_stored + plan.reused} already stored "
        f"({plan.reused} of them under new ids); {n_tokens:,} tokens in {seconds:.1f} s -> {location.url}"
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
    lease: WriterLease,
    ids_by_key: dict[str, list[str]],
    progress: bool,
    log: Log = print,
) -> tuple[int, int]:
    """Run the model over all windows of new sequences; hand each finished sequence to the writer."""
    items = []
    for key in plan.new_keys:
        p = plan.plans[key]
        for w, (s, e) in enumerate(p.windows):
            items.append((encoder.cost(e - s), e - s, (key, w)))
    batches = make_batches(items, config.max_tokens, encoder.equal_length_batches)
    guard = MemoryGuard(encoder, config.max_tokens, log)  # out of memory: split, retry, lower the budget
    flush_rows = writer.shard_tokens or 0
    background = BackgroundWriter(writer, lease, ids_by_key, flush_rows=max(flush_rows, 1), flush_sequences=4096)
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
            for (key, w), out in zip(batch, guard(windows, [ids_by_key[key][0] for key, _ in batch])):
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
