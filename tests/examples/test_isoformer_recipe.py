"""examples/isoformer: the paper's recipe run offline end to end, through the same script and TOML files.

The data are `fusion prepare synthetic`'s table in the real GTEx_final.csv schema and its small
genome; the encoders are tiny random models of the real architectures (embedcache.tiny_models),
saved where examples/isoformer/tiny.toml points. Without the enformer extra (the transformers 5
environment) only the Enformer row is left out, by one more TOML that switches it off.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from embedcache import open_store
from embedcache.encoders.enformer import enformer_available
from embedcache.tiny_models import make_tiny_enformer, make_tiny_esm2, make_tiny_nucleotide_transformer
from fusion.paper_table import PAPER_ROWS, PaperTableError, paper_table
from fusion.prepare.fasta import read_fasta
from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "isoformer"


def run_recipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(RECIPE / "recipe.py"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_recipe_runs_offline_end_to_end(tmp_path):
    info = generate_synthetic(tmp_path / "data", SyntheticConfig(n_genes=24, seed=1))
    # Where tiny.toml points (relative to the working directory), at the smallest useful sizes.
    make_tiny_nucleotide_transformer(tmp_path / "tiny" / "nt", hidden=16)
    make_tiny_esm2(tmp_path / "tiny" / "esm2", hidden=16)
    configs = ["--config", str(RECIPE / "tiny.toml")]
    with_enformer = enformer_available()
    if with_enformer:
        make_tiny_enformer(tmp_path / "tiny" / "enformer", dim=24)
    else:
        (tmp_path / "no_enformer.toml").write_text("[enformer]\nenabled = false\n")
        configs += ["--config", "no_enformer.toml"]

    result = run_recipe(tmp_path, "--csv", str(info.csv_path), "--genome", str(info.genome_path), "--out", "out", *configs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"

    # The commands are printed as a user would type them.
    assert "$ fusion prepare isoformer --csv" in result.stdout and "$ fusion ablate --manifest" in result.stdout
    assert ("$ fusion train --manifest" in result.stdout) == with_enformer

    # Prepared once per DNA window: tiny.toml's 600 bp (NT), 2,048 bp (Enformer).
    assert {len(s) for s in read_fasta(out / "prepared" / "nt" / "dna.fa").values()} == {600}
    assert (out / "prepared" / "enformer" / "dna.fa").is_file() == with_enformer
    if with_enformer:
        assert {len(s) for s in read_fasta(out / "prepared" / "enformer" / "dna.fa").values()} == {2048}

    # Each store was built with recipe.toml's settings and tiny.toml's model.
    rna = open_store(str(out / "stores" / "rna.zarr"))
    config = rna.attrs["config"]
    assert config["crop"] == "left" and config["model"] == "tiny/nt" and config["pooling"] == "mean"
    assert open_store(str(out / "stores" / "protein.zarr")).attrs["config"]["crop"] == "right"
    if with_enformer:
        dna = open_store(str(out / "stores" / "dna_enformer.zarr")).attrs["config"]
        assert (dna["window"], dna["pooling"], dna["pool_bins"], dna["token_bins"]) == (2048, "center", 3, 4)

    # The table: the paper's rows in its order, this run's mean +- std over 3 seeds beside them.
    table = pd.read_csv(out / "paper_table.csv")
    assert list(zip(table["inputs"], table["dna_encoder"])) == [(r.label, r.dna_encoder) for r in PAPER_ROWS]
    trained = table if with_enformer else table[table["dna_encoder"] != "Enformer"]
    assert (trained["n_seeds"] == 3).all() and (table["n_seeds"] == 0).sum() == (0 if with_enformer else 1)
    assert trained[["r2_mean", "r2_std", "spearman_mean", "spearman_std", "probe_r2"]].notna().all().all()
    assert table.loc[table["modalities"] == "dna+rna", "paper_r2_mean"].item() == 0.39
    runs = pd.read_csv(out / "ablation" / "ablation_runs.csv")
    dna_rna = runs[(runs["modalities"] == "dna+rna") & (runs["aggregator"] == "cross-attention")]["test_mean_r2"]
    assert table.loc[table["modalities"] == "dna+rna", "r2_mean"].item() == pytest.approx(dna_rna.mean())
    markdown = (out / "paper_table.md").read_text()
    assert "| DNA + RNA + protein | NT |" in markdown and "0.430 ± 0.010" in markdown
    if with_enformer:
        seeds = [json.loads((out / "enformer" / f"seed{k}" / "run.json").read_text())["train"]["seed"] for k in range(3)]
        assert seeds == [0, 1, 2]
        assert "| DNA + RNA + protein | Enformer |" in markdown


def _runs(rows: list[tuple[str, str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["modalities", "aggregator", "seed", "test_mean_r2", "test_mean_spearman"])


def test_paper_table_takes_the_right_runs_per_row():
    runs = _runs([
        ("dna", "cross-attention", 0, 0.1, 0.4), ("dna", "cross-attention", 1, 0.2, 0.5), ("dna", "ridge probe", 0, 0.15, 0.45),
        ("dna", "mean-concat", 0, 0.9, 0.9),  # another aggregator: not this table's
        ("dna+rna", "cross-attention", 0, 0.3, 0.6), ("dna+rna", "cross-attention", 1, 0.5, 0.7),
        ("dna+rna", "mean-concat", 0, 0.9, 0.9),  # another aggregator: not this table's
    ])  # fmt: skip
    markdown, table = paper_table(runs, aggregator="cross-attention")
    dna = table[table["modalities"] == "dna"].iloc[0]
    assert (dna["aggregator"], dna["n_seeds"], dna["r2_mean"], dna["probe_r2"]) == ("cross-attention", 2, pytest.approx(0.15), 0.15)
    assert dna["r2_std"] == pytest.approx(math.sqrt(0.005))  # ddof 1 over the two seeds
    pair = table[table["modalities"] == "dna+rna"].iloc[0]
    assert (pair["aggregator"], pair["r2_mean"], pair["spearman_mean"]) == ("cross-attention", pytest.approx(0.4), pytest.approx(0.65))
    assert math.isnan(pair["probe_r2"])
    # Rows this run lacks stay, with the paper's figure and '-'; the paper's unreported subset is left out.
    assert len(table) == 7 and "rna+protein" not in set(table["modalities"])
    assert "| RNA only | - | - | 0.360 ± 0.030 |" in markdown


def test_paper_table_names_what_is_missing(tmp_path):
    with pytest.raises(PaperTableError, match="ablation_runs.csv: no such file"):
        paper_table(tmp_path / "ablation_runs.csv")
    with pytest.raises(PaperTableError, match=r"seed0[/\\]metrics.json: no such file"):
        paper_table(_runs([("dna", "mean-concat", 0, 0.1, 0.4)]), [tmp_path / "seed0"])
