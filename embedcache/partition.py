"""One work unit, start to finish, wherever it runs: read its sequences from the spool, embed them
in length-sorted batches, write its token rows as whole shards, and return what the commit needs.

The same function runs in the build's own process and on Dask workers. A unit's token rows were
allocated by the plan and no other unit touches them, so running a unit twice (a retry after a
lost worker) rewrites the same shards with the same values: nothing is lost or duplicated. The
unit does not commit: the build's process does, once the result arrives.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from embedcache.config import BuildConfig
from embedcache.embed import make_batches, plan_windows
from embedcache.encoders import Encoder, load_encoder
from embedcache.encoders.base import weights_changed
from embedcache.errors import EmbedcacheError, EncoderError, SpoolError
from embedcache.device_stage import DeviceStage, reduces_on_device
from embedcache.host_stage import QUEUE, HostStage
from embedcache.long_record import StreamedRecord, embed_long_record, stored_bytes
from embedcache.location import Location, io_errors, open_location
from embedcache.memory import MemoryGuard
from embedcache.plan import Unit
from embedcache.shard_writer import ShardBuffers, ShardWriter
from embedcache.spool import SpoolEntry, read_entries
from embedcache.store import shard_rows
from embedcache.windows import SequencePlan


@dataclass
class UnitTask:
    """Everything a worker needs for one unit (small: it travels to the worker)."""

    unit: Unit
    config: BuildConfig
    location: Location
    weights: dict | None = None  # the identity of the weights the build planned with (the store's fingerprint names it)


@dataclass
class UnitResult:
    """What a finished unit hands back for its commit: per-sequence rows, its token range and digests."""

    index: int
    keys: list[str]  # sha256 hex of each sequence, in the unit's order
    residues: list[str]
    n_input_tokens: np.ndarray
    n_cropped: np.ndarray
    n_windows: np.ndarray
    token_offset: np.ndarray  # absolute first row in `tokens` (empty when per-token output is off)
    token_length: np.ndarray
    pooled: np.ndarray | None  # (n, k, d) float32
    token_start: int
    token_end: int
    shard_crc: np.ndarray  # (shards,) int64: embedcache.commits.shard_digests of the unit's token rows
    n_tokens: int
    worker: str

    @property
    def token_crc(self) -> int:
        """The crc32 of all the unit's token rows: its last shard's digest."""
        return int(self.shard_crc[-1]) if len(self.shard_crc) else 0


class UnitInterrupted(KeyboardInterrupt):
    """Ctrl-C inside a unit. `result` is the unit's finished part (its sequences' rows all written), for
    the build to commit before it stops, or None when nothing of the unit finished."""

    def __init__(self, result: "UnitResult | None"):
        super().__init__()
        self.result = result


class UnitError(EmbedcacheError):
    """A unit failed: names the unit, its first records and the worker."""


_ENCODERS: dict[str, Encoder] = {}  # one loaded encoder per process, kept across units
_GUARDS: dict[int, MemoryGuard] = {}  # and its out-of-memory guard: a lowered token budget stays lowered
_LOADING = threading.Lock()  # a head start loads it on a thread of its own while the build plans (embedcache.head_start)


def _worker_name() -> str:
    if "distributed" in sys.modules:  # a Dask worker has it imported; importing it here costs a build ~0.3 s
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # imported, but not on a worker
            pass
    return f"{socket.gethostname()} pid {os.getpid()}"


def _device_for_worker(config: BuildConfig) -> str:
    """Without dask-cuda, a LocalCluster worker takes the GPU whose index is its own number."""
    if config.device != "auto":
        return config.device
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return config.device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return config.device
    return f"cuda:{int(name) % torch.cuda.device_count()}" if isinstance(name, int) or str(name).isdigit() else config.device


def encoder_for(config: BuildConfig, weights: dict | None = None) -> Encoder:
    """This process's encoder for `config`, loaded once and kept between units and builds while its weights
    are those its model names. `weights`: the identity the build planned with; a unit must not compute with
    others (a model directory rewritten during a build), since the store's fingerprint names the planned ones."""
    device = _device_for_worker(config)
    key = f"{config.to_dict()}|{device}"
    with _LOADING:
        kept = _ENCODERS.get(key)
        # Kept while its weights are the planned ones (the build checked their files when it began), else while
        # its files are unchanged.
        if kept is None or (kept.provenance().get("weights") != weights if weights is not None else weights_changed(kept)):
            _ENCODERS.clear()  # one model per process: a new config replaces the old one
            _GUARDS.clear()
            _ENCODERS[key] = load_encoder(config.encoder, replace(config.encoder_settings(), device=device))
        encoder = _ENCODERS[key]
    if weights is not None and encoder.provenance().get("weights") != weights:
        raise EncoderError(
            f"the weights of {config.model!r} are not those this build planned with ({encoder.provenance().get('weights')} now, "
            f"{weights} then): the model changed during the build; committed units are kept, and the same command "
            f"builds only with the weights the store was fingerprinted with (new weights need a new store)"
        )
    return encoder


def guard_for(encoder: Encoder, config: BuildConfig, log: Callable[[str], None]) -> MemoryGuard:
    if id(encoder) not in _GUARDS:
        _GUARDS[id(encoder)] = MemoryGuard(encoder, config.max_tokens, log)
    return _GUARDS[id(encoder)]


def run_unit(task: UnitTask, encoder: Encoder | None = None, log: Callable[[str], None] = print,
             on_sequences: Callable[[int], None] | None = None) -> UnitResult:
    """Embed one unit and write its token rows: prepare -> forward -> finish, one after another (a Dask
    worker's way; `embedcache.executors.InProcess` overlaps the stages of consecutive units instead).
    Errors name the unit, its first records and the worker.

    `log` takes what the unit has to say (an out-of-memory split); on a Dask worker it goes to the worker's log.
    `on_sequences(n)` is told as each batch finishes n more sequences (a progress bar that moves within a unit).
    """
    encoder = encoder or named(task, encoder_for, task.config, task.weights)
    prepared = named(task, prepare_unit, task, encoder)
    return named(task, finish_unit, named(task, forward_unit, prepared, encoder, log, on_sequences))


def named(task: UnitTask, stage: Callable, *args):
    """`stage(*args)`, its errors named with the unit, its first records and the worker (`UnitError`)."""
    try:
        return stage(*args)
    except UnitError:
        raise
    except Exception as e:
        unit = task.unit
        try:
            ids = [entry.id for entry in read_entries(open_location(task.location, read_only=True), unit.locators[:3])]
        except Exception:  # naming the records is best effort; the original error matters
            ids = ["?"]
        more = f" and {unit.n_sequences - len(ids)} more" if unit.n_sequences > len(ids) else ""
        where = f" (store {task.location.url!r})" if isinstance(e, io_errors() + (SpoolError,)) else ""
        raise UnitError(
            f"unit {unit.index} (records {', '.join(map(repr, ids))}{more}) failed on worker {_worker_name()}{where}: "
            f"{type(e).__name__}: {e}; {what_next(e)}"
        ) from e


def what_next(e: BaseException) -> str:
    """What a failed unit leaves, and whether running the same command again can succeed.

    Only an I/O failure of the store (a full disk, a dropped connection, a throttled bucket) may pass:
    the rerun resumes from the committed units. Anything else fails the same way on every rerun, so
    it is not offered: the error's own text says what to change, and an internal check is a bug.
    """
    if isinstance(e, io_errors()):
        return "committed units are kept: run the same command again to resume"
    if isinstance(e, AssertionError):
        return "an internal check failed (a bug in embedcache, please report it); committed units are kept"
    return "committed units are kept"


@dataclass
class Batch:
    """One model call of a unit: its (sequence, window) items, their token windows and records, and the
    model's inputs made ahead of the call (`Encoder.pack`; None where the encoder makes them at the call)."""

    items: list[tuple[int, int]]
    windows: list[np.ndarray]
    records: list[str]
    packed: object | None


@dataclass
class PreparedUnit:
    """A unit read from the spool and planned (spool -> token ids -> windows -> batches), ready for its forward."""

    task: UnitTask
    entries: list[SpoolEntry]
    token_ids: list[np.ndarray]
    plans: list[SequencePlan]
    array: object | None  # the store's `tokens` array (zarr), when the build keeps per-token rows
    long: list[int]  # sequences too long to hold: streamed by their own forwards (embedcache.long_record)
    batches: list[Batch]  # the other sequences' windows, length-sorted under the token budget


@dataclass
class RunningUnit:
    """A unit whose forward is done; its host stage may still be stitching, pooling and writing shards."""

    prepared: PreparedUnit
    host: HostStage | None  # None: nothing to embed (an empty unit)
    writer: ShardWriter | None
    streamed: dict[int, StreamedRecord]
    claimed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """True for the first caller only: whoever finishes and commits the unit (it is committed once)."""
        with self.lock:
            first, self.claimed = not self.claimed, True
            return first

    def abort(self) -> None:
        """Stop the host stage and the shard writes after an error elsewhere (nothing of the unit is kept)."""
        if self.host is not None:
            self.host.stop(check=False)
        if self.writer is not None:
            self.writer.close()


def prepare_unit(task: UnitTask, encoder: Encoder) -> PreparedUnit:
    """The unit's sequences from the spool, their token ids, windows and batches, each batch packed for the
    model (no model call: it may run on a thread of its own while the previous unit's forward runs)."""
    store = open_location(task.location, read_only=False)
    config = task.config
    entries = read_entries(store, task.unit.locators)
    token_ids = [encoder.tokenize(e.residues) for e in entries]
    plans = [plan_windows(encoder, len(ids), config) for ids in token_ids]
    array = _tokens_array(store) if config.tokens and entries else None
    long = [i for i, p in enumerate(plans) if _too_long_to_hold(encoder, p, config, alone=len(plans) == 1)]
    return PreparedUnit(task, entries, token_ids, plans, array, long, _batches(encoder, config, entries, token_ids, plans, long))


def _batches(encoder: Encoder, config: BuildConfig, entries: list[SpoolEntry], token_ids: list[np.ndarray],
             plans: list[SequencePlan], skip: list[int]) -> list[Batch]:  # fmt: skip
    """The windows of every sequence but `skip`, in length-sorted batches under the token budget, each packed for
    the model (`Encoder.pack`) on this thread rather than on the forward's."""
    items = [(encoder.cost(e - s), e - s, (i, w)) for i, p in enumerate(plans) if i not in skip
             for w, (s, e) in enumerate(p.windows)]  # fmt: skip
    guard = _GUARDS.get(id(encoder))  # a budget lowered after running out of device memory stays lowered
    batches = []
    for batch in make_batches(items, guard.max_tokens if guard else config.max_tokens, encoder.equal_length_batches):
        windows = []
        for i, w in batch:
            s, e = plans[i].windows[w]
            windows.append(token_ids[i][plans[i].keep_start + s : plans[i].keep_start + e])
        batches.append(Batch(batch, windows, [entries[i].id for i, _ in batch], encoder.pack(windows)))
    return batches


def forward_unit(prepared: PreparedUnit, encoder: Encoder, log: Callable[[str], None],
                 on_sequences: Callable[[int], None] | None, stop: Callable[[], bool] | None = None,
                 buffers: ShardBuffers | None = None) -> RunningUnit:
    """Length-sorted batches -> forward -> the device stage (off the CPU: reduce, copy back what is stored) ->
    the host stage (stitch, pool, stored dtype, shard writes; on its own thread beside the next forward). Returns when the last batch is handed over; `finish_unit` waits
    for the rest. Ctrl-C raises UnitInterrupted with the sequences the host stage finished. `stop()`, asked
    before each batch, ends the forward early (the caller has an error to raise: the unit is not finished).
    `buffers`: shard buffers the build's units share (else the unit's own)."""
    unit, config, plans, token_ids, entries, array = (prepared.task.unit, prepared.task.config, prepared.plans,
                                                      prepared.token_ids, prepared.entries, prepared.array)  # fmt: skip
    if not entries:
        return RunningUnit(prepared, None, None, {})
    guard = guard_for(encoder, config, log)  # out of device memory: split the batch, retry, lower the budget
    rows_per_shard = shard_rows(array) if array is not None else 1
    # A record larger than a unit (a chromosome) is streamed, so memory stays bounded (embedcache.long_record).
    # With per-token rows it is its unit's only record (plan.cut_units), so its rows start the unit's region.
    streamed = {i: embed_long_record(encoder, guard, token_ids[i], plans[i], config, array, unit.token_start, rows_per_shard,
                                     entries[i].id) for i in prepared.long}  # fmt: skip
    writer = ShardWriter(array, unit.token_start, rows_per_shard, (len(encoder.layer_indices), encoder.embed_dim), config.dtype, buffers) \
        if config.tokens and not streamed else None  # fmt: skip
    running = RunningUnit(prepared, HostStage(plans, config, writer, set(streamed), on_sequences).start(), writer, streamed)
    # Off the CPU, each batch is reduced on its device and only what is stored comes back (device_stage).
    device_stage = DeviceStage(plans, config, encoder.device, QUEUE) if reduces_on_device(encoder.device) else None
    try:
        for batch in prepared.batches:
            if stop is not None and stop():
                break
            outs = guard(batch.windows, batch.records, to_host=False, packed=batch.packed)
            running.host.put(batch.items, outs if device_stage is None else device_stage(batch.items, outs))
    except KeyboardInterrupt:  # the host stage finishes what was queued: keep the sequences it wrote
        running.host.stop(check=False)
        raise UnitInterrupted(None if streamed else _finished_part(unit, entries, plans, running.host, writer)) from None
    except BaseException:
        running.abort()
        raise
    prepared.token_ids, prepared.batches = [], []  # the forward's alone: not held while the unit is finished and committed
    return running


def finish_unit(running: RunningUnit) -> UnitResult:
    """Wait for the unit's host stage and shard writes; the result its commit needs."""
    prepared, host, writer, streamed = running.prepared, running.host, running.writer, running.streamed
    unit, config, entries, plans = prepared.task.unit, prepared.task.config, prepared.entries, prepared.plans
    if host is None:
        return _empty(unit)
    try:
        host.stop(check=True)
    except BaseException:
        running.abort()
        raise
    pooled = [streamed[i].pooled if i in streamed else p for i, p in enumerate(host.pooled)]
    if not config.tokens:
        lengths, digests = np.zeros(0, np.int64), np.zeros(0, np.int64)
    elif streamed:
        lengths, digests = np.array([streamed[0].n_rows], np.int64), streamed[0].shard_crc
    else:
        lengths, digests = host.lengths, writer.finish()
    stacked = None if pooled[0] is None else np.stack([p if p.ndim == 2 else p[None] for p in pooled]).astype(np.float32)
    return _result(unit, entries, plans, lengths, stacked, digests)


def _finished_part(unit: Unit, entries: list, plans: list, host: HostStage, writer: ShardWriter | None) -> UnitResult | None:
    """The result of the unit's first sequences that the host stage finished: a smaller unit of its own."""
    k = host.next
    if k == 0:
        return None
    lengths = host.lengths[:k] if writer is not None else np.zeros(0, np.int64)
    digests = writer.finish() if writer is not None else np.zeros(0, np.int64)  # the last, short shard too
    part = replace(unit, locators=unit.locators[:k], n_rows=unit.n_rows[:k], n_tokens=sum(p.n_input_tokens for p in plans[:k]),
                   token_end=unit.token_start + int(lengths.sum()))  # fmt: skip
    pooled = None if host.pooled[0] is None else np.stack([p if p.ndim == 2 else p[None] for p in host.pooled[:k]]).astype(np.float32)
    return _result(part, entries[:k], plans[:k], lengths, pooled, digests)


def _too_long_to_hold(encoder: Encoder, plan, config: BuildConfig, alone: bool) -> bool:
    """Whether one sequence's model outputs alone exceed a unit's budget (--unit-mb): then it is streamed.

    With per-token rows, only a record alone in its unit: others share units cut to whole shards of
    about --unit-mb of stored rows (plan.cut_units), which bounds their memory already."""
    held = stored_bytes(encoder.n_output_rows(plan.n_tokens), len(encoder.layer_indices), encoder.embed_dim)
    return len(plan.windows) > 1 and held > config.unit_mb * (1 << 20) and (alone or not config.tokens)


def _tokens_array(store):
    import zarr

    return zarr.open_group(store=store, mode="r+", zarr_format=3, use_consolidated=False)["tokens"].with_config({"write_empty_chunks": True})


def _check_rows(unit: Unit, lengths: np.ndarray) -> None:
    if not np.array_equal(lengths, unit.n_rows):
        raise AssertionError(f"unit {unit.index}: planned rows {unit.n_rows.tolist()} but got {lengths.tolist()}")


def _result(unit: Unit, entries: list, plans: list, lengths: np.ndarray, pooled: np.ndarray | None, digests: np.ndarray) -> UnitResult:
    if len(lengths):
        _check_rows(unit, lengths)
    return UnitResult(
        index=unit.index,
        keys=[_sha256(e.residues) for e in entries],
        residues=[e.residues for e in entries],
        n_input_tokens=np.array([p.n_input_tokens for p in plans], np.int64),
        n_cropped=np.array([p.n_cropped for p in plans], np.int64),
        n_windows=np.array([len(p.windows) for p in plans], np.int32),
        token_offset=unit.token_start + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64),
        token_length=lengths,
        pooled=pooled,
        token_start=unit.token_start,
        token_end=unit.token_end,
        shard_crc=digests,
        n_tokens=unit.n_tokens,
        worker=_worker_name(),
    )


def _sha256(residues: str) -> str:
    import hashlib

    return hashlib.sha256(residues.encode()).hexdigest()


def _empty(unit: Unit) -> UnitResult:
    z = np.zeros(0, np.int64)
    return UnitResult(unit.index, [], [], z, z, z.astype(np.int32), z, z, None, unit.token_start, unit.token_start, z, 0, _worker_name())
