"""The fusion stage's shared fixture: synthetic IsoFormer data, prepared, and one real store per modality."""

from __future__ import annotations

import pytest

from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.encoders.enformer import enformer_available
from embedcache.tiny_models import make_tiny_enformer, make_tiny_esm2, make_tiny_nucleotide_transformer
from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fusion")
    info = generate_synthetic(root / "syn", SyntheticConfig(n_genes=24, seed=3))
    prepared = prepare_isoformer(info.csv_path, info.genome_path, root / "prep", IsoformerPrepareConfig(dna_window=info.dna_window))
    nt = make_tiny_nucleotide_transformer(root / "m" / "nt", hidden=16)
    models = {
        "protein": ("esm2", make_tiny_esm2(root / "m" / "esm", hidden=16), {}),
        "rna": ("nucleotide-transformer", nt, {}),
        # IsoFormer's DNA encoder is Enformer or the Nucleotide Transformer (its paper reports both): without the
        # enformer extra (the transformers 5 environment) the DNA store is built with NT, so these tests still run.
        "dna": ("enformer", make_tiny_enformer(root / "m" / "enf", dim=24, target_length=info.dna_window // 128), {"window": info.dna_window})
        if enformer_available() else ("nucleotide-transformer", nt, {}),
    }
    stores = {}
    for modality, (encoder, model_dir, extra) in models.items():
        stores[modality] = str(root / f"{modality}.zarr")
        build(BuildConfig.create(encoder, str(model_dir), **extra), [prepared.out_dir / f"{modality}.fa"], stores[modality], progress=False, log=lambda s: None)
    return {"root": root, "prep": str(prepared.out_dir), "stores": stores, "models": models}
