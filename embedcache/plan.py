"""Planning a build as a stream: read, validate, key and measure every record once, in bounded memory.

What planning keeps grows by a few fixed-size numbers per record (a 32-byte content digest, a
16-byte id digest, a token count, a spool position): never the sequences, token ids or a Python
object per record. The residues go to the store's spool (embedcache.spool). The plan then:
- drops exact repeats (same id, same sequence) and refuses one id with two sequences;
- compares with the store: records already there, and sequences it holds under other ids;
- cuts the NEW unique sequences, longest first, into units (embedcache.partition) of whole
  shards of token rows, each with its own token region, so units can run anywhere in any order.

A build may ask for a head start: the first new sequences read become unit 0 as soon as there are
enough of them, handed over while the rest of the input is still read, so that their forward runs
beside the planning (a pooled-only build in this process: such a unit writes nothing before its
commit, and nothing is committed before the plan is complete, so bad input still stops the build
with nothing written).
"""

from __future__ import annotations

import hashlib
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from embedcache.alphabets import MoleculeTally, check_sequence
from embedcache.config import BuildConfig, fingerprint, fingerprint_fields
from embedcache.embed import plan_windows, resolve_overlap
from embedcache.encoders import Encoder
from embedcache.errors import InputError
from embedcache.reduce import pooled_rows
from embedcache.inputs import Record, iter_records
from embedcache.spool import SpoolEntry, SpoolWriter, iter_entries, read_entries

Log = Callable[[str], None]


@dataclass
class Unit:
    """One work unit: new unique sequences (longest first) and the token rows they will fill."""

    index: int
    locators: np.ndarray  # (n, 3) int64: spool part, offset, length of each sequence's first record
    n_rows: np.ndarray  # (n,) int64: per-token rows each sequence will store
    n_tokens: int  # content tokens embedded (for progress and rates)
    token_start: int  # first token row (a shard boundary); rows token_start .. token_end are this unit's
    token_end: int

    @property
    def n_sequences(self) -> int:
        return len(self.n_rows)


@dataclass
class BuildPlan:
    """What a build will do, before any model call. `--dry-run` prints it."""

    store: str  # path or URL
    fingerprint: str
    fingerprint_fields: dict
    n_records: int  # distinct input records
    n_unique: int  # distinct sequences among them
    already_stored: int  # records whose id is already in the store (same sequence)
    reused: int  # new records whose sequence the store already holds for other records
    n_new: int  # sequences to embed
    n_tokens: int  # content tokens to embed (after crops)
    n_windows: int
    n_cropped_sequences: int
    estimated_bytes: int  # added to the store (uncompressed; fp16 embeddings barely compress)
    embed_dim: int
    layers: tuple[int, ...] = (0,)  # hidden states stored per row
    unit: str = "tokens"  # what n_tokens counts: tokens, or bp for encoders that read bases (Enformer)
    resumed: int = 0  # new records whose sequence an interrupted build embedded (no committed record uses it yet)
    n_rows: int = 0  # per-token rows the new sequences will store
    units: list[Unit] = field(default_factory=list)
    spool_parts: int = 0
    # per distinct record, in input order: its position among all records read (repeats dropped),
    # the digest of its sequence, and whether it must be added
    record_position: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    record_digest: np.ndarray = field(default_factory=lambda: np.zeros(0, "V32"))
    record_is_new: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def n_new_records(self) -> int:
        return int(self.record_is_new.sum())

    def describe(self) -> str:
        layers = f" x {len(self.layers)} layers {list(self.layers)}" if len(self.layers) > 1 else ""
        return "\n".join(
            [
                f"store: {self.store} (fingerprint {self.fingerprint})",
                f"records: {self.n_records} ({self.n_unique} unique sequences)",
                f"already stored: {self.already_stored} records; reusing stored sequences for {self.reused} new records"
                + (f"; {self.resumed} records resumed from an interrupted build (sequences embedded, records not yet committed)"
                   if self.resumed else ""),
                f"to embed: {self.n_new} sequences, {self.n_tokens:,} {self.unit} in {self.n_windows} model windows, "
                f"{len(self.units)} work units",
                f"cropped on request: {self.n_cropped_sequences} sequences",
                f"per-token rows to store: {self.n_rows:,}",
                f"estimated size added: {self.estimated_bytes / 1e6:,.1f} MB (embedding dim {self.embed_dim}{layers})",
            ]
        )


def _id_digest(record_id: str) -> bytes:
    return hashlib.blake2b(record_id.encode(), digest_size=16).digest()


@dataclass(frozen=True)
class HeadStart:
    """Unit 0, cut from the first `sequences` new sequences read (in input order, then longest first) and
    handed to `begin` while the rest of the input is planned (its records are in the spool by then)."""

    sequences: int
    begin: Callable[[Unit], None]


def stream_records(inputs: Iterable[str | Path], id_column: str, sequence_column: str) -> Iterator[Record]:
    inputs = list(inputs)
    if not inputs:
        raise InputError("no input files given")
    for path in inputs:
        yield from iter_records(path, id_column=id_column, sequence_column=sequence_column)


def plan_build(
    config: BuildConfig,
    inputs: list[str | Path],
    encoder: Encoder,
    store_url: str,
    stored_keys: dict[bytes, int],
    stored_ids: dict[bytes, bytes],
    spool: SpoolWriter,
    *,
    id_column: str = "id",
    sequence_column: str = "sequence",
    shard_tokens: int,
    unit_rows: int,
    unit_sequences: int,
    head_start: HeadStart | None = None,
) -> BuildPlan:
    """Plan a build in one pass over `inputs`.

    `stored_keys`: the store's content digests (32 bytes); `stored_ids`: id digest -> content digest of
    its records. Every record is spooled (a dry run spools to a temporary local directory). `head_start`:
    unit 0 is cut and begun early (module docstring); the plan's units then start with it.
    """
    overlap = resolve_overlap(config, encoder)
    if not encoder.fixed_window and not 0 <= overlap < encoder.window:
        raise InputError(f"--overlap {overlap} must be in 0..{encoder.window - 1} for a window of {encoder.window}")
    fp_fields = fingerprint_fields(config, encoder.provenance(), overlap)

    # Per record, appended to flat buffers (a few bytes each, no Python object per record).
    digest, id_digest, n_tokens, locator = bytearray(), bytearray(), array("q"), array("q")
    molecule = MoleculeTally(encoder.alphabet, encoder=config.encoder)
    head: dict[bytes, int] | None = {} if head_start is not None else None  # new digest -> its first record
    head_unit, head_seq = None, np.zeros(0, np.int64)  # unit 0, the records of its sequences
    for r in stream_records(inputs, id_column, sequence_column):
        seq = check_sequence(r.sequence, encoder.alphabet, record=r.id, source=r.source, encoder=config.encoder)
        molecule.add(r.id, seq, r.source)
        d = hashlib.sha256(seq.encode()).digest()
        digest += d
        id_digest += _id_digest(r.id)
        n = encoder.count_tokens(seq)
        if n == 0:
            raise InputError(
                f"{r.source}: record {r.id!r}: the tokenizer of {config.model!r} turned {seq[:30]!r} into no tokens "
                f"(characters outside its vocabulary?)"
            )
        n_tokens.append(n)
        locator.extend(spool.append(r.id, r.source, seq))
        if head_unit is not None and len(n_tokens) % 32 == 0:
            # Let unit 0's forward have the interpreter: a thread waiting for it gets it only when the holder
            # blocks, or after sys.getswitchinterval() (5 ms), and the forward waits for it at every batch.
            time.sleep(0)
        if head is not None and d not in stored_keys and d not in head:
            head[d] = len(n_tokens) - 1
            if len(head) == head_start.sequences:  # unit 0 is full: begin it
                spool.flush()  # it reads its records from there
                cut = _head_unit(np.fromiter(head.values(), np.int64, len(head)), n_tokens, locator, encoder, config)
                if cut is not None:
                    head_unit, head_seq = cut
                    head_start.begin(head_unit)
                head = None
    spool.flush()
    molecule.check()
    if not n_tokens:
        raise InputError("the inputs hold no records")
    digests, id_digests = np.frombuffer(digest, "V32"), np.frombuffer(id_digest, "V16")  # (n,) each
    tokens, locators = np.frombuffer(n_tokens, np.int64), np.frombuffer(locator, np.int64).reshape(-1, 3)  # (n,), (n, 3)

    # Distinct records: one id, one sequence (exact repeats dropped, conflicting ones refused).
    _, first_of_id = np.unique(id_digests, return_index=True)
    first_of_id.sort()
    _, inverse, counts = np.unique(id_digests, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        first_digest = np.zeros(len(counts), "V32")
        first_digest[inverse[first_of_id]] = digests[first_of_id]
        conflict = np.flatnonzero(first_digest[inverse] != digests)
        if len(conflict):
            _refuse_conflicting_id(spool, locators, inverse, int(conflict[0]))
    record_digest = digests[first_of_id]
    record_id_digest = id_digests[first_of_id]

    # Against the store.
    already = np.zeros(len(first_of_id), bool)
    for i, idd in enumerate(record_id_digest.tolist()):
        stored = stored_ids.get(idd)
        if stored is not None:
            if stored != record_digest[i].tobytes():
                entry = _entry(spool, locators[first_of_id[i]])
                raise InputError(
                    f"{entry.source}: record {entry.id!r} is already in store {store_url!r} with a different "
                    f"sequence; ids must name one sequence (rename the record or use a new store)"
                )
            already[i] = True
    unique, first_of_seq = np.unique(digests, return_index=True)
    in_store = np.fromiter((d in stored_keys for d in unique.tolist()), bool, len(unique))
    new_seq = first_of_seq[~in_store]
    record_in_store = np.fromiter((d in stored_keys for d in record_digest.tolist()), bool, len(record_digest))
    # A stored sequence that no committed record uses was embedded by an interrupted build whose
    # records were not committed yet: its records are resumed, not stored "under new ids".
    in_use = set(stored_ids.values())
    record_in_use = np.fromiter((d in in_use for d in record_digest.tolist()), bool, len(record_digest))
    reused = int((record_in_store & record_in_use & ~already).sum())
    resumed = int((record_in_store & ~record_in_use & ~already).sum())

    # Windows and output rows of each new sequence, longest first (as batches are formed): planned once
    # per distinct token count (a proteome has about a thousand), which is all a plan depends on.
    rest = new_seq[~np.isin(new_seq, head_seq)]
    order = np.concatenate([head_seq, rest[np.argsort(-tokens[rest], kind="stable")]])
    counts, which = np.unique(tokens[order], return_inverse=True)  # (c,), (len(order),)
    per_count = np.zeros((len(counts), 4), np.int64)  # windows, cropped, kept tokens, stored rows
    for c in range(len(counts) - 1, -1, -1):  # longest first, as batches run: an error names the longest record
        try:
            per_count[c] = _count_plan(encoder, int(counts[c]), config)
        except ValueError as e:
            entry = _entry(spool, locators[order[np.flatnonzero(which == c)[0]]])
            raise InputError(f"{entry.source}: record {entry.id!r}: {e}") from e
    n_windows, n_cropped, n_kept, _ = per_count[which].sum(0).tolist() if len(order) else (0, 0, 0, 0)
    rows = per_count[which, 3] if len(order) else np.zeros(0, np.int64)  # (len(order),)
    h = len(head_seq)
    units = [head_unit] if head_unit is not None else []
    units += cut_units(order[h:], rows[h:], tokens, locators, shard_tokens=shard_tokens if config.tokens else 0,
                       unit_rows=unit_rows, unit_sequences=unit_sequences, first_index=len(units))  # fmt: skip
    itemsize = np.dtype(config.dtype).itemsize
    new_records = ~already
    width = encoder.embed_dim * len(encoder.layer_indices)  # values per row, every layer
    estimated = int(rows.sum()) * width * itemsize * config.tokens
    estimated += len(order) * width * 4 * (config.pooling != "none") + int(tokens[order].sum())
    return BuildPlan(
        store=store_url,
        fingerprint=fingerprint(fp_fields),
        fingerprint_fields=fp_fields,
        n_records=len(first_of_id),
        n_unique=len(unique),
        already_stored=int(already.sum()),
        reused=reused,
        resumed=resumed,
        n_new=len(order),
        n_tokens=n_kept,
        n_windows=n_windows,
        n_cropped_sequences=int(n_cropped),
        estimated_bytes=estimated,
        embed_dim=encoder.embed_dim,
        layers=encoder.layer_indices,
        unit="bp" if encoder.fixed_window else "tokens",
        n_rows=int(rows.sum()) if config.tokens else 0,
        units=units,
        spool_parts=spool.part,
        record_position=first_of_id,
        record_digest=record_digest,
        record_is_new=new_records,
    )


def _count_plan(encoder: Encoder, n: int, config: BuildConfig) -> tuple[int, int, int, int]:
    """(windows, cropped or not, kept tokens, stored rows) of a sequence of `n` tokens; ValueError when it cannot be windowed."""
    p = plan_windows(encoder, n, config)
    out = encoder.n_output_rows(p.n_tokens)
    return len(p.windows), p.n_cropped > 0, p.n_tokens, pooled_rows(min(out, config.token_bins) if config.token_bins else out, config.token_pool)


def _head_unit(records: np.ndarray, n_tokens: array, locator: array, encoder: Encoder, config: BuildConfig
               ) -> tuple[Unit, np.ndarray] | None:  # fmt: skip
    """Unit 0 of a head start, of the sequences whose first records are `records`, longest first, and those
    records in its order; None when one of them cannot be windowed (the plan names it, as it names any)."""
    tokens = np.frombuffer(n_tokens, np.int64)[records]
    order = np.argsort(-tokens, kind="stable")
    try:
        rows = {n: _count_plan(encoder, n, config)[3] for n in set(tokens.tolist())}
    except ValueError:
        return None
    locators = np.frombuffer(locator, np.int64).reshape(-1, 3)[records[order]]
    n_rows = np.fromiter((rows[n] for n in tokens[order].tolist()), np.int64, len(order))
    return Unit(0, locators, n_rows, int(tokens.sum()), 0, 0), records[order]  # pooled-only: no token rows


def cut_units(order: np.ndarray, rows: np.ndarray, tokens: np.ndarray, locators: np.ndarray, *, shard_tokens: int,
              unit_rows: int, unit_sequences: int, first_index: int = 0) -> list[Unit]:
    """Consecutive runs of the length-sorted new sequences, each up to `unit_rows` token rows and
    `unit_sequences` sequences, each starting its token rows on a shard boundary; numbered from `first_index`."""
    units: list[Unit] = []
    start, t = 0, 0
    n = len(order)
    while start < n:
        end, total = start, 0
        while end < n and end - start < unit_sequences and (end == start or total + rows[end] <= unit_rows):
            total += int(rows[end])
            end += 1
        t0 = -(-t // shard_tokens) * shard_tokens if shard_tokens else 0
        t1 = t0 + total if shard_tokens else 0
        idx = order[start:end]
        units.append(Unit(first_index + len(units), locators[idx], rows[start:end].copy(), int(tokens[idx].sum()), t0, t1))
        t = t1
        start = end
    return units


def _entry(spool: SpoolWriter, loc: np.ndarray) -> SpoolEntry:
    """The spooled record at `loc`: read back only to name a record in an error."""
    return read_entries(spool.store, loc[None])[0]


def _refuse_conflicting_id(spool: SpoolWriter, locators: np.ndarray, inverse: np.ndarray, at: int) -> None:
    later = _entry(spool, locators[at])
    first = _entry(spool, locators[int(np.flatnonzero(inverse == inverse[at])[0])])
    raise InputError(
        f"record id {later.id!r} appears twice with different sequences: at {first.source} "
        f"(length {len(first.residues)}) and at {later.source} (length {len(later.residues)})"
    )


def record_entries(store, plan: BuildPlan) -> Iterator[tuple[int, SpoolEntry]]:
    """(index among distinct records, spool entry) of every distinct record, in input order."""
    positions = plan.record_position
    i = 0
    for pos, entry in enumerate(iter_entries(store, plan.spool_parts)):
        if i < len(positions) and pos == positions[i]:  # exact repeats are not among the positions
            yield i, entry
            i += 1
