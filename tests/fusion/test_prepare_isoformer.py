"""The IsoFormer adapter on a hand-made GTEx_final.csv and a 2-chromosome genome, with exact expected windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.prepare.fasta import read_fasta
from fusion.prepare.isoformer import (
    FIXED_COLUMNS,
    IsoformerPrepareConfig,
    apply_transform,
    invert_transform,
    prepare_isoformer,
)
from fusion.prepare.manifest import PrepareError, load_prepared
from fusion.prepare.synthetic import GTEX_TISSUES

# 0-based:    0         1         2         3
#             0123456789012345678901234567890123456789
CHR1 = "ACGTTGCAAGGCTTAACCGGATCGATCGTTAGCCATGGCA"
CHR2 = "ttgacCATGCAGTCAAGTCGGATCCTAGGA"  # lower case = soft-masked; windows come out upper-case
WINDOW = 10  # TSS at index 5 of every window

# (transcript, gene, split, chr, strand, start, end, RNA, Protein). Coordinates are 1-based inclusive.
ROWS = [
    ("T1a", "G1", "train", "chr1", "+", 15, 30, "acgtacgt", "MKV*"),  # gene G1: TSS = min(start) = 13
    ("T1b", "G1", "train", "chr1", "+", 13, 25, "GGGCCC", "MKW"),
    ("T2a", "G2", "valid", "chr1", "-", 5, 20, "ATATAT", None),  # gene G2 on '-': TSS = max(end) = 22
    ("T2b", "G2", "valid", "chr1", "-", 8, 22, "CCCC", ""),
    ("T3", "G3", "Train", "chr1", "+", 3, 9, "TTTT", "MA"),  # window runs off the start of chr1
    ("T4", "G4", "test", "chr2", "-", 20, 28, "GATTACA", "MW*"),  # '-' window runs off the end of chr2
    ("T5", "G5", "test", "chr2", "-", 1, 3, "ACGN", None),  # '-' window runs off the start of chr2
    ("T6", "G6", "val", "chr1", "+", 38, 40, "AAAAA", "MC"),  # '+' window runs off the end of chr1
]
EXPECTED_WINDOWS = {
    "G1": "AAGGCTTAAC",  # chr1[7:17]
    "G2": "GATCGATCCG",  # reverse complement of chr1[17:27]
    "G3": "NNNACGTTGC",  # 3 N + chr1[0:7]
    "G4": "NNNTCCTAGG",  # reverse complement of CHR2[23:30] + 3 N
    "G5": "ATGGTCAANN",  # reverse complement of 2 N + CHR2[0:8]
    "G6": "CCATGGCANN",  # chr1[32:40] + 2 N
}


def tpm_values(n_rows: int) -> np.ndarray:
    """Distinct non-negative TPM per (row, tissue); one missing value at (row 2, tissue 0)."""
    values = np.arange(n_rows * len(GTEX_TISSUES), dtype=float).reshape(n_rows, -1) * 0.5
    values[2, 0] = np.nan
    return values


def gtex_frame(rows=ROWS, values: np.ndarray | None = None) -> pd.DataFrame:
    """A table in exactly the GTEx_final.csv schema: the 12 fixed columns, then the 30 tissues."""
    values = tpm_values(len(rows)) if values is None else values
    df = pd.DataFrame(
        {
            "transcript_id_gtex": [r[0] for r in rows],
            "gene_id_gtex": [r[1] for r in rows],
            "split": [r[2] for r in rows],
            "chr": [r[3] for r in rows],
            "strand": [r[4] for r in rows],
            "start": [r[5] for r in rows],
            "end": [r[6] for r in rows],
            "RNA": [r[7] for r in rows],
            "5UTR": ["A" for _ in rows],
            "CDS": ["ATG" for _ in rows],
            "3UTR": ["T" for _ in rows],
            "Protein": [r[8] for r in rows],
        }
    )
    return pd.concat([df, pd.DataFrame(values, columns=list(GTEX_TISSUES))], axis=1)


@pytest.fixture
def genome(tmp_path: Path) -> Path:
    path = tmp_path / "genome.fa"
    path.write_text(f">chr1 test chromosome\n{CHR1[:25]}\n{CHR1[25:]}\n>chr2\n{CHR2}\n")
    return path


def write_csv(tmp_path: Path, df: pd.DataFrame, name: str = "GTEx_final.csv") -> Path:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def prepare(tmp_path: Path, genome: Path, df: pd.DataFrame | None = None, **config) -> Path:
    csv = write_csv(tmp_path, gtex_frame() if df is None else df)
    out = tmp_path / "out"
    prepare_isoformer(csv, genome, out, IsoformerPrepareConfig(dna_window=config.pop("dna_window", WINDOW), **config))
    return out


def test_windows_are_strand_aware_centred_and_n_padded(tmp_path, genome):
    out = prepare(tmp_path, genome)
    dna = read_fasta(out / "dna.fa")
    assert dna == EXPECTED_WINDOWS  # one record per gene, in first-appearance order, exact strings
    assert list(dna) == ["G1", "G2", "G3", "G4", "G5", "G6"]
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["counts"]["dna_windows_padded"] == 4


def test_odd_window_keeps_tss_at_half(tmp_path, genome):
    out = prepare(tmp_path, genome, dna_window=7)
    dna = read_fasta(out / "dna.fa")
    # '+' G1: TSS 0-based 12 at index 3 -> chr1[9:16]; '-' G2: TSS 21 at index 3 -> revcomp(chr1[18:25])
    assert dna["G1"] == CHR1[9:16] and dna["G1"][3] == CHR1[12]
    assert (
        dna["G2"] == "TCGATCC" and dna["G2"][3] == "A"
    )  # reverse complement of chr1[18:25] = GGATCGA; A pairs with T at 21
    assert all(len(s) == 7 for s in dna.values())


def test_rna_protein_and_manifest(tmp_path, genome):
    out = prepare(tmp_path, genome)
    rna = read_fasta(out / "rna.fa")
    assert list(rna) == [r[0] for r in ROWS]
    assert rna["T1a"] == "ACGTACGT"  # upper-cased
    protein = read_fasta(out / "protein.fa")
    assert protein == {
        "T1a": "MKV",
        "T1b": "MKW",
        "T3": "MA",
        "T4": "MW",
        "T6": "MC",
    }  # '*' stripped, non-coding absent

    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == ["sample_id", "gene_id", "split", "dna_id", "rna_id", "protein_id", *GTEX_TISSUES]
    assert manifest["split"].tolist() == [
        "train",
        "train",
        "validation",
        "validation",
        "train",
        "test",
        "test",
        "validation",
    ]
    assert manifest["dna_id"].tolist() == ["G1", "G1", "G2", "G2", "G3", "G4", "G5", "G6"]
    assert manifest["protein_id"].tolist() == ["T1a", "T1b", "", "", "T3", "T4", "", "T6"]
    assert manifest.loc[2, GTEX_TISSUES[0]] == ""  # missing target stays missing

    m = load_prepared(out)
    assert m.keys("dna") == manifest["dna_id"].tolist()
    assert m.keys("protein") == ["T1a", "T1b", "T3", "T4", "T6"]
    assert m.present("protein").tolist() == [True, True, False, False, True, True, False, True]
    y = m.targets()
    assert y.dtype == np.float32 and y.shape == (len(ROWS), 30)
    assert np.isnan(y[2, 0]) and np.isnan(y).sum() == 1
    np.testing.assert_allclose(y, np.log1p(tpm_values(len(ROWS))), rtol=1e-6)
    assert m.sequence_files["dna"] == out / "dna.fa"


def test_prepare_json_describes_the_directory(tmp_path, genome):
    out = prepare(tmp_path, genome)
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["kind"] == "isoformer"
    assert meta["config"] == {
        "dna_window": WINDOW,
        "target_transform": "log1p",
        "protein_coding_only": False,
        "fasta_line_width": 80,
    }
    assert meta["targets"] == list(GTEX_TISSUES)
    assert meta["modalities"] == {"dna": "dna.fa", "rna": "rna.fa", "protein": "protein.fa"}
    assert meta["key_columns"] == {"dna": "dna_id", "rna": "rna_id", "protein": "protein_id"}
    assert meta["split_column"] == "split"
    assert meta["transform"]["name"] == "log1p" and meta["transform"]["log1p"] and not meta["transform"]["standardize"]
    c = meta["counts"]
    assert (c["transcripts"], c["genes"], c["coding_transcripts"], c["noncoding_transcripts"]) == (8, 6, 5, 3)
    assert c["by_split"] == {
        "train": {"transcripts": 3, "genes": 2},
        "validation": {"transcripts": 3, "genes": 2},
        "test": {"transcripts": 2, "genes": 2},
    }
    assert c["missing_target_values"] == 1
    assert meta["source"]["csv"].endswith("GTEx_final.csv") and meta["source"]["genome"].endswith("genome.fa")


def test_tissue_columns_detected_in_any_position(tmp_path, genome):
    """Tissues are every non-fixed column, in file order, wherever the fixed columns sit."""
    df = gtex_frame()
    reordered = ["transcript_id_gtex", "gene_id_gtex", "split", "chr", "strand", "start", "end", "5UTR", "3UTR",
                 *GTEX_TISSUES, "RNA", "CDS", "Protein"]  # fmt: skip
    df = df[reordered]
    df.insert(0, "Unnamed: 0", range(len(df)))  # a written pandas index is not a tissue
    out = prepare(tmp_path, genome, df)
    assert json.loads((out / "prepare.json").read_text())["targets"] == list(GTEX_TISSUES)
    assert read_fasta(out / "dna.fa") == EXPECTED_WINDOWS


def test_protein_coding_only_keeps_gene_windows(tmp_path, genome):
    out = prepare(tmp_path, genome, protein_coding_only=True)
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["sample_id"].tolist() == ["T1a", "T1b", "T3", "T4", "T6"]
    dna = read_fasta(out / "dna.fa")
    assert dna == {g: EXPECTED_WINDOWS[g] for g in ("G1", "G3", "G4", "G6")}
    assert json.loads((out / "prepare.json").read_text())["counts"]["dropped_noncoding"] == 3


@pytest.mark.parametrize("name", ["standardize", "log1p-standardize"])
def test_standardization_is_fitted_on_train_only(tmp_path, genome, name):
    out = prepare(tmp_path, genome, target_transform=name)
    meta = json.loads((out / "prepare.json").read_text())
    t = meta["transform"]
    raw = tpm_values(len(ROWS))
    base = np.log1p(raw) if name == "log1p-standardize" else raw
    train = np.array([r[2].lower() == "train" for r in ROWS])
    mean, std = np.nanmean(base[train], axis=0), np.nanstd(base[train], axis=0)
    assert t["fitted_on"] == "train" and t["ddof"] == 0
    np.testing.assert_allclose([t["mean"][k] for k in GTEX_TISSUES], mean)
    np.testing.assert_allclose([t["std"][k] for k in GTEX_TISSUES], std)
    y = load_prepared(out).targets().astype(np.float64)
    np.testing.assert_allclose(y, (base - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.nanmean(y[train], axis=0), 0, atol=1e-6)  # zero mean on train, not overall
    assert abs(np.nanmean(y[~train])) > 0.1
    np.testing.assert_allclose(invert_transform(apply_transform(raw, t, GTEX_TISSUES), t, GTEX_TISSUES), raw, rtol=1e-9)
    assert math.isnan(y[2, 0])


def test_transform_none_copies_values(tmp_path, genome):
    out = prepare(tmp_path, genome, target_transform="none")
    np.testing.assert_allclose(load_prepared(out).targets(), tpm_values(len(ROWS)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the file, the row (line) and the value.


def modified(row: int, **changes) -> list[tuple]:
    rows = [list(r) for r in ROWS]
    names = ["transcript_id_gtex", "gene_id_gtex", "split", "chr", "strand", "start", "end", "RNA", "Protein"]
    for key, value in changes.items():
        rows[row][names.index(key)] = value
    return [tuple(r) for r in rows]


@pytest.mark.parametrize(
    "rows, pattern",
    [
        (
            modified(3, transcript_id_gtex="T1a"),
            r"GTEx_final.csv: line 5 \(transcript 'T1a'\): transcript id appears twice \(first at line 2\)",
        ),
        (modified(1, chr="chr7"), r"line 3 \(transcript 'T1b'\): chromosome 'chr7' is not in genome .*genome.fa"),
        (modified(4, start=12), r"line 6 \(transcript 'T3'\): start 12 > end 9"),
        (modified(4, strand="*"), r"line 6 \(transcript 'T3'\): strand '\*' is not '\+' or '-'"),
        (modified(5, RNA=""), r"line 7 \(transcript 'T4'\): empty RNA sequence"),
        (modified(5, RNA="ACGU"), r"line 7 \(transcript 'T4'\): RNA has letter\(s\) \['U'\] outside ACGTN"),
        (modified(0, split="holdout"), r"line 2 \(transcript 'T1a'\): unknown split value 'holdout'"),
        (modified(1, strand="-"), r"line 3 \(transcript 'T1b'\): gene 'G1' is on chr1- here but on chr1\+ at line 2"),
        (modified(2, end=41), r"line 4 \(transcript 'T2a'\): end 41 is beyond the end of chr1 \(40 bp\)"),
        (modified(0, start="x"), r"line 2 \(transcript 'T1a'\): start 'x' is not an integer coordinate"),
        (modified(0, Protein="MK*V"), r"line 2 \(transcript 'T1a'\): protein has character\(s\) \['\*'\]"),
    ],
)
def test_bad_rows_are_named(tmp_path, genome, rows, pattern):
    with pytest.raises(PrepareError, match=pattern):
        prepare(tmp_path, genome, gtex_frame(rows))


def test_missing_files(tmp_path, genome):
    with pytest.raises(PrepareError, match=r"IsoFormer CSV '.*nope.csv' does not exist"):
        prepare_isoformer(tmp_path / "nope.csv", genome, tmp_path / "out")
    csv = write_csv(tmp_path, gtex_frame())
    with pytest.raises(PrepareError, match=r"genome FASTA '.*nope.fa' does not exist"):
        prepare_isoformer(csv, tmp_path / "nope.fa", tmp_path / "out")


def test_missing_required_column_lists_columns_found(tmp_path, genome):
    df = gtex_frame().drop(columns=["strand"])
    with pytest.raises(
        PrepareError,
        match=r"GTEx_final.csv: missing required column\(s\) \['strand'\]; columns found: \['transcript_id_gtex'",
    ):
        prepare(tmp_path, genome, df)


def test_negative_tpm_with_log1p_names_value(tmp_path, genome):
    values = tpm_values(len(ROWS))
    values[3, 4] = -0.5
    with pytest.raises(
        PrepareError, match=r"line 5: column 'Blood Vessel' has negative value -0.5; the 'log1p' transform"
    ):
        prepare(tmp_path, genome, gtex_frame(values=values))
    prepare(tmp_path, genome, gtex_frame(values=values), target_transform="standardize")  # fine without log1p


def test_non_numeric_target_names_value(tmp_path, genome):
    df = gtex_frame()
    df[GTEX_TISSUES[1]] = df[GTEX_TISSUES[1]].astype(object)
    df.loc[4, GTEX_TISSUES[1]] = "high"
    with pytest.raises(PrepareError, match=r"line 6: column 'Adrenal Gland' has non-numeric value 'high'"):
        prepare(tmp_path, genome, df)


def test_config_is_checked():
    with pytest.raises(PrepareError, match=r"unknown target_transform 'log2'"):
        IsoformerPrepareConfig(target_transform="log2")
    with pytest.raises(PrepareError, match=r"dna_window must be a positive int, got 0"):
        IsoformerPrepareConfig(dna_window=0)


def test_fixed_columns_match_the_dataset_schema():
    assert FIXED_COLUMNS == (
        "transcript_id_gtex", "gene_id_gtex", "split", "chr", "strand", "start", "end",
        "RNA", "5UTR", "CDS", "3UTR", "Protein",
    )  # fmt: skip
    assert len(GTEX_TISSUES) == 30 and GTEX_TISSUES[0] == "Adipose Tissue" and GTEX_TISSUES[-1] == "Vagina"
