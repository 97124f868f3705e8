"""Numpy tokenisation (embedcache.encoders.lookup) gives exactly the tokenizers' ids, and is used only where it can."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from embedcache.config import BuildConfig
from embedcache.encoders import load_encoder
from embedcache.encoders.lookup import VocabLookup


def slow_ids(tokenizer, seq: str) -> list[int]:
    return tokenizer(seq, add_special_tokens=False, verbose=False)["input_ids"]


@pytest.mark.parametrize(
    "name,alphabets,k",
    [
        ("esm2", ["ACDEFGHIKLMNPQRSTVWY", "ACDEFGHIKLMNPQRSTVWYXBZUO.-"], 1),
        # NT: 6-mers within ACGT runs, N breaking runs, runs of every length around 6
        ("nucleotide-transformer", ["ACGT", "ACGTN", "ACGTNNNN", "AN", "N"], 6),
    ],
)
def test_lookup_equals_the_tokenizer(models, name, alphabets, k):
    tokenizer = AutoTokenizer.from_pretrained(models[name])
    lookup = VocabLookup.of(tokenizer)
    assert lookup is not None and lookup.k == k
    rng = random.Random(0)
    for _ in range(2000):
        alphabet = rng.choice(alphabets)
        seq = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 100)))
        assert lookup(seq).tolist() == slow_ids(tokenizer, seq), seq
        assert lookup.count(seq) == len(lookup(seq)), seq  # what planning uses: the count alone
    long = "".join(rng.choice("ACGTN" if k > 1 else alphabets[0]) for _ in range(5000))
    assert lookup(long).tolist() == slow_ids(tokenizer, long)
    assert lookup.count(long) == len(lookup(long))
    assert lookup("").tolist() == [] and lookup.count("") == 0


@pytest.mark.parametrize("name,outside", [("esm2", ["MKVJJL", "mkvl", "MK VL", "MKÉVL", "MK<mask>VL"]),
                                          ("nucleotide-transformer", ["ACGTU", "acgtac", "ACG TAC", "ACGRYA"])])  # fmt: skip
def test_characters_outside_the_tables_go_through_the_tokenizer(models, name, outside):
    encoder = load_encoder(name, BuildConfig.create(name, str(models[name])).encoder_settings())
    assert encoder.lookup is not None
    for seq in outside:
        assert encoder.lookup(seq) is None and encoder.lookup.count(seq) is None, seq
        assert encoder.count_tokens(seq) == len(slow_ids(encoder.tokenizer, seq)), seq
        assert encoder.tokenize(seq).tolist() == slow_ids(encoder.tokenizer, seq), seq


def test_no_lookup_where_the_split_has_no_closed_form(models):
    # GPT-2's and the remote model's are not ESM tokenizers.
    for name in ("gpt2", "remote"):
        assert VocabLookup.of(AutoTokenizer.from_pretrained(models[name])) is None, name
    # An ESM tokenizer with an added multi-letter token ("MK") splits differently: refused.
    tokenizer = AutoTokenizer.from_pretrained(models["esm2"])
    tokenizer.add_tokens(["MK"])
    assert VocabLookup.of(tokenizer) is None
