"""Residue alphabets and the one function that checks a sequence against one."""

from __future__ import annotations

from dataclasses import dataclass

from embedcache.errors import AlphabetError


@dataclass(frozen=True, slots=True)
class Alphabet:
    name: str  # what the user sees in errors: "dna", "protein", ...
    letters: frozenset[str]  # accepted upper-case characters


PROTEIN = Alphabet("protein", frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO"))  # ESM2's residue vocabulary
DNA = Alphabet("dna", frozenset("ACGTN"))
RNA = Alphabet("rna", frozenset("ACGUN"))
ALPHABETS = {a.name: a for a in (PROTEIN, DNA, RNA)}

_NUCLEOTIDES = frozenset("ACGTUN")


def check_sequence(seq: str, alphabet: Alphabet | None, *, record: str, source: str, encoder: str) -> str:
    """Upper-case `seq` and check every character; return the upper-cased sequence.

    With `alphabet=None` the sequence is returned unchanged (a generic tokenizer may be
    case-sensitive, so we do not touch it).
    """
    if alphabet is None:
        return seq
    upper = seq.upper()
    bad = [(i, c) for i, c in enumerate(upper) if c not in alphabet.letters]
    if not bad:
        return upper
    pos, char = bad[0]
    hint = _guess_hint(upper, alphabet)
    raise AlphabetError(
        f"{source}: record {record!r}: character {seq[pos]!r} at position {pos + 1} is not in the "
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


def check_molecule(sequences: dict[str, tuple[str, str]], alphabet: Alphabet | None, *, encoder: str) -> None:
    """Refuse DNA/RNA given to a protein encoder: every nucleotide letter is a valid amino acid code,
    so record by record nothing is wrong, but over a whole input (>= 100 letters, >= 95% A, C, G,
    T/U, N) no real protein set looks like that.

    sequences: record id -> (upper-cased residues, source "file:line").
    """
    if alphabet is not PROTEIN or not sequences:
        return
    counts = [(sum(seq.count(c) for c in _NUCLEOTIDES), len(seq)) for seq, _ in sequences.values()]
    nucleotides, total = sum(n for n, _ in counts), sum(t for _, t in counts)
    if total < NUCLEOTIDE_INPUT_MIN_LETTERS or nucleotides / total < NUCLEOTIDE_INPUT_FRACTION:
        return
    record, (seq, source) = next(iter(sequences.items()))
    raise AlphabetError(
        f"{source}: record {record!r} ({seq[:20]}...) and the rest of this input look like nucleotide sequences: "
        f"{nucleotides / total:.0%} of {total:,} letters are A, C, G, T/U or N, but encoder {encoder!r} reads "
        f"protein. Use a nucleotide encoder (nucleotide-transformer) for DNA/RNA, or give the translated proteins"
    )
