"""Reading sequence records from FASTA (plain or gzip), CSV, TSV and Parquet files."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from embedcache.errors import InputError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": "\t"}
FASTA_SUFFIXES = {".fa", ".fasta", ".faa", ".fna", ".ffn", ".frn", ".fas"}


@dataclass(frozen=True, slots=True)
class Record:
    id: str  # record id as written in the input (FASTA header up to the first whitespace, or the id column)
    sequence: str  # residues as read (not yet upper-cased or validated)
    source: str  # "file:line" (FASTA) or "file:row N" (tables), for error messages


def shown(path: str | Path) -> str:
    """A file name as messages and record sources show it: as is when printable, else quoted with
    escapes (a tab, a newline, bytes that are not UTF-8), so that every message stays one line that
    names the file unambiguously."""
    name = str(path)
    return name if name.isprintable() else repr(name)


def _suffixes(path: Path) -> list[str]:
    s = [x.lower() for x in path.suffixes]
    return s[:-1] if s and s[-1] == ".gz" else s


def read_records(path: str | Path, *, id_column: str = "id", sequence_column: str = "sequence") -> list[Record]:
    """Read all records of one input file, checking that it exists, is not empty, and every record has a sequence."""
    return list(iter_records(path, id_column=id_column, sequence_column=sequence_column))


def check_input_file(path: str | Path) -> None:
    """An input that is missing, a directory or empty is refused naming it, before any record is read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {str(path)!r} does not exist")
    if path.is_dir():
        raise InputError(f"input {str(path)!r} is a directory, expected a FASTA, CSV, TSV or Parquet file")
    if path.stat().st_size == 0:
        raise InputError(f"input file {str(path)!r} is empty")


def iter_records(path: str | Path, *, id_column: str = "id", sequence_column: str = "sequence") -> Iterator[Record]:
    """The records of one input file as a stream (FASTA record by record; tables as a whole)."""
    path = Path(path)
    check_input_file(path)
    suffix = (_suffixes(path) or [""])[-1]
    if suffix == ".parquet" or suffix == ".pq":
        records: Iterable[Record] = _read_table(path, id_column, sequence_column, None)
    elif suffix in TABLE_SUFFIXES:
        records = _read_table(path, id_column, sequence_column, TABLE_SUFFIXES[suffix])
    else:  # FASTA by suffix, or by content for anything else
        records = _read_fasta_file(path)
    n = 0
    for n, record in enumerate(records, start=1):
        yield record
    if n == 0:
        raise InputError(f"input file {str(path)!r} holds no records")


def _open_binary(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_fasta_file(path: Path) -> Iterator[Record]:
    """The records of a FASTA file, streamed; an undecodable or truncated file is an InputError naming it."""
    last: Record | None = None
    try:
        for last in _read_fasta(path):
            yield last
    except UnicodeDecodeError as e:
        after = f" after record {last.id!r} ({last.source})" if last else ""
        raise InputError(
            f"{shown(path)}: byte {e.object[e.start:e.start + 1]!r} is not UTF-8 text{after}; FASTA input must be "
            f"UTF-8 (or ASCII) text, optionally gzip-compressed"
        ) from e
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        after = f" after record {last.id!r} ({last.source})" if last else ""
        raise InputError(f"{shown(path)}: the gzip data is truncated or corrupt{after} ({e}); nothing was stored") from e


READ_BYTES = 1 << 22  # read at a time: a record longer than this (a chromosome) is joined from its pieces
_ASCII_SPACE = b" \t\n\r\v\f\x1c\x1d\x1e\x1f"  # what str.split() splits on, of ASCII


def _read_fasta(path: Path) -> Iterator[Record]:
    """Record by record, not line by line: a record's lines are joined by one bytes operation, which costs a
    fifth of the Python a line used to (planning reads every record once, before the first model call)."""
    name = shown(path)
    with _open_binary(path) as f:
        for block, line in _fasta_blocks(f):
            header, _, body = block.partition(b"\n")
            if header[:1] == b">" and b">" not in body and b";" not in body and b"\r" not in header[:-1]:
                sequence = body.translate(None, _ASCII_SPACE)
                # Not ASCII: decoded first (a character split by a line break is no character), Unicode spaces too.
                text = sequence.decode() if sequence.isascii() else "".join(body.decode().split())
                yield _fasta_record(name, header.decode()[1:].strip(), line, text)
            else:  # comments, an indented header, text before the first header, lines ended by a lone CR
                yield from _read_fasta_lines(name, block.decode(), line)


def _fasta_blocks(f) -> Iterator[tuple[bytes, int]]:
    """The file cut before every line that starts with '>': (block, the number of its first line). The
    first block holds whatever comes before the first header (nothing, in a well-formed file)."""
    pieces: list[bytes] = []
    line, at_line_start = 1, True
    while chunk := f.read(READ_BYTES):
        at = 0
        if at_line_start and chunk[:1] == b">" and pieces:
            block = b"".join(pieces)
            yield block, line
            line, pieces = line + _line_breaks(block), []
        while (cut := chunk.find(b"\n>", at)) >= 0:
            pieces.append(chunk[at : cut + 1])
            block = b"".join(pieces)
            yield block, line
            line, pieces, at = line + _line_breaks(block), [], cut + 1
        pieces.append(chunk[at:])
        at_line_start = chunk[-1:] == b"\n"
    block = b"".join(pieces)
    if block:
        yield block, line


def _line_breaks(block: bytes) -> int:
    """Lines a block ends, as text mode counts them: \\n, \\r\\n or a lone \\r (a block ends after a \\n, so
    no \\r\\n is split between two)."""
    return block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")


def _read_fasta_lines(name: str, text: str, first_line: int) -> Iterator[Record]:
    """A block of FASTA read line by line, as text-mode files split lines (\\n, \\r\\n or a lone \\r)."""
    header: str | None = None
    header_line = 0
    chunks: list[str] = []
    for lineno, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=first_line):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if header is not None:
                yield _fasta_record(name, header, header_line, "".join(chunks))
            header, header_line, chunks = line[1:].strip(), lineno, []
        elif header is None:
            raise InputError(
                f"{name}:{lineno}: expected a FASTA header line starting with '>', got {line[:40]!r} "
                f"(for CSV/TSV/Parquet input use a .csv/.tsv/.parquet suffix)"
            )
        else:
            chunks.append("".join(line.split()))
    if header is not None:
        yield _fasta_record(name, header, header_line, "".join(chunks))


def _fasta_record(name: str, header: str, lineno: int, sequence: str) -> Record:
    if not header:
        raise InputError(f"{name}:{lineno}: FASTA header has no id")
    record_id = header.split()[0]
    if not sequence:
        raise InputError(f"{name}:{lineno}: record {record_id!r} has no sequence")
    return Record(record_id, sequence, f"{name}:{lineno}")


def _read_table(path: Path, id_column: str, sequence_column: str, sep: str | None) -> list[Record]:
    try:
        df = pd.read_parquet(path) if sep is None else pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many types; say which file failed and why
        raise InputError(f"cannot read table {str(path)!r}: {e}") from e
    for column, flag in ((id_column, "--id-column"), (sequence_column, "--sequence-column")):
        if column not in df.columns:
            raise InputError(
                f"{shown(path)}: no column {column!r} (set it with {flag}); columns are {list(map(str, df.columns))}"
            )
    records = []
    # Row numbers as a spreadsheet shows them: header is row 1.
    for row, (rid, seq) in enumerate(zip(df[id_column], df[sequence_column]), start=2):
        rid = "" if rid is None or (isinstance(rid, float) and pd.isna(rid)) else str(rid).strip()
        seq = "" if seq is None or (isinstance(seq, float) and pd.isna(seq)) else "".join(str(seq).split())
        if not rid:
            raise InputError(f"{shown(path)}: row {row}: empty id in column {id_column!r}")
        if not seq:
            raise InputError(f"{shown(path)}: row {row}: record {rid!r} has no sequence in column {sequence_column!r}")
        records.append(Record(rid, seq, f"{shown(path)}: row {row}"))
    return records


def unique_records(records: list[Record]) -> list[Record]:
    """Drop exact repeats (same id, same sequence); refuse one id with two different sequences."""
    seen: dict[str, Record] = {}
    out = []
    for r in records:
        first = seen.get(r.id)
        if first is None:
            seen[r.id] = r
            out.append(r)
        elif first.sequence.upper() != r.sequence.upper():
            raise InputError(
                f"record id {r.id!r} appears twice with different sequences: at {first.source} "
                f"(length {len(first.sequence)}) and at {r.source} (length {len(r.sequence)})"
            )
    return out
