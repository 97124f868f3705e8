"""Residue alphabets and the one function that checks a sequence against one."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedcache.errors import AlphabetError


@dataclass(frozen=True, slots=True)
class Alphabet:
    name: str  # what the user sees in errors: "dna", "protein", ...
    letters: frozenset[str]  # accepted upper-case characters (ASCII)
    letter_bytes: bytes = field(init=False, repr=False, compare=False)  # the same, for bytes.translate

    def __post_init__(self) -> None:
        object.__setattr__(self, "letter_bytes", "".join(sorted(self.letters)).encode("ascii"))

    def holds(self, upper: str) -> bool:
        """Whether every character of `upper` is a letter: one pass in C, not a Python step per residue
        (planning checks every record before the first model call)."""
        return upper.isascii() and not upper.encode("ascii").translate(None, self.letter_bytes)


PROTEIN = Alphabet("protein", frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO"))  # ESM2's residue vocabulary
DNA = Alphabet("dna", frozenset("ACGTN"))
RNA = Alphabet("rna", frozenset("ACGUN"))
ALPHABETS = {a.name: a for a in (PROTEIN, DNA, RNA)}

_NUCLEOTIDES = frozenset("ACGTUN")
_NUCLEOTIDE_BYTES = b"ACGTUN"


def check_sequence(seq: str, alphabet: Alphabet | None, *, record: str, source: str, encoder: str) -> str:
    """Upper-case `seq` and check every character; return the upper-cased sequence.

    With `alphabet=None` the sequence is returned unchanged (a generic tokenizer may be
    case-sensitive, so we do not touch it).
    """
    if alphabet is None:
        return seq
    upper = seq.upper()
    if alphabet.holds(upper):
        return upper
    bad = [(i, c) for i, c in enumerate(upper) if c not in alphabet.letters]
    pos, char = bad[0]
    hint = _guess_hint(upper, alphabet)
    raise AlphabetError(
        f"{source}: record {record!r}: character {upper[pos]!r} at position {pos + 1} is not in the "
        f"{alphabet.name} alphabet ({''.join(sorted(alphabet.letters))}) of encoder {encoder!r}; "
        f"{len(bad)} such character(s) in this record.{hint}"
    )


# IUPAC nucleotide codes: ACGT/U, N and the ambiguity codes (R = A/G, Y = C/T, K, M, S, W, B, D, H, V).
_IUPAC_NUCLEOTIDES = frozenset("ACGTUNRYKMSWBDHV")


def _guess_hint(seq: str, alphabet: Alphabet) -> str:
    """Say so when the record looks like another molecule than the encoder reads, or uses codes it lacks."""
    letters = [c for c in seq if c.isalpha()]
    if not letters:
        return ""
    if alphabet is not PROTEIN and all(c in _IUPAC_NUCLEOTIDES for c in letters):
        # Checked before the protein hint: R, Y, K, M, ... are protein letters too, but a record of
        # nucleotide codes only is DNA with ambiguity codes (ACGTRYKM), not a protein.
        codes = sorted({c for c in letters if c not in alphabet.letters and c not in "TU"})
        if codes:
            return (
                f" This looks like {alphabet.name.upper()} with IUPAC ambiguity codes ({''.join(codes)}); "
                f"the encoder reads only {''.join(sorted(alphabet.letters))}: replace them with N."
            )
    nucleotide_fraction = sum(c in _NUCLEOTIDES for c in letters) / len(letters)
    if alphabet is not PROTEIN and nucleotide_fraction < 0.9 and all(c in PROTEIN.letters for c in letters):
        return " This looks like a protein sequence; use a protein encoder (esm2) for it."
    if alphabet is DNA and "U" in seq and all(c in RNA.letters for c in letters):
        return " This looks like RNA written with U; write it with T (cDNA), as the DNA/RNA models were trained on."
    return ""


# Whole inputs at least this long and at least this nucleotide-like are refused by a protein encoder.
NUCLEOTIDE_INPUT_MIN_LETTERS = 100
NUCLEOTIDE_INPUT_FRACTION = 0.95


class MoleculeTally:
    """Nucleotide letters over a whole input, counted as records stream by (for `check_molecule`)."""

    def __init__(self, alphabet: Alphabet | None, *, encoder: str):
        self.alphabet, self.encoder = alphabet, encoder
        self.nucleotides = self.total = 0
        self.first: tuple[str, str, str] | None = None  # (record, residues, source) of the first record

    def add(self, record: str, seq: str, source: str) -> None:
        if self.alphabet is not PROTEIN:
            return
        if self.first is None:
            self.first = (record, seq[:20], source)
        # Counted as what deleting them removes: one pass in C (a count per letter took six).
        others = len(seq.encode("ascii").translate(None, _NUCLEOTIDE_BYTES)) if seq.isascii() else sum(c not in _NUCLEOTIDES for c in seq)
        self.nucleotides += len(seq) - others
        self.total += len(seq)

    def check(self) -> None:
        """Refuse DNA/RNA given to a protein encoder: every nucleotide letter is a valid amino acid code,
        so record by record nothing is wrong, but over a whole input (>= 100 letters, >= 95% A, C, G,
        T/U, N) no real protein set looks like that."""
        if self.first is None or self.total < NUCLEOTIDE_INPUT_MIN_LETTERS or self.nucleotides / self.total < NUCLEOTIDE_INPUT_FRACTION:
            return
        record, seq, source = self.first
        raise AlphabetError(
            f"{source}: record {record!r} ({seq}...) and the rest of this input look like nucleotide sequences: "
            f"{self.nucleotides / self.total:.0%} of {self.total:,} letters are A, C, G, T/U or N, but encoder "
            f"{self.encoder!r} reads protein. Use a nucleotide encoder (nucleotide-transformer) for DNA/RNA, or give "
            f"the translated proteins"
        )


def check_molecule(sequences: dict[str, tuple[str, str]], alphabet: Alphabet | None, *, encoder: str) -> None:
    """`MoleculeTally` over `sequences`: record id -> (upper-cased residues, source "file:line")."""
    tally = MoleculeTally(alphabet, encoder=encoder)
    for record, (seq, source) in sequences.items():
        tally.add(record, seq, source)
    tally.check()
