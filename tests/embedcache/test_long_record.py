"""A record larger than a unit is embedded window batch by window batch and written shard by shard
(embedcache.long_record): the store equals the in-memory path's, for every reduction it applies."""

from __future__ import annotations

import numpy as np
import pytest

from embedcache import open_store, partition
from embedcache.long_record import embed_long_record

from .conftest import write_fasta
from .test_parity import random_seqs
from .test_store import esm2_config, run_build

AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.mark.parametrize("settings", [
    {},
    {"token_pool": 3},
    {"token_bins": 301, "pooling": "center", "pool_bins": 101},
    {"pooling": "cls"},
    {"tokens": False},
], ids=["mean", "token-pool", "central-bins", "cls", "pooled-only"])
def test_a_streamed_long_record_stores_what_the_in_memory_path_stores(tmp_path, models, settings, monkeypatch):
    streamed_ids = []

    def spy(*args, **kw):
        streamed_ids.append(args[-1])
        return embed_long_record(*args, **kw)

    monkeypatch.setattr(partition, "embed_long_record", spy)
    records = {**random_seqs(AA, [1000], seed=3), "short": "MKVLA" * 8}  # 1,000 residues: 21 windows of 64, overlap 16
    fasta = write_fasta(tmp_path / "in.fa", records)
    stores = {}
    for name, unit_mb in (("in_memory", 64.0), ("streamed", 0.001)):  # 0.001 MB: the long record exceeds a unit
        stores[name] = tmp_path / f"{name}.zarr"
        run_build(esm2_config(models, window=64, max_tokens=200, shard_mb=0.005, unit_mb=unit_mb, **settings), [fasta], stores[name])
    assert streamed_ids == ["s0_1000"]  # the long record took the streamed path, in the streamed build only
    a, b = open_store(stores["in_memory"]), open_store(stores["streamed"])
    assert a.ids == b.ids and len(a.ids) == 2 and b.complete
    long_id = next(i for i in a.ids if i != "short")
    assert int(b.record_info(long_id)["n_windows"]) > 10
    for rid in a.ids:
        if settings.get("tokens", True):
            np.testing.assert_array_equal(a.tokens(rid), b.tokens(rid))  # the stored fp16 rows, bit for bit
        np.testing.assert_allclose(a.pooled([rid]), b.pooled([rid]), rtol=1e-5, atol=1e-6)
    assert b.verify() == []  # the streamed shards' digests and the commit's crc agree


def test_records_sharing_small_units_are_not_streamed(tmp_path, models):
    """Units cut to whole shards may hold several windowed records larger than --unit-mb by the
    streaming rule's measure (float32 outputs): they are embedded together, as any unit's."""
    records = random_seqs(AA, [150, 140, 130, 120, 90, 70], seed=4)
    fasta = write_fasta(tmp_path / "in.fa", records)
    small, big = tmp_path / "small.zarr", tmp_path / "big.zarr"
    run_build(esm2_config(models, window=64, shard_mb=0.01, unit_mb=0.01), [fasta], small)
    run_build(esm2_config(models, window=64), [fasta], big)
    a, b = open_store(small), open_store(big)
    assert a.n_commits > 3 and a.complete
    for rid in records:
        np.testing.assert_array_equal(a.tokens(rid), b.tokens(rid))
