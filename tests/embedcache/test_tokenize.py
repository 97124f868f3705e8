"""The numpy fast path of ESM2 tokenisation gives exactly the tokenizer's ids, and is used only where it can."""

from __future__ import annotations

import random

import numpy as np
from transformers import AutoTokenizer

from embedcache.config import BuildConfig
from embedcache.encoders import load_encoder
from embedcache.encoders.hf import CharLookup


def slow_ids(tokenizer, seq: str) -> list[int]:
    return tokenizer(seq, add_special_tokens=False, verbose=False)["input_ids"]


def test_esm2_lookup_equals_the_tokenizer(models):
    tokenizer = AutoTokenizer.from_pretrained(models["esm2"])
    lookup = CharLookup.of(tokenizer)
    assert lookup is not None
    letters = [t for t in tokenizer.get_vocab() if len(t) == 1]  # the 20 amino acids, X B Z U O, '.', '-'
    rng = random.Random(0)
    for n in (1, 2, 7, 100, 1500):
        seq = "".join(rng.choice(letters) for _ in range(n))
        assert lookup(seq).tolist() == slow_ids(tokenizer, seq), seq


def test_characters_outside_the_table_go_through_the_tokenizer(models):
    encoder = load_encoder("esm2", BuildConfig.create("esm2", str(models["esm2"])).encoder_settings())
    tokenizer = encoder.tokenizer
    assert encoder.char_lookup is not None
    for seq in ("MKVJJL", "mkvl", "MK VL", "MKÉVL", "MK<mask>VL"):
        assert encoder.char_lookup(seq) is None, seq
        assert encoder.tokenize(seq).tolist() == slow_ids(tokenizer, seq), seq
    assert encoder.tokenize("MKVL").dtype == np.int64


def test_no_lookup_for_multi_character_or_other_tokenizers(models):
    # NT's 6-mers are a longest-match split the table cannot reproduce; GPT-2's is not an ESM tokenizer.
    for name in ("nucleotide-transformer", "gpt2", "remote"):
        assert CharLookup.of(AutoTokenizer.from_pretrained(models[name])) is None, name
