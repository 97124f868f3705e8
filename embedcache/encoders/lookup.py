"""ESM-family tokenisation (ESM2 residues, Nucleotide Transformer 6-mers) as numpy table lookups.

transformers' `EsmTokenizer` splits text with a pure-Python trie: ESM2 at about 350k residues/s,
NT at about 1.3M nucleotides/s on one core. That serialises before the first batch of a build
and re-runs on every finetune batch; on a GPU it would take a large share of the run.

For the vocabularies these models ship, the trie's leftmost-longest split has a closed form:
- ESM2: every plain (non-<...>) token is one character, so the split is one token per character.
- NT: the plain tokens are single letters plus EVERY k-mer over an alphabet A (k = 6, A = ACGT).
  Within a run of A-letters the longest match at each step is the next k-mer, so the run splits
  into consecutive k-mers from its start, and its last (run length mod k) letters are single
  tokens; any other letter (N) is a single token and ends the run.

`VocabLookup.of` recognises these vocabularies, and uses the lookup only after it reproduces the
tokenizer's own ids on probe strings covering every letter, run lengths around k, and mixed
runs. A sequence with a character outside the vocabulary's letters still goes through the tokenizer.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class VocabLookup:
    """Token ids of a sequence by table lookups; see the module docstring for when this is exact."""

    single_ids: np.ndarray  # (256,) int64: id of each one-letter token by ASCII code, -1 = none
    k: int  # length of the multi-letter tokens (1: single letters only)
    letter_index: np.ndarray  # (256,) int64: index of each k-mer letter in the alphabet, -1 = not one
    kmer_ids: np.ndarray  # (len(alphabet) ** k,) int64: id of each k-mer by its base-len(alphabet) code
    letters: bytes = field(init=False, repr=False)  # the characters with a token of their own, for bytes.translate

    def __post_init__(self) -> None:
        object.__setattr__(self, "letters", bytes(np.flatnonzero(self.single_ids >= 0).tolist()))

    @classmethod
    def of(cls, tokenizer) -> "VocabLookup | None":
        """A lookup equal to `tokenizer(seq, add_special_tokens=False)` on the letters it covers, or None."""
        from transformers import EsmTokenizer

        if not isinstance(tokenizer, EsmTokenizer) or getattr(tokenizer, "do_lower_case", False):
            return None  # other tokenizers split by other rules
        plain = {t: i for t, i in tokenizer.get_vocab().items() if not (t.startswith("<") and t.endswith(">"))}
        if not plain or any(not t.isascii() or any(c.isspace() for c in t) for t in plain):
            return None
        singles = {t: i for t, i in plain.items() if len(t) == 1}
        multis = {t: i for t, i in plain.items() if len(t) > 1}
        single_ids = np.full(256, -1, dtype=np.int64)
        for t, i in singles.items():
            single_ids[ord(t)] = i
        letter_index = np.full(256, -1, dtype=np.int64)
        if not multis:
            lookup = cls(single_ids, 1, letter_index, np.zeros(0, dtype=np.int64))
        else:
            k = len(next(iter(multis)))
            alphabet = sorted({c for t in multis for c in t})
            complete = len(multis) == len(alphabet) ** k and all(len(t) == k for t in multis)
            if not complete or any(c not in singles for c in alphabet):
                return None  # a partial k-mer set shifts the frame after a missing k-mer: not this closed form
            for a, c in enumerate(alphabet):
                letter_index[ord(c)] = a
            kmer_ids = np.empty(len(alphabet) ** k, dtype=np.int64)
            for t, i in multis.items():
                kmer_ids[int(np.dot(letter_index[[ord(c) for c in t]], len(alphabet) ** np.arange(k - 1, -1, -1)))] = i
            lookup = cls(single_ids, k, letter_index, kmer_ids)
        for probe in _probes(sorted(singles), lookup.k):
            ids = lookup(probe)
            if ids is None or ids.tolist() != tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]:
                return None
        return lookup

    def __call__(self, seq: str) -> np.ndarray | None:
        """(n_tokens,) int64 ids of `seq`, or None when it has a character the tables do not cover."""
        if not seq.isascii():
            return None
        codes = np.frombuffer(seq.encode("ascii"), dtype=np.uint8)
        singles = self.single_ids[codes]  # (n,)
        if (singles < 0).any():
            return None
        letters = self.letter_index[codes]  # (n,) alphabet index, -1 for other letters (N)
        in_run = letters >= 0
        if self.k == 1 or not in_run.any():
            return singles
        starts = in_run & ~np.r_[False, in_run[:-1]]  # (n,) first letter of each run
        run = np.cumsum(starts) - 1  # (n,) run number of each position (valid inside runs)
        run_start = np.flatnonzero(starts)  # (runs,)
        run_len = np.flatnonzero(in_run & ~np.r_[in_run[1:], False]) + 1 - run_start  # (runs,)
        offset = np.arange(len(codes)) - run_start[run]  # (n,) position within its run
        in_kmer = in_run & (offset < (run_len // self.k * self.k)[run])  # (n,) covered by a whole k-mer
        kmer_start = in_kmer & (offset % self.k == 0)
        base = int(round(len(self.kmer_ids) ** (1 / self.k)))
        windows = np.lib.stride_tricks.sliding_window_view(np.r_[np.maximum(letters, 0), np.zeros(self.k - 1, np.int64)], self.k)
        kmer_codes = windows @ (base ** np.arange(self.k - 1, -1, -1))  # (n,) code of the k letters from each position
        ids = np.where(kmer_start, self.kmer_ids[kmer_codes], singles)  # (n,)
        return ids[kmer_start | ~in_kmer]


    def count(self, seq: str) -> int | None:
        """len(self(seq)) without making the ids: about 3 bytes a letter instead of ~20, which is what
        planning a chromosome-long record needs (it only counts). None where `self(seq)` is None."""
        if not seq.isascii():
            return None
        data = seq.encode("ascii")
        if data.translate(None, self.letters):  # a character without a token of its own (one pass in C)
            return None
        if self.k == 1:
            return len(data)
        codes = np.frombuffer(data, dtype=np.uint8)
        in_run = (self.letter_index >= 0)[codes].view(np.int8)  # (n,) 1 inside runs of k-mer letters
        edges = np.flatnonzero(np.diff(in_run, prepend=np.int8(0), append=np.int8(0)))  # (2 * runs,) starts and ends
        lengths = edges[1::2] - edges[::2]  # (runs,)
        return int(len(codes) - lengths.sum() + (lengths // self.k + lengths % self.k).sum())


def _probes(letters: list[str], k: int) -> list[str]:
    """Strings that exercise the split: every letter, then (for k-mers) runs of every length around
    k and 2k between the other letters, and seeded random mixes."""
    probes = ["".join(letters) * 2]
    if k > 1:
        rng = random.Random(0)
        for n, sep in itertools.product(range(1, 2 * k + 2), letters):
            probes.append("".join(rng.choice(letters) for _ in range(n)) + sep + "".join(rng.choice(letters) for _ in range(k + 1)))
        probes += ["".join(rng.choice(letters) for _ in range(rng.randint(1, 12 * k))) for _ in range(50)]
    return probes
