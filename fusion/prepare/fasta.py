"""Small FASTA helpers for prepared data: write records, read them back (plain or gzip), reverse-complement."""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from fusion.prepare.manifest import PrepareError

# Complement of the IUPAC nucleotide codes, both cases; anything else maps to N so a stray
# letter can never survive reverse complementation looking like a real base.
_COMPLEMENT = str.maketrans("ACGTUNRYKMSWBDHVacgtunrykmswbdhv", "TGCAANYRMKSWVHDBtgcaanyrmkswvhdb")


def reverse_complement(seq: str) -> str:
    """Reverse complement of a DNA string (IUPAC-aware, case preserved)."""
    return seq.translate(_COMPLEMENT)[::-1]


class FastaWriter:
    """Write records one at a time (a 196 kb window per gene for 20k genes does not fit in a list comfortably)."""

    def __init__(self, path: str | Path, *, line_width: int = 80) -> None:
        self.path = Path(path)
        self.line_width = line_width  # residues per line; 0 writes each sequence on one line
        self.count = 0  # records written so far
        self._ids: set[str] = set()
        self._f: IO[str] = open(self.path, "w")

    def write(self, record_id: str, sequence: str) -> None:
        if not record_id or any(c.isspace() for c in record_id):
            raise PrepareError(f"{self.path}: record id {record_id!r} is empty or contains whitespace")
        if record_id in self._ids:
            raise PrepareError(f"{self.path}: record id {record_id!r} written twice")
        if not sequence:
            raise PrepareError(f"{self.path}: record {record_id!r} has an empty sequence")
        self._ids.add(record_id)
        self._f.write(f">{record_id}\n")
        w = self.line_width or len(sequence)
        # One write per record: a 196 kb window is ~2,500 lines, too many for one call each.
        self._f.write("\n".join(sequence[i : i + w] for i in range(0, len(sequence), w)) + "\n")
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FastaWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_fasta(path: str | Path, records: Iterable[tuple[str, str]], *, line_width: int = 80) -> int:
    """Write (id, sequence) pairs; return the number written. Ids must be unique and whitespace-free."""
    with FastaWriter(path, line_width=line_width) as w:
        for record_id, sequence in records:
            w.write(record_id, sequence)
        return w.count


def iter_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """(id, sequence) pairs in file order; the id is the header up to the first whitespace.

    Gzip is detected by content, not by suffix.
    """
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"FASTA file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    header: str | None = None
    header_line = 0
    chunks: list[str] = []
    with gzip.open(path, "rt") if gzipped else open(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    yield _record(path, header, header_line, chunks)
                header, header_line, chunks = line[1:].strip(), lineno, []
            elif header is None:
                raise PrepareError(f"{path}:{lineno}: expected a FASTA header starting with '>', got {line[:40]!r}")
            else:
                chunks.append(line)
    if header is not None:
        yield _record(path, header, header_line, chunks)


def read_fasta(path: str | Path) -> dict[str, str]:
    """All records as {id: sequence}, in file order; a repeated id is an error naming both lines' record."""
    out: dict[str, str] = {}
    for record_id, seq in iter_fasta(path):
        if record_id in out:
            raise PrepareError(f"{path}: record id {record_id!r} appears twice")
        out[record_id] = seq
    return out


def _record(path: Path, header: str, lineno: int, chunks: list[str]) -> tuple[str, str]:
    if not header:
        raise PrepareError(f"{path}:{lineno}: FASTA header has no id")
    return header.split()[0], "".join(chunks)
