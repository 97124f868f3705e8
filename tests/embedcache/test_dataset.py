"""xarray as users expect it: `open_dataset` indexed by record id, and `xr.open_zarr` of a fresh
store without a warning (consolidated metadata), which neither embedcache reader trusts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from embedcache import open_dataset, open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.errors import StoreError

from .conftest import write_fasta
from .test_parity import AA, random_seqs


def config(models, **kw) -> BuildConfig:
    if "shard_mb" in kw:  # one shard per unit: several commits, so unused token rows between them
        kw.setdefault("unit_mb", kw["shard_mb"])
    return BuildConfig.create("esm2", str(models["esm2"]), **kw)


def run_build(cfg, inputs, store, options=None):
    return build(cfg, inputs, store, storage_options=options, progress=False, log=lambda s: None)


def assert_matches_store(ds: xr.Dataset, store, layer: int) -> None:
    """Every record of `store` (and only those) in `ds`, with its values at `layer`."""
    assert list(ds.sequence.values) == store.ids
    flat, offsets, lengths = store.token_arrays(layer)
    np.testing.assert_array_equal(ds.token_offset.values, offsets)
    np.testing.assert_array_equal(ds.token_length.values, lengths)
    for rid in store.ids:
        np.testing.assert_array_equal(ds.pooled.sel(sequence=rid).values, store.pooled([rid], layer)[0])
        np.testing.assert_array_equal(ds.embedcache.tokens(rid).values, store.tokens(rid, layer))
        assert ds.residues.sel(sequence=rid).item() == store.sequence(rid)
        info = store.record_info(rid)
        assert ds.content.sel(sequence=rid).item() == info["content_key"]
        assert int(ds.n_input_tokens.sel(sequence=rid)) == info["n_input_tokens"]
    np.testing.assert_array_equal(ds.tokens.values, flat)  # committed rows only, packed as token_arrays packs them


def test_open_dataset_is_indexed_by_record_id_and_equals_open_store(tmp_path, models):
    records = random_seqs(AA, [100, 3, 250, 40, 7], seed=5)
    records["alias"] = records["s0_100"]  # shares its sequence (and so its rows) with s0_100
    store_path = tmp_path / "s.zarr"
    run_build(config(models, layers=(0, -1), shard_mb=0.01), [write_fasta(tmp_path / "a.fa", records)], store_path)
    store = open_store(store_path, layer=-1)
    assert store.n_commits > 2 and store.layers == [0, 2]

    ds = open_dataset(store_path)  # default: the last stored layer
    assert dict(ds.sizes) == {"sequence": 6, "feature": store.embed_dim, "token": sum(len(v) for k, v in records.items() if k != "alias")}
    assert int(ds.layer) == 2 and ds.pooled.dims == ("sequence", "feature") and ds.tokens.dims == ("token", "feature")
    assert not ds.pooled.variable._in_memory and not ds.tokens.variable._in_memory  # lazy: nothing read on open
    assert ds.attrs["fingerprint"] == store.fingerprint and ds.attrs["provenance"] == store.attrs["provenance"]
    assert ds.attrs["config"]["encoder"] == "esm2" and ds.attrs["layers"] == [0, 2] and ds.attrs["status"] == "complete"
    assert_matches_store(ds, store, 2)
    np.testing.assert_array_equal(ds.embedcache.tokens("alias").values, ds.embedcache.tokens("s0_100").values)
    picked = ds.pooled.sel(sequence=["s2_250", "alias", "s1_3"]).values  # any order, repeats allowed
    np.testing.assert_array_equal(picked, store.pooled(["s2_250", "alias", "s1_3"]))

    for spec, resolved in ((-1, 2), (2, 2), (0, 0)):  # the library's layer spec: -1 is the last hidden state
        assert int(open_dataset(store_path, layer=spec).layer) == resolved
    assert_matches_store(open_dataset(store_path, layer=0), open_store(store_path, layer=0), 0)
    dask_ds = open_dataset(str(store_path), layer=0, chunks={})
    assert dask_ds.pooled.chunks is not None
    np.testing.assert_array_equal(dask_ds.pooled.values, store.pooled(layer=0))
    assert len(dask_ds.tokens.chunks[0]) > 1  # whole shards per chunk: chunks cross the gaps between commits
    np.testing.assert_array_equal(dask_ds.tokens.values, store.token_arrays(0)[0])

    with pytest.raises(StoreError, match=r"holds layers \[0, 2\], not layer 1"):
        open_dataset(store_path, layer=1)
    with pytest.raises(StoreError, match="'nope' is not in store"):
        ds.embedcache.tokens("nope")


def test_store_without_tokens_has_no_token_variables(tmp_path, models):
    store_path = tmp_path / "s.zarr"
    run_build(config(models, tokens=False), [write_fasta(tmp_path / "a.fa", random_seqs(AA, [12, 30], seed=2))], store_path)
    ds = open_dataset(store_path)
    assert "tokens" not in ds and "token_offset" not in ds and "pooled" in ds
    np.testing.assert_array_equal(ds.pooled.values, open_store(store_path).pooled())
    with pytest.raises(StoreError, match="no per-token rows"):
        ds.embedcache.tokens(ds.sequence.values[0])


def _open_zarr_without_warning(url, options=None) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(url, storage_options=options or None)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.storage)])
def test_fresh_store_opens_in_xarray_without_a_warning(where, request, tmp_path, models):
    if where == "s3":
        from tests.conftest import unique_name

        url, options = f"s3://embedcache-test/{unique_name('ds')}/s.zarr", {"endpoint_url": request.getfixturevalue("s3_endpoint")}
    else:
        url, options = str(tmp_path / "s.zarr"), None
    run_build(config(models), [write_fasta(tmp_path / "a.fa", random_seqs(AA, [12, 40], seed=3))], url, options)
    raw = _open_zarr_without_warning(url, options)
    assert raw.sizes["sequence"] == 2
    store = open_store(url, options)
    ds = open_dataset(url, storage_options=options)
    assert_matches_store(ds, store, store.layers[0])


def test_stale_consolidated_metadata_misleads_no_reader_and_no_build(tmp_path, models):
    store_path = tmp_path / "s.zarr"
    first = random_seqs(AA, [20, 60], seed=7)
    run_build(config(models, shard_mb=0.01), [write_fasta(tmp_path / "a.fa", first)], store_path)
    snapshot = (store_path / "zarr.json").read_text()  # consolidated: 2 records
    more = {**first, **random_seqs(AA, [35, 80, 15], seed=8)}
    run_build(config(models, shard_mb=0.01), [write_fasta(tmp_path / "b.fa", more)], store_path)
    (store_path / "zarr.json").write_text(snapshot)  # stale: an older copy, as another tool might leave it
    assert _open_zarr_without_warning(store_path).sizes["sequence"] == 2  # xarray believes it

    store = open_store(store_path)  # the commit log decides
    assert len(store) == 5 and store.verify() == []
    assert_matches_store(open_dataset(store_path), store, store.layers[0])

    # A build into it (its workers open the arrays through zarr's defaults) then refreshes the snapshot.
    most = {**more, **random_seqs(AA, [50, 90], seed=9)}
    run_build(config(models, shard_mb=0.01), [write_fasta(tmp_path / "c.fa", most)], store_path)
    store = open_store(store_path)
    assert len(store) == 7 and store.verify() == []
    assert _open_zarr_without_warning(store_path).sizes["sequence"] == 7
    assert_matches_store(open_dataset(store_path), store, store.layers[0])
