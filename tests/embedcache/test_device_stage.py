"""Batches reduced where they were computed (embedcache.device_stage): on a GPU a build copies back only
the stored rows (in the stored dtype) and pooled vectors. Forced on the CPU here, it stores what the host
path stores: rows bit for bit, pooled vectors within float32 rounding, for every reduction, windowed and
one-window sequences mixed in batches (so some wait for earlier ones past their buffer's reuse)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from embedcache import open_store, partition
from embedcache.config import BuildConfig
from embedcache.device_stage import DeviceStage
from embedcache.encoders import WindowOutput
from embedcache.host_stage import HostStage
from embedcache.windows import SequencePlan

from .conftest import write_fasta
from .test_parity import random_seqs
from .test_store import esm2_config, run_build

AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.mark.parametrize("settings", [
    {},
    {"layers": (1, 2)},
    {"token_pool": 3},
    {"token_bins": 21, "pooling": "center", "pool_bins": 11},
    {"pooling": "cls"},
    {"tokens": False},
    {"dtype": "float32"},
], ids=["mean", "two-layers", "token-pool", "central-bins", "cls", "pooled-only", "float32"])
def test_reducing_on_the_device_stores_what_the_host_path_stores(tmp_path, models, settings, monkeypatch):
    records = {**random_seqs(AA, [150, 140, 120, 70, 60, 45, 40, 33, 31, 30, 20, 12], seed=3), "dup": "MKVLA" * 6}
    records["again"] = records["dup"]  # a duplicate: embedded once
    fasta = write_fasta(tmp_path / "in.fa", records)
    config = esm2_config(models, window=64, max_tokens=70, **settings)  # the long ones in 2-3 windows; a window or two a batch
    host, device = tmp_path / "host.zarr", tmp_path / "device.zarr"
    run_build(config, [fasta], host)
    made = []
    monkeypatch.setattr(partition, "reduces_on_device", lambda d: True)
    slow = HostStage._write_finished  # a slow host stage: the forward runs as far ahead as the buffers allow

    def slowly(self):
        time.sleep(0.02)
        slow(self)

    monkeypatch.setattr(HostStage, "_write_finished", slowly)
    real = partition.DeviceStage
    monkeypatch.setattr(partition, "DeviceStage", lambda *a: made.append(real(*a)) or made[-1])
    run_build(config, [fasta], device)
    assert made and made[0].n > len(made[0].slots)  # the buffers were reused
    for layer in settings.get("layers", (None,)):
        a, b = open_store(host, layer=layer), open_store(device, layer=layer)
        assert a.ids == b.ids and b.verify() == []
        for rid in a.ids:
            if settings.get("tokens", True):
                np.testing.assert_array_equal(a.tokens(rid), b.tokens(rid))
            np.testing.assert_allclose(a.pooled([rid]), b.pooled([rid]), rtol=1e-5, atol=1e-6)


def test_the_device_stage_copies_back_only_what_is_stored():
    """Rows in the stored dtype, pooled vectors in float32: nothing else leaves the device. Each piece starts on
    a multiple of 16 bytes, so a float32 piece after an odd number of float16 values can still be viewed."""
    config = BuildConfig.create("esm2", "m", window=8)
    plans = [SequencePlan(0, 5, ((0, 5),), 5), SequencePlan(0, 12, ((0, 8), (6, 12)), 12)]
    stage = DeviceStage(plans, config, torch.device("cpu"), queued=2)
    hidden = torch.randn(5, 1, 3)  # 15 float16 values: 30 bytes
    window = torch.randn(8, 1, 3)
    batch = stage([(0, 0), (1, 0)], [WindowOutput(hidden, None), WindowOutput(window, None)])
    assert batch.rows[0].dtype == torch.float16 and torch.equal(batch.rows[0], hidden.half())
    assert torch.allclose(batch.pooled[0], hidden.mean(0)) and batch.pooled[1] is None and batch.rows[1] is None
    assert torch.equal(batch.window[1].hidden, window) and batch.window[0] is None
    assert len(stage.slots[0]) == 32 + 16 + 96  # fp16 rows (30 bytes, padded), fp32 pooled (12, padded), the fp32 window
