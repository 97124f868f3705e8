"""Out-of-memory resilience of the build, on the CPU: a real encoder whose forward raises
torch.OutOfMemoryError above a number of padded positions, as a GPU would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embedcache.partition
from embedcache import open_store
from embedcache.alphabets import PROTEIN
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.encoders.hf import _NO_POOLER, HFTokenEncoder
from embedcache.errors import EmbedcacheError, EncoderError
from embedcache.memory import MemoryGuard

from .conftest import write_fasta
from .test_parity import FP32, random_seqs


class LimitedMemoryEsm2(HFTokenEncoder):
    """The esm2 encoder on a device that holds at most `capacity` padded positions per call."""

    def __init__(self, settings, capacity: int):
        super().__init__("esm2", settings, PROTEIN, expect_model_type="esm", model_kwargs=_NO_POOLER)
        self.capacity, self.calls = capacity, []

    def forward(self, windows, to_host=True, packed=None):
        padded = len(windows) * max(self.cost(len(w)) for w in windows)
        self.calls.append(padded)
        if padded > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to hold {padded} positions (injected)")
        return super().forward(windows, to_host, packed)


def build_limited(tmp_path, models, monkeypatch, records, capacity, name="s", **config):
    encoders = []

    def load(encoder, settings, *, weights=True):
        encoders.append(LimitedMemoryEsm2(settings, capacity))
        return encoders[-1]

    monkeypatch.setattr(embedcache.partition, "load_encoder", load)
    monkeypatch.setattr(embedcache.partition, "_ENCODERS", {})  # not an encoder an earlier test loaded
    monkeypatch.setattr(embedcache.partition, "_GUARDS", {})
    fasta = write_fasta(tmp_path / f"{name}.fa", records)
    lines = []
    build(BuildConfig.create("esm2", str(models["esm2"]), **config), [fasta], tmp_path / f"{name}.zarr", progress=False, log=lines.append)
    return open_store(tmp_path / f"{name}.zarr"), encoders[0], lines


def test_a_batch_out_of_memory_is_split_and_the_budget_lowered_once(tmp_path, models, monkeypatch):
    records = random_seqs("ACDEFGHIKLMNPQRSTVWY", [30, 31, 32, 40, 41, 50, 60, 61, 62, 70], seed=1)
    # Budget 300: the first batch (4 windows of <= 72 positions = 288) fails on a device that holds 150.
    store, encoder, lines = build_limited(tmp_path, models, monkeypatch, records, capacity=150, max_tokens=300)
    said = [line for line in lines if "out of cpu memory" in line]
    assert len(said) == 1 and "lowering --max-tokens from 300 to 144" in said[0], lines
    # One failure only: its halves fit, and the later batches were split to the lowered budget before running.
    assert [c for c in encoder.calls if c > 150] == [288] and len(encoder.calls) > 4
    assert store.complete and len(store) == len(records)
    monkeypatch.undo()  # the reference: the plain esm2 encoder, no memory limit
    reference = build(BuildConfig.create("esm2", str(models["esm2"]), max_tokens=300), [tmp_path / "s.fa"],
                      tmp_path / "ref.zarr", progress=False, log=lambda s: None)  # fmt: skip
    assert reference.plan.fingerprint == store.fingerprint
    ref = open_store(tmp_path / "ref.zarr")
    for rid in records:
        np.testing.assert_allclose(store.tokens(rid).astype(np.float32), ref.tokens(rid).astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(store.pooled([rid]), ref.pooled([rid]), **FP32)


def test_a_window_that_cannot_fit_alone_names_its_record_and_length(tmp_path, models, monkeypatch):
    records = {"short": "MKTAYIAK", "titin_piece": "ACDEFGHIKLMNPQRSTVWY" * 4}
    # The build names the unit and worker around the encoder's own message (embedcache.partition.UnitError).
    with pytest.raises(EmbedcacheError, match=r"unit 0 .* record 'titin_piece': one window of 80 tokens \(82 positions\) does not fit in cpu memory even alone"):
        build_limited(tmp_path, models, monkeypatch, records, capacity=40)
    assert not open_store(tmp_path / "s.zarr").complete


def test_guard_keeps_the_order_of_windows(models):
    encoder = LimitedMemoryEsm2(BuildConfig.create("esm2", str(models["esm2"])).encoder_settings(), capacity=30)
    windows = [encoder.tokenize(s) for s in ("MKT", "MKTAYIAKQRQISFVKSH", "AY", "MKTAYIAK")]
    lines = []
    guard = MemoryGuard(encoder, 10_000, lines.append)
    got = guard(windows, ["a", "b", "c", "d"])
    assert len(lines) == 1 and guard.max_tokens < 10_000
    for w, out in zip(windows, got):
        (want,) = encoder.forward([w])
        torch.testing.assert_close(out.hidden, want.hidden, rtol=1e-4, atol=1e-5)
