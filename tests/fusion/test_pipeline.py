"""The fusion stage end to end on real stores: synthetic data -> adapter -> embedcache -> train / evaluate / predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli.fusion_cli import main as fusion_main
from embedcache.build import build
from embedcache.config import BuildConfig
from fusion.checkpoint import FingerprintMismatch
from fusion.data import DataConfig, DataError, open_batches
from fusion.experiment import read_manifest


def store_args(stores: dict[str, str]) -> list[str]:
    return [a for m, p in stores.items() for a in ("--store", f"{m}={p}")]


FAST = ["--epochs", "2", "--d-model", "16", "--head-hidden", "16", "--no-progress"]


@pytest.mark.parametrize("features", ["tokens", "pooled"])
def test_train_evaluate_predict(demo_data, tmp_path, features, capsys):
    run = tmp_path / "run"
    code = fusion_main(["train", "--manifest", demo_data["prep"], *store_args(demo_data["stores"]), "--features", features, "--out", str(run), *FAST])
    assert code == 0, capsys.readouterr().err
    for name in ("run.json", "checkpoint.pt", "metrics.json", "predictions.csv", "history.csv", "log.txt", "report.md",
                 "pred_vs_observed.png", "per_target_r2.png", "learning_curves.png"):  # fmt: skip
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())["splits"]
    assert set(metrics) == {"train", "validation", "test"} and len(metrics["test"]["per_target"]) == 30
    run_json = json.loads((run / "run.json").read_text())
    dna_dim = 48 if demo_data["models"]["dna"][0] == "enformer" else 16  # Enformer: 2 x dim 24; NT without the extra
    assert run_json["model"]["input_dims"] == {"dna": dna_dim, "rna": 16, "protein": 16}  # from the stores' attrs
    assert run_json["model"]["pooled_probe"] == (features == "tokens")  # pooled vectors: one token, nothing to add
    assert fusion_main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["splits"]["test"] == metrics["test"]
    evaluated = (tmp_path / "eval" / "report.md").read_text()  # an evaluation's report says what it saw, from its run
    assert "## Inputs: what the model saw" in evaluated and demo_data["stores"]["rna"] in evaluated and "## Training configuration" in evaluated
    assert fusion_main(["predict", str(run), "--out", str(tmp_path / "pred.csv")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == len(read_manifest(demo_data["prep"]))


def test_missing_protein_is_masked_and_missing_targets_are_masked(demo_data):
    batches = open_batches(DataConfig(manifest=demo_data["prep"], stores=demo_data["stores"]), read_manifest(demo_data["prep"]), log=lambda s: None)
    seen_absent = seen_missing_target = False
    for batch in batches("train"):
        protein = batch.features["protein"]
        absent = ~protein.present
        if absent.any():
            seen_absent = True
            assert not protein.mask[absent].any() and (protein.x[absent] == 0).all()
        if (~batch.target_mask).any():
            seen_missing_target = True
            assert (batch.targets[~batch.target_mask] == 0).all()
    assert seen_absent, "the fixture has non-coding transcripts"
    assert seen_missing_target, "the fixture has missing targets"


def test_manifest_keys_absent_from_a_store(demo_data, tmp_path):
    partial = tmp_path / "rna_partial.zarr"
    rna_fa = Path(demo_data["prep"]) / "rna.fa"
    records = rna_fa.read_text().split(">")[1:]
    (tmp_path / "few.fa").write_text("".join(">" + r for r in records[:5]))
    encoder, model_dir, _ = demo_data["models"]["rna"]
    build(BuildConfig.create(encoder, str(model_dir)), [tmp_path / "few.fa"], partial, progress=False, log=lambda s: None)
    stores = {**demo_data["stores"], "rna": str(partial)}
    with pytest.raises(DataError, match=r"of \d+ rna keys of manifest .* are not in store .*rna_partial\.zarr.*e\.g\. \["):
        open_batches(DataConfig(manifest=demo_data["prep"], stores=stores), read_manifest(demo_data["prep"]), log=lambda s: None)


def test_checkpoint_refuses_stores_with_other_fingerprints(demo_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert fusion_main(["train", "--manifest", demo_data["prep"], *store_args(demo_data["stores"]), "--features", "pooled", "--out", str(run), *FAST]) == 0
    other = tmp_path / "protein_layer1.zarr"
    encoder, model_dir, _ = demo_data["models"]["protein"]
    build(BuildConfig.create(encoder, str(model_dir), layers=(1,)), [Path(demo_data["prep"]) / "protein.fa"], other, progress=False, log=lambda s: None)
    capsys.readouterr()
    code = fusion_main(["evaluate", str(run), "--store", f"protein={other}"])
    err = capsys.readouterr().err
    assert code == 2 and "protein" in err and "fingerprint" in err.lower()
    with pytest.raises(FingerprintMismatch):
        from fusion.experiment import run_evaluate

        run_evaluate(run, stores={"protein": str(other)}, log=lambda s: None)


def test_empty_split_and_unknown_targets(demo_data, tmp_path, capsys):
    prep = tmp_path / "prep"
    shutil.copytree(demo_data["prep"], prep)
    manifest = pd.read_csv(prep / "manifest.csv")
    manifest["split"] = manifest["split"].replace({"validation": "train"})
    manifest.to_csv(prep / "manifest.csv", index=False)
    code = fusion_main(["train", "--manifest", str(prep), *store_args(demo_data["stores"]), "--out", str(tmp_path / "r"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "split 'validation' is empty" in err
    from fusion.prepare.manifest import load_manifest

    with pytest.raises(ValueError, match="Brain_Nowhere"):
        load_manifest(prep / "manifest.csv", key_columns={"rna": "rna_id"}, target_columns=["Brain_Nowhere"])


def test_toml_config_gives_options(demo_data, tmp_path):
    config = tmp_path / "run.toml"
    stores = "\n".join(f'{m} = "{p}"' for m, p in demo_data["stores"].items())
    config.write_text(f'manifest = "{demo_data["prep"]}"\nfeatures = "pooled"\naggregator = "mean-concat"\nepochs = 1\nd_model = 16\nout = "{tmp_path / "run"}"\n[store]\n{stores}\n')
    assert fusion_main(["train", "--config", str(config), "--no-progress"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"]["aggregator"] == "mean-concat" and run["train"]["epochs"] == 1


def test_ablation_writes_a_table_with_probe_rows(demo_data, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--manifest", demo_data["prep"], *store_args(demo_data["stores"]), "--features", "pooled",
            "--aggregators", "cross-attention,mean-concat", "--seeds", "0,1", "--epochs", "1", "--d-model", "16", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert fusion_main(args) == 0
    table = pd.read_csv(out / "ablation.csv")
    # 7 subsets x 2 aggregators (single-modality cross-attention keeps its feed-forward layers), 7 probe rows
    assert len(table) == 7 * 2 + 7
    singles = table[~table["modalities"].str.contains("+", regex=False)]
    assert set(singles["aggregator"]) == {"cross-attention", "mean-concat", "ridge probe"}
    learned = table[table["aggregator"] != "ridge probe"]
    assert set(learned["n_seeds"]) == {2} and set(table[table["aggregator"] == "ridge probe"]["n_seeds"]) == {1}
    assert table["ceiling_r2"].between(0, 1).all()  # planted data: synthetic.json found through prepare.json
    markdown = (out / "ablation.md").read_text()
    assert "ridge probe" in markdown and "ceiling R²" in markdown and (out / "ablation.png").stat().st_size > 0
    runs = pd.read_csv(out / "ablation_runs.csv")
    assert len(runs) == 7 * 2 * 2 + 7 and np.isfinite(runs["test_mean_r2"]).all()
    assert "[35/35]" in capsys.readouterr().out  # k of N progress with elapsed and ETA


def test_ablation_runs_only_the_subsets_asked_for(demo_data, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--manifest", demo_data["prep"], *store_args(demo_data["stores"]), "--features", "pooled", "--aggregators",
            "mean-concat", "--seeds", "0", "--epochs", "1", "--d-model", "16", "--no-probe", "--no-progress", "--out", str(out)]  # fmt: skip
    assert fusion_main([*args, "--subsets", "rna,dna+protein"]) == 0
    assert pd.read_csv(out / "ablation.csv")["modalities"].tolist() == ["rna", "dna+protein"]
    capsys.readouterr()
    assert fusion_main([*args, "--subsets", "rna,dna+atac"]) == 2
    assert "--subsets 'rna,dna+atac': subset 'dna+atac' is not modalities of" in capsys.readouterr().err


def test_probe_writes_the_report_files_of_train(demo_data, tmp_path, capsys):
    run = tmp_path / "probe"
    assert fusion_main(["probe", "--manifest", demo_data["prep"], *store_args(demo_data["stores"]), "--modalities", "rna,protein",
                        "--folds", "3", "--out", str(run)]) == 0
    for name in ("probe.json", "metrics.json", "predictions.csv", "report.md", "pred_vs_observed.png", "per_target_r2.png"):
        assert (run / name).stat().st_size > 0, name
    probe = json.loads((run / "probe.json").read_text())
    assert probe["modalities"] == ["rna", "protein"] and probe["n_features"] == 16 + 16 + 1  # + the protein presence flag
    assert len(probe["alpha_per_target"]) == 30
    metrics = json.loads((run / "metrics.json").read_text())["splits"]
    assert set(metrics) == {"train", "validation", "test"} and np.isfinite(metrics["test"]["mean_r2"])
    pred = pd.read_csv(run / "predictions.csv")
    assert len(pred) == len(read_manifest(demo_data["prep"]))
    assert "one pooled vector per modality" in (run / "report.md").read_text()


def test_probe_refuses_too_few_gene_groups(demo_data, tmp_path, capsys):
    code = fusion_main(["probe", "--manifest", demo_data["prep"], *store_args(demo_data["stores"]), "--folds", "500", "--out", str(tmp_path / "p")])
    assert code != 0
    assert "fewer than folds=500" in capsys.readouterr().err


@pytest.mark.parametrize("flag, want", [("auto", None), ("on", True), ("off", False)])
def test_the_pooled_probe_flag_leaves_auto_to_the_features(flag, want):
    from cli.fusion_cli import create_parser, model_options

    args = create_parser().parse_args(["train", "--manifest", "m", "--store", "dna=s", "--pooled-probe", flag])
    assert model_options(args).get("pooled_probe") == want
