"""The synthetic IsoFormer data: real schema, determinism, the stated ceiling, the modality ordering, and the opt-in token term."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.prepare.fasta import read_fasta
from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
from fusion.prepare.manifest import PrepareError, load_prepared
from fusion.prepare.synthetic import (
    CSV_COLUMNS,
    GTEX_TISSUES,
    MODALITIES,
    TRACT_MIN,
    TOKEN_MARKERS,
    TOKEN_RUN,
    SyntheticConfig,
    composition_baseline,
    embedding_baseline,
    generate_synthetic,
    kmer_frequencies,
    mean_r2,
    ridge_fit_predict,
    rna_features,
    token_features,
    true_signal,
)

SMALL = SyntheticConfig(n_genes=40, n_chromosomes=2, dna_window=1024, missing_target_fraction=0.02, seed=7)


def generate_and_prepare(tmp_path: Path, config: SyntheticConfig) -> tuple[dict, Path]:
    info = generate_synthetic(tmp_path / "raw", config)
    out = tmp_path / "prepared"
    prepare_isoformer(info.csv_path, info.genome_path, out, IsoformerPrepareConfig(dna_window=info.dna_window))
    return json.loads(info.json_path.read_text()), out


def test_schema_is_the_real_one_and_the_adapter_reads_it(tmp_path):
    meta, out = generate_and_prepare(tmp_path, SMALL)
    csv = pd.read_csv(tmp_path / "raw" / "GTEx_final.csv")
    assert list(csv.columns) == [*CSV_COLUMNS, *GTEX_TISSUES]
    assert set(csv["split"]) == {"train", "valid", "test"}
    assert (csv.groupby("gene_id_gtex")["split"].nunique() == 1).all()  # split by gene
    assert csv["Protein"].isna().equals(csv["CDS"].isna())
    assert 0.1 < csv["Protein"].isna().mean() < 0.45
    assert (csv[list(GTEX_TISSUES)].min() >= 0).all()  # TPM

    prepared = json.loads((out / "prepare.json").read_text())
    counts = prepared["counts"]
    assert counts["genes"] == 40 and counts["transcripts"] == meta["counts"]["transcripts"] == len(csv)
    assert counts["missing_target_values"] == meta["counts"]["missing_target_values"] > 0
    assert counts["dna_windows_padded"] == 4  # first and last gene of each chromosome run off its ends
    assert counts["genes_in_several_splits"] == 0
    dna = read_fasta(out / "dna.fa")
    assert len(dna) == 40 and {len(s) for s in dna.values()} == {1024}
    for seq in read_fasta(out / "protein.fa").values():
        assert seq.startswith("M") and "*" not in seq


def test_deterministic_for_a_seed(tmp_path):
    a = generate_synthetic(tmp_path / "a", SMALL)
    b = generate_synthetic(tmp_path / "b", SMALL)
    for name in ("GTEx_final.csv", "genome.fa", "synthetic.json"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes(), name
    c = generate_synthetic(tmp_path / "c", replace(SMALL, seed=8))
    assert (c.out_dir / "GTEx_final.csv").read_bytes() != (a.out_dir / "GTEx_final.csv").read_bytes()


def planted_terms(meta: dict, out, frame) -> dict:
    """The generator's per-modality signal terms, recomputed from the prepared FASTAs and manifest."""
    fastas = [read_fasta(out / f"{m}.fa") for m in ("dna", "rna", "protein")]
    return true_signal(meta, *fastas, frame["gene_id"].tolist(), frame["sample_id"].tolist())


def test_ceiling_matches_the_planted_signal_recomputed_from_prepared_files(tmp_path):
    config = SyntheticConfig(n_genes=150, n_chromosomes=3, seed=1)
    meta, out = generate_and_prepare(tmp_path, config)
    m = load_prepared(out)
    f = m.frame
    terms = planted_terms(meta, out, f)
    signal = sum(terms[mod] for mod in MODALITIES)
    y = m.targets().astype(np.float64)  # log1p(TPM), the adapter's default transform
    residual = y - np.array(meta["offset"]) - signal
    # What is left after the planted signal is the noise, of the stated std: the features the
    # adapter's outputs yield are exactly the generator's.
    assert abs(np.nanstd(residual) - meta["noise_std"]) < 0.02 * meta["noise_std"]
    assert abs(np.nanmean(residual)) < 0.02
    oracle = np.array(meta["offset"]) + signal
    empirical = mean_r2(y, oracle)
    assert empirical == pytest.approx(meta["empirical_r2_of_true_signal"], abs=1e-6)
    test = (f["split"] == "test").to_numpy()
    assert mean_r2(y[test], oracle[test]) == pytest.approx(
        meta["empirical_r2_of_true_signal_by_split"]["test"], abs=1e-6
    )
    assert empirical == pytest.approx(meta["ceiling_r2"], abs=0.03)
    assert meta["ceiling_r2"] == pytest.approx(1 - config.share_noise, abs=0.02)
    for mod, share in zip(MODALITIES, (config.share_dna, config.share_rna, config.share_protein)):
        assert meta["realised_variance_share"][mod] == pytest.approx(share, abs=0.02)
    subsets = meta["subset_ceiling_r2"]
    assert subsets["dna+rna+protein"] == pytest.approx(meta["ceiling_r2"], abs=1e-9)
    assert meta["target_space"] == "log1p" and meta["prepare_with"]["target_transform"] == "log1p"


def test_config_is_checked():
    with pytest.raises(PrepareError, match=r"variance shares .* must be >= 0 and sum to 1"):
        SyntheticConfig(share_dna=0.5)
    with pytest.raises(PrepareError, match=r"dna_window 300 is too short"):
        SyntheticConfig(dna_window=300)
    with pytest.raises(PrepareError, match=r"tract_length \(8, 20\) must satisfy 12 \(TRACT_MIN\)"):
        SyntheticConfig(tract_length=(8, 20))
    with pytest.raises(PrepareError, match=r"tract_share_max 0.6 must be > 0 and < 1/2"):
        SyntheticConfig(tract_share_max=0.6)


def test_rna_features_are_the_shares_of_poly_u_and_poly_c_tracts():
    rna = "A" * 10 + "T" * 12 + "G" * 8 + "C" * 11 + "T" * 5 + "C" * 14  # 60 nt; the 11-C and 5-T runs are too short
    assert rna_features(rna) == pytest.approx([12 / 60, 14 / 60])
    assert rna_features("ACGT" * 10).tolist() == [0.0, 0.0]
    assert rna_features("").tolist() == [0.0, 0.0]


def test_tracts_sit_in_the_3utr_and_hold_a_whole_token_in_every_6mer_frame(tmp_path):
    generate_synthetic(tmp_path, SMALL)
    csv = pd.read_csv(tmp_path / "GTEx_final.csv")
    coding = csv[csv["CDS"].notna()]
    noncoding = csv[csv["CDS"].isna()]
    # Coding isoforms: no tract in 5'UTR + CDS (the protein term stays out of the RNA term), only in the 3'UTR.
    assert all(rna_features(u5 + cds).sum() == 0 for u5, cds in zip(coding["5UTR"], coding["CDS"]))
    shares = np.stack([rna_features(r) for r in csv["RNA"]])  # (n, 2)
    assert shares.max() < SMALL.tract_share_max + 0.05 and shares.std(axis=0).min() > 0.04
    assert (np.stack([rna_features(r) for r in noncoding["RNA"]]).sum(axis=1) > 0).mean() > 0.8
    # A run of >= TRACT_MIN letters contains a whole homopolymer 6-mer token whatever the token frame.
    for frame in range(6):
        seq = "A" * frame + "T" * TRACT_MIN + "A" * 6
        assert "TTTTTT" in [seq[i : i + 6] for i in range(0, len(seq) - 5, 6)], frame


def test_composition_ridge_orders_modality_subsets(tmp_path):
    """With the default config, ridge on k-mer composition ranks: all three > every pair > each of its singles.

    ~5 s (1,200 transcripts), so not marked slow: it guards the property the demo relies on.

    Also checks the protein contrasts do not leak into RNA mono/dinucleotide composition.
    """
    meta, out = generate_and_prepare(tmp_path, SyntheticConfig())
    r2 = composition_baseline(out)
    margin = 0.03
    pairs = ["dna+rna", "dna+protein", "rna+protein"]
    for pair in pairs:
        assert r2["dna+rna+protein"] > r2[pair] + margin, (pair, r2)
        for single in pair.split("+"):
            assert r2[pair] > r2[single] + margin, (pair, single, r2)
    for single in MODALITIES:
        assert r2[single] > 0.05, r2
    assert r2["dna+rna+protein"] < meta["ceiling_r2"] + 0.03

    # Protein term vs the RNA's 1-2-mer composition: nothing to read (only in-frame 3-mers carry it).
    m = load_prepared(out)
    f = m.frame
    rna = read_fasta(out / "rna.fa")
    terms = true_signal(
        meta,
        read_fasta(out / "dna.fa"),
        rna,
        read_fasta(out / "protein.fa"),
        f["gene_id"].tolist(),
        f["sample_id"].tolist(),
    )
    coding = f["protein_id"].notna().to_numpy()
    x = kmer_frequencies([rna[k] for k in f["rna_id"]], (1, 2))[coding]
    y = terms["protein"][coding]
    train = (f["split"] == "train").to_numpy()[coding]
    genes = f["gene_id"].astype(str).to_numpy()[coding]
    pred = ridge_fit_predict(x[train], y[train], genes[train], x[~train], alphas=[1.0, 10.0, 100.0])
    assert mean_r2(y[~train], pred) < 0.05


@pytest.mark.slow
def test_demo_encoders_see_every_modality_and_order_the_subsets(tmp_path):
    """The demo's acceptance property on the demo's own tiny random encoders, through the real build.

    Ridge on standardised pooled embeddings (~1 min on 2 CPU cores): all three > every pair > each
    of its singles, every single well above zero (RNA at least half its ceiling: its tract shares are
    single-token frequencies the 6-mer encoder keeps), and the protein term not readable from RNA.
    """
    pytest.importorskip("enformer_pytorch")
    from embedcache import open_store
    from embedcache.build import build
    from embedcache.config import BuildConfig
    from embedcache.tiny_models import make_tiny_enformer, make_tiny_esm2, make_tiny_nucleotide_transformer

    meta, out = generate_and_prepare(tmp_path, SyntheticConfig())
    models = tmp_path / "models"
    configs = {
        "protein": BuildConfig.create("esm2", str(make_tiny_esm2(models / "esm", hidden=64, layers=2))),
        "rna": BuildConfig.create(
            "nucleotide-transformer", str(make_tiny_nucleotide_transformer(models / "nt", hidden=64, layers=2))
        ),
        "dna": BuildConfig.create(
            "enformer", str(make_tiny_enformer(models / "enf", dim=48, target_length=16)), window=2048
        ),
    }
    stores = {mod: tmp_path / f"{mod}.zarr" for mod in MODALITIES}
    for mod, config in configs.items():
        build(config, [out / f"{mod}.fa"], stores[mod], progress=False)
    r2 = embedding_baseline(out, stores)
    ceiling = meta["subset_ceiling_r2"]
    margin = 0.03
    for pair in ["dna+rna", "dna+protein", "rna+protein"]:
        assert r2["dna+rna+protein"] > r2[pair] + margin, (pair, r2)
        for single in pair.split("+"):
            assert r2[pair] > r2[single] + margin, (pair, single, r2)
    for single in MODALITIES:
        assert r2[single] > 0.4 * ceiling[single], (single, r2, ceiling)
    assert r2["rna"] > 0.5 * ceiling["rna"], (r2, ceiling)
    assert r2["dna+rna+protein"] < meta["ceiling_r2"] + 0.03

    # The protein term from the RNA's pooled NT embedding (coding isoforms): nothing to read.
    m = load_prepared(out)
    f = m.frame
    terms = planted_terms(meta, out, f)
    coding = m.present("protein")
    x = open_store(stores["rna"]).pooled(f["rna_id"][coding].tolist()).astype(np.float64)
    y = terms["protein"][coding]
    train = (f["split"] == "train").to_numpy()[coding]
    genes = f["gene_id"].astype(str).to_numpy()[coding]
    pred = ridge_fit_predict(x[train], y[train], genes[train], x[~train], alphas=[1.0, 10.0, 100.0, 1000.0])
    assert mean_r2(y[~train], pred) < 0.05


# -- the opt-in token term (share_token): a signal in the residues' order only ------------------------------

TOKEN_SMALL = replace(SMALL, share_dna=0.2, share_rna=0.2, share_protein=0.15, share_token=0.2)


def clustered_serine_share(protein: str) -> float:
    """The token feature from its definition, written out: serines with a serine neighbour / all serines."""
    ser = [i for i, a in enumerate(protein) if a == "S"]
    touching = [i for i in ser if (i > 0 and protein[i - 1] == "S") or (i + 1 < len(protein) and protein[i + 1] == "S")]
    return len(touching) / max(len(ser), 1)


def test_token_ceiling_is_what_its_definition_gives(tmp_path):
    """Recompute the token feature from the prepared proteins, the term from the stated weights, and the
    ceilings from the terms: synthetic.json's token_ceiling_r2 and both subset ceiling sets follow."""
    meta, out = generate_and_prepare(tmp_path, TOKEN_SMALL)
    m = load_prepared(out)
    f = m.frame
    proteins = read_fasta(out / "protein.fa")
    coding = f["protein_id"].notna().to_numpy()
    feature = np.array([clustered_serine_share(proteins[k]) if ok else 0.0 for k, ok in zip(f["protein_id"], coding)])
    assert {p.count("S") for p in proteins.values()} == {TOKEN_MARKERS}  # the count carries nothing
    assert set(np.round(feature[coding] * TOKEN_MARKERS / TOKEN_RUN, 9)) <= {0.0, 1.0, 2.0, 3.0}  # k runs of TOKEN_RUN
    planted = meta["planted"]["token"]
    assert planted["features"] == ["clustered_ser"] and planted["modality"] == "protein"
    assert planted["feature_mean"] == pytest.approx([feature[coding].mean()])
    assert planted["feature_std"] == pytest.approx([feature[coding].std()])
    z = np.where(coding, (feature - feature[coding].mean()) / feature[coding].std(), 0.0)
    token = z[:, None] @ np.array(planted["weights"])  # (n, 1) @ (1, 30)

    terms = planted_terms(meta, out, f)
    assert terms["token"] == pytest.approx(token, abs=1e-9)
    y = m.targets().astype(np.float64)
    residual = y - np.array(meta["offset"]) - sum(terms.values())
    assert abs(np.nanstd(residual) - meta["noise_std"]) < 0.05 * meta["noise_std"]  # nothing else is planted

    var_y = sum(terms.values()).var(axis=0) + meta["noise_std"] ** 2
    assert meta["token_ceiling_r2"] == pytest.approx(np.mean(token.var(axis=0) / var_y), abs=1e-9)
    assert meta["token_ceiling_r2"] == pytest.approx(TOKEN_SMALL.share_token, abs=0.03)
    assert meta["realised_variance_share"]["token"] == pytest.approx(meta["token_ceiling_r2"], abs=1e-12)
    with_token, without = meta["subset_ceiling_r2"], meta["subset_ceiling_r2_without_token"]
    assert with_token["protein"] == pytest.approx(np.mean((terms["protein"] + token).var(axis=0) / var_y), abs=1e-9)
    assert without["protein"] == pytest.approx(np.mean(terms["protein"].var(axis=0) / var_y), abs=1e-9)
    assert with_token["dna+rna"] == without["dna+rna"]  # the token term is protein's
    assert with_token["dna+rna+protein"] == pytest.approx(meta["ceiling_r2"], abs=1e-12)
    info = generate_synthetic(tmp_path / "again", TOKEN_SMALL)
    assert info.token_ceiling_r2 == meta["token_ceiling_r2"]
    assert info.subset_ceiling_r2_without_token == without


def test_token_term_is_invisible_to_composition(tmp_path):
    """What any mean over tokens could use, the protein's residue composition and length and the RNA's 1-2-mer
    composition (where the serine codons sit), predicts none of the token term; reordering the residues does.

    Not checked: RNA 3-mers. A run's codon junctions shift a few out-of-frame 3-mers, and ridge on 1-3-mer
    frequencies reads ~0.08 of the term's variance (1,500 genes); see the module docstring."""
    config = replace(TOKEN_SMALL, n_genes=300, n_chromosomes=3)
    meta, out = generate_and_prepare(tmp_path, config)
    f = load_prepared(out).frame
    coding = f["protein_id"].notna().to_numpy()
    proteins = read_fasta(out / "protein.fa")
    rna = read_fasta(out / "rna.fa")
    protein = [proteins[k] for k in f["protein_id"][coding]]
    y = planted_terms(meta, out, f)["token"][coding]
    train = (f["split"] == "train").to_numpy()[coding]
    genes = f["gene_id"].astype(str).to_numpy()[coding]
    lengths = np.array([[len(p)] for p in protein], dtype=float)
    for x in (
        np.hstack([kmer_frequencies(protein, (1,), "ACDEFGHIKLMNPQRSTVWY"), lengths]),
        kmer_frequencies([rna[k] for k in f["rna_id"][coding]], (1, 2)),
    ):
        pred = ridge_fit_predict(x[train], y[train], genes[train], x[~train], alphas=[1.0, 10.0, 100.0, 1000.0])
        assert mean_r2(y[~train], pred) < 0.05
    # The same residues in another order: the feature moves, every count stays.
    rng = np.random.default_rng(0)
    shuffled = ["".join(rng.permutation(list(p))) for p in protein]
    assert all(sorted(a) == sorted(b) for a, b in zip(protein, shuffled))
    before = np.array([token_features(p)[0] for p in protein])
    after = np.array([token_features(p)[0] for p in shuffled])
    assert before.std() > 0.3 and abs(np.corrcoef(before, after)[0, 1]) < 0.2


def test_token_term_off_by_default_leaves_the_data_as_they_were(tmp_path):
    """share_token = 0 (the default) adds no random draw: sequences, genome and targets are those the
    generator wrote before the token term existed (fingerprints recorded then), and synthetic.json gains
    only the config field."""
    import hashlib

    assert SyntheticConfig().share_token == 0.0
    info = generate_synthetic(tmp_path, SMALL)
    genome = hashlib.sha256((tmp_path / "genome.fa").read_bytes()).hexdigest()
    assert genome == "25ff76cd704fafd2fe336b7e1c44f897762db76098142a6e978e5beded523b0e"
    csv = pd.read_csv(info.csv_path)
    sequences = hashlib.sha256(csv[list(CSV_COLUMNS)].to_csv(index=False).encode()).hexdigest()
    assert sequences == "3992d2c14177d44509e4ceedd9071d06ed33ab6c31a1e7642f8cf0a14ffd1977"
    y = np.log1p(csv[list(GTEX_TISSUES)].to_numpy())
    assert int(np.isnan(y).sum()) == 79 and float(np.nansum(y)) == pytest.approx(11284.664509087721, abs=1e-6)
    meta = json.loads(info.json_path.read_text())
    assert sorted(meta["planted"]) == sorted(MODALITIES) and "token_ceiling_r2" not in meta
    assert info.token_ceiling_r2 is None and info.subset_ceiling_r2_without_token is None
    assert meta["config"]["share_token"] == 0.0


def test_token_config_is_checked():
    with pytest.raises(PrepareError, match=r"token=0.2, noise=0.25 must be >= 0 and sum to 1"):
        SyntheticConfig(share_token=0.2)
    with pytest.raises(PrepareError, match=r"protein_length \(40, 300\) is too short for the token term"):
        replace(TOKEN_SMALL, protein_length=(40, 300))
