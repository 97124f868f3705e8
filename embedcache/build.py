"""`embedcache build`: plan -> units -> workers -> commits. Only what the store lacks is embedded.

1. plan (embedcache.plan): one streamed pass over the inputs, in bounded memory; records spooled
   into the store; new sequences cut into length-sorted units with their own token regions (a
   pooled-only build in this process begins its first unit's forward meanwhile: embedcache.head_start);
2. units run in this process or on Dask workers (embedcache.executors, embedcache.partition),
   each writing its token shards straight into the store as they fill, from a host stage that runs
   beside the forward (embedcache.host_stage);
3. this process commits each unit as it finishes (resume is per unit; Ctrl-C commits the part of
   the running unit that finished), then the records (the first of them with the last units);
4. the store is marked complete, the spool removed, and consolidated metadata written for xarray
   (embedcache's own readers never use it: the commit log decides what counts).

The build holds the store's writer lease throughout (embedcache.lease).
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm
from zarr.storage import LocalStore

from embedcache import __version__
from embedcache.config import BuildConfig, fingerprint, fingerprint_fields
from embedcache.embed import resolve_overlap
from embedcache.encoders import Encoder, load_encoder
from embedcache.encoders.base import transformers_progress, weights_changed
from embedcache.commits import read_log
from embedcache.errors import Interrupted, StoreError
from embedcache.executors import InProcess, check_store_reach, make_executor
from embedcache.head_start import HeadStartRun
from embedcache.inputs import check_input_file
from embedcache.lease import DEFAULT_TTL_S, WriterLease
from embedcache.location import Location, open_location
from embedcache.partition import UnitResult, UnitTask, encoder_for
from embedcache.plan import BuildPlan, HeadStart, plan_build, record_entries
from embedcache.spool import SpoolWriter, delete_spool
from embedcache.store import (
    FORMAT,
    RECORD_CHUNK,
    SCHEMA_VERSION,
    StoreWriter,
    check_fingerprint,
    consolidate,
    create_store,
    open_root,
    open_writer,
    read_index,
    store_state,
    token_chunking,
)

Log = Callable[[str], None]
UNIT_SEQUENCES = 4096  # the most sequences of a unit: a pooled-only unit on Dask (per-token units: --unit-mb)
# Sequences of a pooled-only unit in this process: few enough that its pipeline reads and plans the next
# unit, and commits the last, while this one runs the model (one unit would do both with the model idle).
POOLED_UNIT_SEQUENCES = 512
# The first unit of such a build, begun while the rest is planned (embedcache.head_start): one unit's worth, so
# that the build has no more units, nor commits, than without it; its forward (~0.2M tokens of a proteome, 0.2 s
# at 1M tokens/s) outlasts planning a few thousand more records and reading the next unit beside it.
HEAD_START_SEQUENCES = POOLED_UNIT_SEQUENCES
# Records a commit holds: whole chunks of the record arrays, written concurrently; each commit costs about as
# much (a few ms) whatever its size, and its ids, about 5 MB here, are the memory it holds (two, read ahead).
RECORDS_PER_COMMIT = 16 * RECORD_CHUNK


@dataclass
class BuildReport:
    plan: BuildPlan
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    committed_units: int = 0
    summary: str = ""


def _row_bytes(config: BuildConfig, encoder: Encoder) -> int:
    """Stored bytes of one token row of one layer."""
    return encoder.embed_dim * np.dtype(config.dtype).itemsize


def _token_layout(config: BuildConfig, encoder: Encoder) -> tuple[int, int]:
    """(tokens per chunk, tokens per shard) of this build's per-token array (as `create_store` lays it out)."""
    return token_chunking(_row_bytes(config, encoder), config.shard_mb, n_layers=len(encoder.layer_indices))


def _store_attrs(config: BuildConfig, encoder: Encoder, fp: str, fp_fields: dict, overlap: int) -> dict:
    chunk, shard = _token_layout(config, encoder)
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
        "layout": {"token_chunk": chunk, "token_shard": shard, "token_codec": config.token_codec},
    }


def _id_digest(record_id: str) -> bytes:
    return hashlib.blake2b(record_id.encode(), digest_size=16).digest()


def _stored_digests(keys: np.ndarray, committed: np.ndarray, ids: list[str], content_index: np.ndarray) -> tuple[dict, dict]:
    """(content digest -> row, id digest -> content digest) of a store's committed rows."""
    by_key = {bytes.fromhex(str(k)): i for i, k in enumerate(keys.tolist()) if committed[i]}
    digest_of_row = {i: d for d, i in by_key.items()}
    by_id = {_id_digest(str(rid)): digest_of_row[int(c)] for rid, c in zip(ids, content_index.tolist())}
    return by_key, by_id


def _read_stored(location: Location, fp: str, fp_fields: dict) -> tuple[dict, dict]:
    """The stored digests, for a dry run (no lease, nothing written)."""
    if store_state(location) != "created":
        return {}, {}
    _, root = open_root(location, mode="r")
    attrs = dict(root.attrs["embedcache"])
    check_fingerprint(location.url, attrs, fp, fp_fields)
    index = read_index(root, location.url, attrs)
    return _stored_digests(index.content_keys, index.committed_content, index.ids, index.content_index)


def _unit_sizes(config: BuildConfig, encoder: Encoder, shard_tokens: int, in_process: bool) -> dict:
    """The planner's unit sizes (plan.cut_units): per-token units of whole shards of about `config.unit_mb`."""
    if not config.tokens:
        return dict(unit_rows=1 << 62, unit_sequences=POOLED_UNIT_SEQUENCES if in_process else UNIT_SEQUENCES)
    row = _row_bytes(config, encoder) * len(encoder.layer_indices)  # every layer of a token
    shards = max(1, round(config.unit_mb * (1 << 20) / (shard_tokens * row)))
    return dict(unit_rows=shards * shard_tokens, unit_sequences=UNIT_SEQUENCES)


@dataclass(frozen=True)
class BuildJob:
    """What a build was asked to do: the inputs, the store, where units run, who hears about it."""

    config: BuildConfig
    inputs: tuple[str | Path, ...]
    location: Location
    scheduler: str | None
    scheduler_file: str | None
    progress: bool
    log: Log

    @property
    def in_process(self) -> bool:
        return self.scheduler is None and self.scheduler_file is None


@dataclass(frozen=True)
class StoreSpec:
    """What this build stores, decided before anything is read or written: the encoder it plans with
    (tokenizer and config; no weights), the fingerprint of its settings, the store's attrs, the planner's layout."""

    encoder: Encoder
    fingerprint: str
    fields: dict
    attrs: dict
    plan_args: dict

    @classmethod
    def of(cls, config: BuildConfig, progress: bool, id_column: str, sequence_column: str, in_process: bool) -> "StoreSpec":
        encoder = _planning_encoder(config, progress)
        overlap = resolve_overlap(config, encoder)
        fields = fingerprint_fields(config, encoder.provenance(), overlap)
        fp = fingerprint(fields)
        _, shard = _token_layout(config, encoder)
        plan_args = dict(id_column=id_column, sequence_column=sequence_column, shard_tokens=shard,
                         **_unit_sizes(config, encoder, shard, in_process))  # fmt: skip
        return cls(encoder, fp, fields, _store_attrs(config, encoder, fp, fields, overlap), plan_args)

    def plan(self, job: BuildJob, stored_keys: dict, stored_ids: dict, spool: SpoolWriter, head: HeadStartRun | None = None) -> BuildPlan:
        head_start = HeadStart(HEAD_START_SEQUENCES, head.begin) if head is not None else None
        return plan_build(job.config, list(job.inputs), self.encoder, job.location.url, stored_keys, stored_ids, spool,
                          head_start=head_start, **self.plan_args)  # fmt: skip


_PLANNERS: dict[str, Encoder] = {}  # the last planning encoder of this process, kept for its next build


def _planning_encoder(config: BuildConfig, progress: bool) -> Encoder:
    """The encoder's tokenizer and config, without weights: those are loaded when the first unit runs (by
    each Dask worker for its own units), so a build with nothing new to embed never loads them. Kept for
    the next build of the same config in this process (a notebook's, a benchmark's) while its weights
    are the same."""
    key = str(config.to_dict())
    kept = _PLANNERS.get(key)
    if kept is None or weights_changed(kept):
        _PLANNERS.clear()
        with transformers_progress(progress):
            _PLANNERS[key] = kept = load_encoder(config.encoder, config.encoder_settings(), weights=False)
    return kept


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
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    lease_ttl_s: float = DEFAULT_TTL_S,
    progress: bool = True,
    log: Log = print,
) -> BuildReport:
    """Embed the records of `inputs` into `store` (a path or URL), computing only sequences it lacks.

    `scheduler`: None (this process), "local[:N]" (a LocalCluster of N worker processes), or a Dask
    scheduler address; `scheduler_file` attaches to a cluster by its scheduler file. The build holds
    the store's writer lease: a second build into it is refused naming this one, or waits (`wait`).
    `progress=False` also silences transformers' weight-loading bar, while this process loads the encoder.
    """
    location = Location.of(store, storage_options)
    check_store_reach(location, scheduler, scheduler_file, dry_run=dry_run)  # memory:// is this process's only
    for path in inputs:  # a mistyped path is named before minutes of loading a model
        check_input_file(path)
    job = BuildJob(config, tuple(inputs), location, scheduler, scheduler_file, progress, log)
    spec = StoreSpec.of(config, progress, id_column, sequence_column, in_process=job.in_process)
    if dry_run:
        return _dry_run(job, spec)
    existed = location.is_local and location.local_path.exists()
    lease = WriterLease(open_location(location, read_only=False), location.url, ttl_s=lease_ttl_s, wait=wait, log=log)
    try:
        with lease:
            return _build_under_lease(job, spec, lease)
    finally:
        if location.is_local and not existed and location.local_path.is_dir() and not any(location.local_path.iterdir()):
            location.local_path.rmdir()  # bad input found while planning: leave no trace


def _dry_run(job: BuildJob, spec: StoreSpec) -> BuildReport:
    """Plan against what the store holds, with a throwaway spool: no lease, nothing written."""
    stored_keys, stored_ids = _read_stored(job.location, spec.fingerprint, spec.fields)
    with tempfile.TemporaryDirectory(prefix="embedcache-plan-") as tmp:
        plan = spec.plan(job, stored_keys, stored_ids, SpoolWriter(LocalStore(tmp)))
    job.log(plan.describe())
    return BuildReport(plan=plan, summary="dry run: nothing computed")


def _build_under_lease(job: BuildJob, spec: StoreSpec, lease: WriterLease) -> BuildReport:
    """open the store (if any) -> plan -> create the store (if none; beside the first unit) -> embed and commit -> complete."""
    location, log = job.location, job.log
    state = store_state(location)
    if state == "foreign":
        raise StoreError(f"{location.url!r} exists and holds other data, not an embedcache store; choose another -o")
    writer = stored_keys = stored_ids = None
    if state == "created":
        writer = _open_existing(location, spec.fingerprint, spec.fields)
        index = writer.index
        stored_keys, stored_ids = _stored_digests(index.content_keys, index.committed_content, index.ids, index.content_index)
    store = open_location(location, read_only=False)
    delete_spool(store)  # a killed build's spool is stale
    opening = None
    # A pooled-only build in this process begins its first unit's forward while it plans the rest (head_start).
    head = HeadStartRun(job.config, location, spec.fields.get("weights"), spec.encoder, job.progress, log) \
        if not job.config.tokens and job.in_process else None  # fmt: skip
    try:
        # Plan before creating anything: bad input stops the build with no store made.
        try:
            plan = spec.plan(job, stored_keys or {}, stored_ids or {}, SpoolWriter(store), head)
        except KeyboardInterrupt:
            raise Interrupted("while planning, before anything was written: " + (
                "the store is as it was" if writer is not None else "no store was created")) from None
        if writer is None:
            if state == "partial":
                log(f"{location.url}: a store creation was interrupted before; creating it again")
            opening = _Opening(create=lambda: _create(job, spec, plan))  # beside the first unit's forward
        else:
            _prepare_writer(writer, plan)
            opening = _Opening(writer)
        report = _embed_and_commit(job, lease, opening, plan, head if head is not None and head.begun else None)
    finally:
        try:
            if head is not None:
                head.abort()  # planning failed: its forward is dropped (once the executor claimed it, nothing to do)
        except KeyboardInterrupt:
            pass  # an error or an interruption is on its way out already
        try:
            if opening is not None:
                opening.ended()  # the build leaves neither the store nor its lease while the creation writes
        except KeyboardInterrupt:
            pass
        delete_spool(store)
    lease.check()
    consolidate(location)  # for xarray; after the spool is gone, which is no part of the store
    return report


def _open_existing(location: Location, fp: str, fp_fields: dict) -> StoreWriter:
    _, root = open_root(location, mode="r")
    check_fingerprint(location.url, dict(root.attrs["embedcache"]), fp, fp_fields)
    return open_writer(location)  # validates the log and trims leftovers of an interrupted build


def _create(job: BuildJob, spec: StoreSpec, plan: BuildPlan) -> StoreWriter:
    config, encoder = job.config, spec.encoder
    create_store(job.location, attrs=spec.attrs, embed_dim=encoder.embed_dim, layers=encoder.layer_indices,
                 pooled=config.pooling != "none", tokens=config.tokens, token_dtype=config.dtype,
                 shard_mb=config.shard_mb, token_codec=config.token_codec)  # fmt: skip
    writer = open_writer(job.location)
    _prepare_writer(writer, plan)
    return writer


def _prepare_writer(writer: StoreWriter, plan: BuildPlan) -> None:
    """Mark the store incomplete, place the plan's token regions after what it holds (they start at 0), and
    size its arrays for what the plan will commit."""
    writer.set_status("incomplete")
    base = -(-writer.token_end // writer.shard_tokens) * writer.shard_tokens if writer.shard_tokens else 0
    for unit in plan.units if writer.has_tokens else ():
        unit.token_start += base
        unit.token_end += base
    writer.reserve(records=writer.committed.records + plan.n_new_records, contents=writer.content_end + plan.n_new,
                   tokens=max([writer.token_end, *(u.token_end for u in plan.units)]))  # fmt: skip


class _Opening:
    """The store's writer: ready (a store that exists), or being created on a thread of its own (a new one).

    `writer()` waits for it. Ctrl-C while waiting is held until the creation has ended, then raised: the
    build never leaves the store, nor its lease, while the creation still writes."""

    def __init__(self, writer: StoreWriter | None = None, create: Callable[[], StoreWriter] | None = None):
        self.creating = create is not None
        self.future: Future = Future()
        if create is None:
            self.future.set_result(writer)
        else:
            threading.Thread(target=self._create, args=(create,), name="embedcache-create", daemon=True).start()

    def _create(self, create: Callable[[], StoreWriter]) -> None:
        try:
            self.future.set_result(create())
        except BaseException as e:  # raised by writer() in the build's thread
            self.future.set_exception(e)

    def ended(self) -> None:
        """Wait until the creation has ended, whichever way (its error is writer()'s to raise)."""
        interrupted = False
        while not self.future.done():
            try:
                wait([self.future])
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def writer(self) -> StoreWriter:
        self.ended()
        return self.future.result()


def _embed_and_commit(job: BuildJob, lease: WriterLease, opening: _Opening, plan: BuildPlan, head: HeadStartRun | None) -> BuildReport:
    """units -> executor (in this process or on Dask workers) -> a commit per finished unit -> the records -> complete.
    The records are committed after every unit, the first of them in the last units' commit.

    A new store is created meanwhile (`opening`): units that keep per-token rows write them into it, so
    they wait for it; pooled-only units first need it at their commit, so the first one's forward runs
    beside the creation. `head`: unit 0's forward, begun while the build planned."""
    config, location, log = job.config, job.location, job.log
    started = time.time()
    weights = plan.fingerprint_fields.get("weights")  # what units must compute with: the store's fingerprint names it
    tasks = [UnitTask(unit, config, location, weights) for unit in plan.units]
    n_tokens, content_before = 0, 0 if opening.creating else opening.writer().content_end
    bar = tqdm(total=plan.n_new, unit="seq", desc="embedding", disable=not job.progress, dynamic_ncols=True)
    shown: dict[int, int] = {}  # sequences of each running unit the bar already counts
    counting = threading.Lock()  # a unit's host stage and the last unit's commit tell the bar from their own threads

    def finished(task: UnitTask, n: int) -> None:  # within a unit, per batch (in-process units only)
        with counting:
            shown[task.unit.index] = shown.get(task.unit.index, 0) + n
            bar.update(n)

    left = plan.n_new  # new sequences not yet committed: the commit that ends them takes the first records along
    chunks: Iterator[tuple[list[str], list[str]]] = iter(())  # the records, a chunk at a time

    def commit(results: list[UnitResult]) -> None:
        nonlocal n_tokens, left
        lease.check()
        left -= sum(len(r.keys) for r in results)  # an interrupted unit's finished part: some of its sequences
        opening.writer().commit_units(results, next(chunks, None) if left == 0 else None)
        with counting:
            n_tokens += sum(r.n_tokens for r in results)
            bar.update(sum(len(r.keys) - shown.pop(r.index, 0) for r in results))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.time() - started, 1e-9):,.0f}", refresh=False)

    executor = make_executor(job.scheduler, job.scheduler_file, log) if tasks else None
    records: _RecordsAhead | None = None
    try:
        records = _RecordsAhead(open_location(location, read_only=False), plan)
        chunks = iter(records)
        if config.tokens:
            opening.writer()
        if executor is not None:
            if executor.name == InProcess.name:  # loaded here, so --no-progress silences transformers' bar too
                with transformers_progress(job.progress):
                    encoder_for(config, weights)
            if opening.future.done():  # a failed creation is said now, not after a unit's forward
                opening.writer()
            executor.run(tasks, commit, finished, first=head)
        _commit_records(opening.writer(), chunks, lease)  # those the last units' commit did not take
    except KeyboardInterrupt:  # counted from the store: the signal may land between a commit and our count of it
        opening.writer()
        _, root = open_root(location, mode="r")
        kept = read_log(root, location.url).content_end - content_before
        raise Interrupted(
            f"{kept} of {plan.n_new} new sequences were committed to {location.url} and are kept, with everything "
            f"it held before; the records are committed last: run the same command again to finish the build"
        ) from None
    finally:
        bar.close()
        try:
            if records is not None:
                records.close()  # before the spool is deleted
        finally:
            if executor is not None:
                executor.close()
    return _complete(job, lease, opening.writer(), plan, executor, time.time() - started, n_tokens)


def _complete(job: BuildJob, lease: WriterLease, writer: StoreWriter, plan: BuildPlan, executor, seconds: float,
              n_tokens: int) -> BuildReport:  # fmt: skip
    """Mark the store complete with this build's entry, and say what it did."""
    rate = n_tokens / seconds if seconds > 0 else 0.0
    entry = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [str(p) for p in job.inputs],
        "records": plan.n_records,
        "new_sequences": plan.n_new,
        "already_stored": plan.already_stored,
        "reused_sequences": plan.reused,
        "resumed_records": plan.resumed,
        "units": len(plan.units),
        "executor": executor.name if executor is not None else "none",
        "seconds": round(seconds, 3),
        "tokens_per_second": round(rate, 1),
        "toolkit_version": __version__,
    }
    lease.check()
    writer.set_status("complete", entry)
    # Records of this input whose new sequence another record of it already brought (isoforms sharing a DNA window).
    shared = plan.n_records - plan.already_stored - plan.reused - plan.resumed - plan.n_new
    resumed = f"{plan.resumed} resumed from an interrupted build, " if plan.resumed else ""
    summary = (
        f"{plan.n_new} new, {plan.already_stored + plan.reused} already stored ({plan.reused} of them under new ids), {resumed}"
        f"{shared} shared a new sequence with another record ({plan.n_records} records); "
        f"{n_tokens:,} input {plan.unit} -> {plan.n_rows:,} per-token rows in {seconds:.1f} s -> {job.location.url}"
    )
    job.log(summary)
    return BuildReport(plan=plan, seconds=seconds, tokens_per_second=rate, committed_units=len(plan.units), summary=summary)


def _commit_records(writer: StoreWriter, records: Iterable[tuple[list[str], list[str]]], lease: WriterLease) -> None:
    """Commit every new record, in input order, a chunk of (ids, content keys) at a time."""
    for ids, keys in records:
        lease.check()
        writer.commit_records(ids, [writer.keys[k] for k in keys])


def _new_records(store, plan: BuildPlan) -> Iterator[tuple[list[str], list[str]]]:
    """The new records' ids and content keys, in input order, RECORDS_PER_COMMIT at a time, from the spool."""
    ids: list[str] = []
    keys: list[str] = []
    for i, entry in record_entries(store, plan):
        if plan.record_is_new[i]:
            ids.append(entry.id)
            keys.append(plan.record_digest[i].tobytes().hex())
            if len(ids) == RECORDS_PER_COMMIT:
                yield ids, keys
                ids, keys = [], []
    if ids:
        yield ids, keys


class _RecordsAhead:
    """`_new_records`, each chunk read from the spool on a thread of its own before it is asked for: the first
    while the units run (reading it back was half of the records' commit, after the model's last batch)."""

    def __init__(self, store, plan: BuildPlan):
        self.chunks = _new_records(store, plan)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embedcache-records")
        self.next: Future = self.pool.submit(next, self.chunks, None)

    def __iter__(self) -> Iterator[tuple[list[str], list[str]]]:
        while (chunk := self.next.result()) is not None:
            self.next = self.pool.submit(next, self.chunks, None)
            yield chunk

    def close(self) -> None:
        """Stop reading ahead (waits for a read under way: the spool is deleted after this)."""
        self.next.cancel()
        self.pool.shutdown(wait=True)
