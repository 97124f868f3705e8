"""Fusion on stores built with several layers: one layer per modality, chosen with --layer MODALITY=I."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli.fusion_cli import main as fusion_main
from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from fusion.data import DataConfig, DataError, open_batches
from fusion.experiment import read_manifest
from fusion.finetune import load_store_encoder

QUIET = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def protein_layers(demo_data, tmp_path_factory) -> dict[str, str]:
    """The demo's protein records as a store of layers 1 and 2 (one pass) and as a store of layer 1 alone."""
    root = tmp_path_factory.mktemp("layers")
    encoder, model_dir, _ = demo_data["models"]["protein"]
    fasta = [Path(demo_data["prep"]) / "protein.fa"]
    stores = {"multi": str(root / "multi.zarr"), "layer1": str(root / "layer1.zarr")}
    build(BuildConfig.create(encoder, str(model_dir), layers=(1, -1)), fasta, stores["multi"], progress=False, log=QUIET)
    build(BuildConfig.create(encoder, str(model_dir), layers=(1,)), fasta, stores["layer1"], progress=False, log=QUIET)
    return stores


def _config(demo_data, protein: str, **kwargs) -> DataConfig:
    return DataConfig(manifest=demo_data["prep"], stores={"protein": protein}, batch_size=8, **kwargs)


def test_a_chosen_layer_feeds_what_a_single_layer_store_feeds(demo_data, protein_layers):
    manifest = read_manifest(demo_data["prep"])
    for features, loading in (("pooled", "auto"), ("tokens", "memory"), ("tokens", "stream")):
        options = dict(features=features, loading=loading)
        chosen = open_batches(_config(demo_data, protein_layers["multi"], layers={"protein": 1}, **options), manifest, log=QUIET)
        alone = open_batches(_config(demo_data, protein_layers["layer1"], **options), manifest, log=QUIET)
        for a, b in zip(chosen("train"), alone("train")):
            # per-token rows are bit-equal; float32 pooled means may differ in the last bit (a strided reduction)
            np.testing.assert_allclose(a.features["protein"].x.numpy(), b.features["protein"].x.numpy(), rtol=1e-6, atol=1e-8)
            np.testing.assert_array_equal(a.features["protein"].mask.numpy(), b.features["protein"].mask.numpy())


def test_a_multi_layer_store_needs_a_choice(demo_data, protein_layers):
    manifest = read_manifest(demo_data["prep"])
    with pytest.raises(DataError, match=r"holds layers \[1, 2\]; choose one with --layer protein=I"):
        open_batches(_config(demo_data, protein_layers["multi"]), manifest, log=QUIET)
    with pytest.raises(DataError, match=r"--layer protein=0: .*holds layers \[1, 2\], not layer 0"):
        open_batches(_config(demo_data, protein_layers["multi"], layers={"protein": 0}), manifest, log=QUIET)
    with pytest.raises(DataError, match=r"--layer rna=1: no store was given for 'rna'"):
        _config(demo_data, protein_layers["multi"], layers={"rna": 1})


def test_cli_trains_on_the_chosen_layer_and_records_it(demo_data, protein_layers, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--manifest", demo_data["prep"], "--store", f"protein={protein_layers['multi']}", "--features", "pooled",
            "--epochs", "1", "--d-model", "16", "--head-hidden", "16", "--no-progress", "--out", str(run)]  # fmt: skip
    assert fusion_main([*args, "--layer", "protein=-1", "--workers", "2"]) == 0  # batches from 2 DataLoader processes
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["layers"] == {"protein": -1} and data["workers"] == 2
    capsys.readouterr()
    assert fusion_main([*args[:-1], str(tmp_path / "bad"), "--layer", "protein=top"]) == 2
    assert "--layer 'protein=top': a layer is an integer" in capsys.readouterr().err


def test_finetune_runs_the_encoder_at_the_chosen_layer(protein_layers):
    live = load_store_encoder(open_store(protein_layers["multi"], layer=1), "protein", device="cpu", precision="fp32", log=QUIET)
    assert live.encoder.layer_indices == (1,) and live.build.layers == (1,)
    assert live.encoder.blocks_feeding_output() == ["encoder.layer.0"]
