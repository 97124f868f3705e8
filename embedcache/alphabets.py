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


def _guess_hint(seq: str, alphabet: Alphabet) -> str:
    """Say so when the whole file looks like the wrong molecule (a protein file given to a DNA encoder)."""
    letters = [c for c in seq if c.isalpha()]
    if not letters:
        return ""
    nucleotide_fraction = sum(c in _NUCLEOTIDES for c in letters) / len(letters)
    if alphabet is not PROTEIN and nucleotide_fraction < 0.9 and all(c in PROTEIN.letters for c in letters):
        return " This looks like a protein sequence; use a protein encoder (esm2) for it."
    if alphabet is DNA and "U" in seq and all(c in RNA.letters for c in letters):
        return " This looks like RNA written with U; write it with T (cDNA), as the DNA/RNA models were trained on."
    return ""
