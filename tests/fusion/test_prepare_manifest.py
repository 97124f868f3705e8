"""The generic manifest loader: formats, keys, targets with NaN, splits, group splits and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.prepare.manifest import GroupSplit, PrepareError, load_manifest, load_prepared

KEYS = {"dna": "dna_id", "rna": "rna_id", "protein": "protein_id"}
TARGETS = ["t1", "t2"]


def frame(n_genes: int = 3, with_split: bool = True) -> pd.DataFrame:
    """Two transcripts per gene; the second of each gene is non-coding (no protein)."""
    rows = []
    for g in range(n_genes):
        for k in range(2):
            rows.append(
                {
                    "sample_id": f"00{g}{k}",  # leading zeros must survive
                    "gene_id": f"g{g}",
                    "split": ["train", "valid", "test"][g % 3],
                    "dna_id": f"g{g}",
                    "rna_id": f"00{g}{k}",
                    "protein_id": f"00{g}{k}" if k == 0 else None,
                    "t1": float(g + k),
                    "t2": None if (g, k) == (0, 1) else 10.0 * g,
                }
            )
    df = pd.DataFrame(rows)
    return df if with_split else df.drop(columns="split")


def write(df: pd.DataFrame, path: Path) -> Path:
    name = path.name
    if name.endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False, sep="\t" if ".tsv" in name else ",")
    return path


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.parquet", "m.csv.gz"])
def test_formats_read_alike(tmp_path, name):
    m = load_manifest(write(frame(), tmp_path / name), KEYS, TARGETS)
    assert m.sample_ids == ["0000", "0001", "0010", "0011", "0020", "0021"]
    assert m.keys("dna") == ["g0", "g0", "g1", "g1", "g2", "g2"]
    assert m.keys("protein") == ["0000", "0010", "0020"]  # missing keys skipped
    assert m.present("protein").tolist() == [True, False, True, False, True, False]
    y = m.targets()
    assert y.dtype == np.float32 and y.shape == (6, 2)
    assert np.isnan(y[1, 1]) and np.isnan(y).sum() == 1
    assert y[5, 0] == 3.0
    assert m.frame["split"].tolist() == [
        "train",
        "train",
        "validation",
        "validation",
        "test",
        "test",
    ]  # 'valid' normalised


def test_split_subsets_and_empty_split_error(tmp_path):
    m = load_manifest(write(frame(), tmp_path / "m.csv"), KEYS, TARGETS)
    v = m.split("validation")
    assert v.sample_ids == ["0010", "0011"] and v.split("valid").sample_ids == v.sample_ids
    with pytest.raises(PrepareError, match=r"split 'test' is empty; samples per split present: \{'validation': 2\}"):
        v.split("test")


def test_group_split_is_deterministic_and_group_disjoint(tmp_path):
    df = frame(n_genes=60, with_split=False)
    path = write(df, tmp_path / "m.csv")
    split = GroupSplit(column="gene_id", fractions=(0.8, 0.1, 0.1), seed=3)
    a = load_manifest(path, KEYS, TARGETS, group_split=split)
    b = load_manifest(path, KEYS, TARGETS, group_split=split)
    assert a.frame["split"].tolist() == b.frame["split"].tolist()
    per_gene = a.frame.groupby("gene_id")["split"].nunique()
    assert (per_gene == 1).all()  # every gene in exactly one split
    genes = a.frame.drop_duplicates("gene_id")["split"].value_counts().to_dict()
    assert genes == {"train": 48, "validation": 6, "test": 6}
    # Row order does not matter, the seed does.
    shuffled = write(df.sample(frac=1.0, random_state=0), tmp_path / "shuffled.csv")
    c = load_manifest(shuffled, KEYS, TARGETS, group_split=split)
    assert dict(zip(c.sample_ids, c.frame["split"])) == dict(zip(a.sample_ids, a.frame["split"]))
    d = load_manifest(path, KEYS, TARGETS, group_split=GroupSplit(seed=4))
    assert d.frame["split"].tolist() != a.frame["split"].tolist()


def test_existing_split_column_wins_over_group_split(tmp_path):
    m = load_manifest(write(frame(), tmp_path / "m.csv"), KEYS, TARGETS, group_split=GroupSplit(seed=1))
    assert m.frame["split"].tolist()[:2] == ["train", "train"]


def test_no_split_column(tmp_path):
    path = write(frame(with_split=False), tmp_path / "m.csv")
    with pytest.raises(PrepareError, match=r"no split column 'split'; columns are \['sample_id'.*Pass group_split"):
        load_manifest(path, KEYS, TARGETS)
    m = load_manifest(path, KEYS, TARGETS, split_column=None)
    with pytest.raises(PrepareError, match="has no split column"):
        m.split("train")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (
            dict(target_columns=["t1", "Liver"]),
            r"unknown target column\(s\) \['Liver'\]; columns are \['sample_id', 'gene_id'",
        ),
        (
            dict(key_columns={"dna": "dna_id", "protein": "prot"}),
            r"key column\(s\) \{'protein': 'prot'\} \(modality: column\) not in the file",
        ),
        (dict(target_columns=None), r"target_columns not given and there is no prepare.json"),
        (dict(sample_id_column="id"), r"no sample id column 'id'"),
    ],
)
def test_column_errors(tmp_path, kwargs, pattern):
    args = dict(key_columns=KEYS, target_columns=TARGETS) | kwargs
    with pytest.raises(PrepareError, match=pattern):
        load_manifest(write(frame(), tmp_path / "m.csv"), **args)


def test_duplicate_sample_ids(tmp_path):
    df = frame()
    df.loc[3, "sample_id"] = "0000"
    with pytest.raises(PrepareError, match=r"duplicate sample id\(s\) \['0000'\] at rows \[2, 5\]"):
        load_manifest(write(df, tmp_path / "m.csv"), KEYS, TARGETS)


def test_empty_files(tmp_path):
    (tmp_path / "zero.csv").write_text("")
    with pytest.raises(PrepareError, match=r"manifest file '.*zero.csv' is empty"):
        load_manifest(tmp_path / "zero.csv", KEYS, TARGETS)
    write(frame().iloc[:0], tmp_path / "header.csv")
    with pytest.raises(PrepareError, match=r"header.csv: manifest has a header but no rows"):
        load_manifest(tmp_path / "header.csv", KEYS, TARGETS)
    with pytest.raises(PrepareError, match=r"manifest file '.*absent.csv' does not exist"):
        load_manifest(tmp_path / "absent.csv", KEYS, TARGETS)
    with pytest.raises(PrepareError, match=r"manifest file '.*absent.csv' does not exist") as e:  # not "no prepare.json"
        load_manifest(tmp_path / "absent.csv")
    assert "prepare.json" not in str(e.value)


def test_bad_values(tmp_path):
    df = frame()
    df["t2"] = df["t2"].astype(object)
    df.loc[4, "t2"] = "lots"
    with pytest.raises(PrepareError, match=r"target column 't2', row 6: value 'lots' is not a number"):
        load_manifest(write(df, tmp_path / "m.csv"), KEYS, TARGETS)
    df = frame()
    df.loc[2, "split"] = "holdout"
    with pytest.raises(PrepareError, match=r"m2.csv: row 4: unknown split value 'holdout'"):
        load_manifest(write(df, tmp_path / "m2.csv"), KEYS, TARGETS)
    with pytest.raises(PrepareError, match=r"unknown modality 'atac'; this manifest has \['dna', 'protein', 'rna'\]"):
        load_manifest(write(frame(), tmp_path / "m3.csv"), KEYS, TARGETS).keys("atac")


def test_group_split_fractions_are_checked():
    with pytest.raises(
        PrepareError, match=r"GroupSplit fractions \(0.8, 0.3, 0.1\) must be three non-negative numbers"
    ):
        GroupSplit(fractions=(0.8, 0.3, 0.1))


def test_prepare_json_supplies_targets_keys_and_split(tmp_path):
    write(frame(), tmp_path / "manifest.csv")
    meta = {
        "targets": ["t2"],
        "key_columns": {"rna": "rna_id"},
        "split_column": "split",
        "modalities": {"rna": "rna.fa"},
    }
    (tmp_path / "prepare.json").write_text(json.dumps(meta))
    m = load_manifest(tmp_path / "manifest.csv")
    assert m.target_columns == ("t2",) and m.key_columns == {"rna": "rna_id"}
    p = load_prepared(tmp_path)
    assert p.target_columns == ("t2",) and p.sequence_files == {"rna": tmp_path / "rna.fa"}
    with pytest.raises(PrepareError, match=r"no prepare.json; is this a directory written by a prepare step"):
        load_prepared(tmp_path / "elsewhere")


def test_prepare_manifest_cli_describes_a_table_without_hand_written_json(tmp_path, capsys):
    from cli.fusion_cli import main as fusion_main

    table = tmp_path / "mine.csv"
    frame(n_genes=6, with_split=False).rename(columns={"sample_id": "id"}).to_csv(table, index=False)
    args = ["prepare", "manifest", str(table), "--key", "dna=dna_id", "--key", "rna=rna_id", "--key", "protein=protein_id", "--sample-id-column", "id",
            "--group-column", "gene_id", "--split-fractions", "0.5,0.25,0.25", "--split-seed", "1"]  # fmt: skip
    assert fusion_main(args) == 0
    meta = json.loads((tmp_path / "prepare.json").read_text())
    assert meta["targets"] == ["t1", "t2"]  # every other column
    manifest = load_manifest(table)  # everything from prepare.json: ids, keys, targets, group split
    assert manifest.sample_id_column == "id" and manifest.keys("protein")[0] == "0000"
    assert set(manifest.frame["split"]) == {"train", "validation", "test"}
    assert (manifest.frame.groupby("gene_id")["split"].nunique() == 1).all()
    assert fusion_main(args) == 2 and "exists already" in capsys.readouterr().err  # never replaced


def test_prepare_manifest_refuses_a_bad_table_and_writes_nothing(tmp_path, capsys):
    from cli.fusion_cli import main as fusion_main

    df = frame().astype({"t1": object})
    df.loc[2, "t1"] = "lots"
    table = write(df, tmp_path / "m.csv")
    code = fusion_main(["prepare", "manifest", str(table), "--key", "rna=rna_id", "--targets", "t1,t2"])
    err = capsys.readouterr().err
    assert code == 2 and "m.csv" in err and "'t1'" in err and "row 4" in err and "'lots'" in err
    assert not (tmp_path / "prepare.json").exists()
