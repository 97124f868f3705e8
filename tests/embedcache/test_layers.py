"""Several hidden states in one forward pass (`--layer 0 1 -1`): each stored layer equals a build of that
layer alone, and readers (open_store, xarray, fusion) select a layer by its index."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from cli.embedcache_cli import main as embedcache_main
from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.encoders import load_encoder
from embedcache.errors import EncoderError, StoreError

from .conftest import write_fasta
from .test_parity import random_seqs

AA = "ACDEFGHIKLMNPQRSTVWY"
QUIET = dict(progress=False, log=lambda s: None)

# models fixture name -> (encoder, alphabet, build options)
CASES = {
    "esm2": ("esm2", AA, {}),  # unpadded inference on the CPU
    "esm2-padded": ("esm2", AA, {"attn_implementation": "eager"}),  # transformers' padded forward
    "nucleotide-transformer": ("nucleotide-transformer", "ACGT", {}),  # windows and stitching (37-token windows)
    "bert": ("hf", AA, {}),  # token type ids, a CLS token
    "hyena": ("hf", "ACGT", {"trust_remote_code": True}),  # no attention mask; last_hidden_state has a final norm
}


def _build(tmp_path, name, model, fasta, layers, **options):
    encoder = CASES[name][0]
    store = tmp_path / f"{name}-{'_'.join(map(str, layers))}.zarr"
    build(BuildConfig.create(encoder, str(model), layers=layers, max_tokens=64, **options), [fasta], store, **QUIET)
    return open_store(store)


@pytest.mark.parametrize("name", list(CASES))
def test_each_layer_of_a_multi_layer_build_equals_a_single_layer_build(tmp_path, models, name):
    encoder, letters, options = CASES[name]
    model = models[name.removesuffix("-padded")]
    pooling = {"pooling": "cls"} if name == "bert" else {}
    fasta = write_fasta(tmp_path / "in.fa", random_seqs(letters, [5, 17, 33, 60, 120], seed=2))
    multi = _build(tmp_path, name, model, fasta, (-1, 0, 1), **options, **pooling)
    last = multi.attrs["provenance"]["n_layers"]
    assert multi.layers == [0, 1, last]  # resolved and ascending, whatever order they were asked in
    assert multi.attrs["provenance"]["layers"] == [0, 1, last] and "layer" not in multi.attrs["provenance"]
    for layer in multi.layers:
        single = _build(tmp_path, name, model, fasta, (layer,), **options, **pooling)
        assert single.layers == [layer] and single.attrs["provenance"]["layer"] == layer
        selected = open_store(multi.path, layer=layer)
        for rid in single.ids:
            np.testing.assert_array_equal(multi.tokens(rid, layer=layer), single.tokens(rid), err_msg=f"{rid} layer {layer}")
            np.testing.assert_array_equal(selected.tokens(rid), single.tokens(rid))
        # float32 means over a strided (n, k, d) view may differ from the contiguous (n, d) one in the last bit
        np.testing.assert_allclose(multi.pooled(layer=layer), single.pooled(), rtol=1e-6, atol=1e-8)
    assert multi.fingerprint not in {_build(tmp_path, name, model, fasta, (-1,), **options, **pooling).fingerprint}
    assert multi.verify() == []


def test_layers_are_selected_by_name_in_xarray_and_open_store(tmp_path, models):
    fasta = write_fasta(tmp_path / "in.fa", random_seqs(AA, [10, 40], seed=3))
    store = _build(tmp_path, "esm2", models["esm2"], fasta, (0, -1))
    ds = xr.open_zarr(store.path, consolidated=False)
    assert ds.layer.values.tolist() == [0, 2] and ds.tokens.dims == ("token", "layer", "feature")
    by_record = ds.pooled.isel(content=ds.content_index)  # (sequence, layer, feature)
    np.testing.assert_array_equal(by_record.sel(sequence="s1_40", layer=2).values, store.pooled(["s1_40"], layer=2)[0])
    np.testing.assert_array_equal(open_store(store.path, layer=-1).tokens("s1_40"), store.tokens("s1_40", layer=2))
    with pytest.raises(StoreError, match=r"holds layers \[0, 2\]; choose one"):
        store.tokens("s1_40")
    with pytest.raises(StoreError, match=r"holds layers \[0, 2\], not layer 1"):
        open_store(store.path, layer=1)
    info = store.info()
    assert info["layers"] == [0, 2] and info["per_token"] == "(50, 2, 32) float16"


def test_shards_and_the_plan_count_every_layer(tmp_path, models):
    fasta = write_fasta(tmp_path / "in.fa", random_seqs(AA, [300] * 8, seed=4))
    one = _build(tmp_path, "esm2", models["esm2"], fasta, (-1,), shard_mb=0.05)
    three = _build(tmp_path, "esm2", models["esm2"], fasta, (0, 1, 2), shard_mb=0.05)
    # A chunk is one layer of many tokens; a shard holds every layer, and stays near --shard-mb.
    row = 32 * 2  # one fp16 row of one layer of the 32-wide model
    for store, k in ((one, 1), (three, 3)):
        shard_bytes = store.attrs["layout"]["token_shard"] * k * row
        assert 0.5 < shard_bytes / (0.05 * 2**20) < 1.5, (k, store.attrs["layout"])
    assert three.attrs["layout"]["token_shard"] < one.attrs["layout"]["token_shard"]
    report = build(BuildConfig.create("esm2", str(models["esm2"]), layers=(0, 1, 2)), [fasta], tmp_path / "dry.zarr", dry_run=True, **QUIET)
    single = build(BuildConfig.create("esm2", str(models["esm2"])), [fasta], tmp_path / "dry.zarr", dry_run=True, **QUIET)
    per_token = single.plan.n_rows * 32 * 2  # fp16 rows of a 32-wide model
    assert report.plan.estimated_bytes - single.plan.estimated_bytes == 2 * per_token + 2 * 8 * 32 * 4  # + 2 pooled layers
    assert "x 3 layers [0, 1, 2]" in report.plan.describe()


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ((-1, 2), r"--layer 2 and -1 are the same hidden state \(2 of 0\.\.2\)|--layer -1 and 2 are the same hidden state"),
        ((0, 3), r"--layer 3 is out of range for .*, which has 2 layers: use 0\.\.2"),
    ],
)
def test_bad_layer_lists_are_named(models, layers, message):
    config = BuildConfig.create("esm2", str(models["esm2"]), layers=layers)
    with pytest.raises(EncoderError, match=message):
        load_encoder("esm2", config.encoder_settings(), weights=False)


def test_fine_tuning_capabilities_need_one_layer(models):
    encoder = load_encoder("esm2", BuildConfig.create("esm2", str(models["esm2"]), layers=(1, 2)).encoder_settings())
    with pytest.raises(EncoderError, match=r"outputs layers \[1, 2\]; fine-tuning needs exactly one"):
        encoder.blocks_feeding_output()


def test_old_configs_with_one_layer_still_load():
    config = BuildConfig.from_dict({"encoder": "esm2", "model": "m", "layer": 3})
    assert config.layers == (3,) and config.to_dict()["layers"] == [3]
    with pytest.raises(EncoderError, match="integer hidden-state indices"):
        BuildConfig.create("esm2", "m", layers=("x",))


def test_cli_takes_several_layers(tmp_path, models, capsys):
    fasta = write_fasta(tmp_path / "in.fa", random_seqs(AA, [10, 40], seed=5))
    out = tmp_path / "cli.zarr"
    assert embedcache_main(["build", str(fasta), "--encoder", "esm2", "--model", str(models["esm2"]), "-o", str(out),
                            "--no-progress", "--layer", "0", "-1"]) == 0  # fmt: skip
    assert open_store(out).layers == [0, 2]
    capsys.readouterr()
    assert embedcache_main(["info", str(out)]) == 0
    assert "layers: [0, 2]" in capsys.readouterr().out
