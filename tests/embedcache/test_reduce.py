"""--token-pool: exact group means, the planned row count, the fingerprint, and a real build read by fusion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embedcache.config import BuildConfig, fingerprint, fingerprint_fields
from embedcache.errors import EncoderError
from embedcache.reduce import pool_rows, pooled_rows
from tests.embedcache.test_parity import AA, FP16, build_store, random_seqs


def test_pool_rows_averages_runs_and_keeps_the_short_last_run() -> None:
    x = torch.arange(10, dtype=torch.float32).reshape(5, 2)  # rows (0,1) (2,3) (4,5) (6,7) (8,9)
    assert torch.equal(pool_rows(x, 2), torch.tensor([[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]))
    assert torch.equal(pool_rows(x, 5), x.mean(0, keepdim=True))
    assert torch.equal(pool_rows(x, 8), x.mean(0, keepdim=True))  # one run shorter than k
    assert pool_rows(x, None) is x and pool_rows(x, 1) is x
    layers = torch.randn(7, 3, 4)  # (L, layer, d): only the token axis is pooled
    assert pool_rows(layers, 3).shape == (3, 3, 4)
    torch.testing.assert_close(pool_rows(layers, 3)[2], layers[6])


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9])
@pytest.mark.parametrize("k", [None, 1, 3, 8])
def test_pooled_rows_is_what_pool_rows_returns(n: int, k: int | None) -> None:
    assert pooled_rows(n, k) == len(pool_rows(torch.zeros(n, 2), k))


def test_token_pool_is_in_the_fingerprint_only_when_set() -> None:
    base = BuildConfig.create("esm2", "m")
    fields_off = fingerprint_fields(base, {"encoder": "esm2"}, 0)
    fields_on = fingerprint_fields(BuildConfig.create("esm2", "m", token_pool=4), {"encoder": "esm2"}, 0)
    assert "token_pool" not in fields_off  # stores built before the option keep their fingerprints
    assert fields_on["token_pool"] == 4 and fingerprint(fields_on) != fingerprint(fields_off)
    with pytest.raises(EncoderError, match="--token-pool must be a positive integer, got 0"):
        BuildConfig.create("esm2", "m", token_pool=0)


@torch.inference_mode()
def test_a_pooled_build_stores_the_means_of_the_full_rows(tmp_path, models) -> None:
    records = random_seqs(AA, [3, 9, 30, 31])
    full = build_store(tmp_path, "full", "esm2", models["esm2"], records)
    pooled = build_store(tmp_path, "pooled", "esm2", models["esm2"], records, token_pool=4)
    assert pooled.attrs["config"]["token_pool"] == 4 and pooled.fingerprint != full.fingerprint
    for rid in records:
        rows = full.tokens(rid).astype(np.float32)
        assert len(pooled.tokens(rid)) == math.ceil(len(rows) / 4)
        np.testing.assert_allclose(pooled.tokens(rid).astype(np.float32), pool_rows(torch.from_numpy(rows), 4).numpy(), **FP16)
        np.testing.assert_allclose(pooled.pooled([rid]), full.pooled([rid]), rtol=1e-5, atol=1e-6)  # from every row


@torch.inference_mode()
def test_a_pooled_build_of_several_layers_pools_each_layer(tmp_path, models) -> None:
    from embedcache import open_store

    records = random_seqs(AA, [9, 31])
    full = build_store(tmp_path, "full", "esm2", models["esm2"], records, layers=(0, -1))
    build_store(tmp_path, "pooled", "esm2", models["esm2"], records, layers=(0, -1), token_pool=3)
    for layer in full.layers:
        one, pooled = open_store(full.path, layer=layer), open_store(tmp_path / "pooled.zarr", layer=layer)
        for rid in records:
            rows = torch.from_numpy(one.tokens(rid).astype(np.float32))
            np.testing.assert_allclose(pooled.tokens(rid).astype(np.float32), pool_rows(rows, 3).numpy(), **FP16)
