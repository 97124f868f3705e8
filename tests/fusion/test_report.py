"""fusion.report: plots and report.md are written and readable; ablation table arithmetic."""

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from fusion.metrics import Predictions, regression_metrics, to_json
from fusion.report import ablation_plot, ablation_table, write_report

TISSUES = [f"Tissue number {i:02d} - long descriptive name" for i in range(30)]


def make_predictions(n: int, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(n, len(TISSUES)))
    pred = target * rng.uniform(0.2, 1.0, size=len(TISSUES)) + 0.5 * rng.normal(size=target.shape)
    mask = rng.random(target.shape) > 0.1
    return Predictions(sample_ids=[f"ENST{i:05d}" for i in range(n)], pred=pred, target=target, mask=mask, target_names=TISSUES)


def history_rows(n_epochs: int = 6) -> list[dict]:
    return [{"epoch": e, "step": 10 * (e + 1), "train_loss": 1.0 / (e + 1), "val_loss": 1.0 / (e + 1) + 0.05 * max(0, e - 3),
             "val_mean_r2": 0.1 * e, "val_mean_spearman": 0.1 * e, "lr": 1e-3, "seconds": 1.0, "best": e <= 3} for e in range(n_epochs)]


def _check_png(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0  # not blank


@pytest.mark.parametrize("n", [200, 300])  # 300 * 30 * 0.9 pairs > HEXBIN_ABOVE: the hexbin path
def test_write_report_writes_plots_and_markdown(tmp_path, n):
    preds = make_predictions(n)
    test_metrics = regression_metrics(preds.pred, preds.target, preds.mask, TISSUES)
    (tmp_path / "history.csv").write_text(pd.DataFrame(history_rows()).to_csv(index=False))
    run = {"format": "fusion-run", "mode": "cached", "train": {"lr": 0.001}, "resolved": {"steps_per_epoch": 7},
           "data": {"features": "tokens", "max_tokens": 32, "manifest": "/data/prep", "stores": {"rna": "/data/rna.zarr"}},
           "fingerprints": {"rna": "fp-rna"}, "loading": {"rna": "memory"}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    metrics_file = {"splits": {"validation": test_metrics, "test": test_metrics}}
    metrics_file = json.loads(to_json(metrics_file))  # as read back from metrics.json: NaN -> None
    paths = write_report(tmp_path, metrics_file, preds, tmp_path / "history.csv")
    names = {p.name for p in paths}
    assert names == {"pred_vs_observed.png", "per_target_r2.png", "learning_curves.png", "report.md"}
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            _check_png(p)
    # 30 tissue names need a tall figure to stay readable
    assert mpimg.imread(tmp_path / "per_target_r2.png").shape[0] > 800
    md = (tmp_path / "report.md").read_text()
    assert f"{test_metrics['mean_r2']:.3f}" in md
    assert TISSUES[0] in md and "](per_target_r2.png)" in md
    assert "peak learning rate of AdamW" in md and "steps_per_epoch `7`" in md  # run.json's values, the fields' meaning from the code
    assert "at most 32 rows" in md and "`/data/prep`" in md and "`/data/rna.zarr`" in md and "`fp-rna`" in md  # what the model saw


def test_write_report_handles_degenerate_target_and_no_history(tmp_path):
    preds = make_predictions(50)
    preds.target[:, 3] = 1.0  # zero variance -> NaN R^2
    m = regression_metrics(preds.pred, preds.target, preds.mask, TISSUES)
    paths = write_report(tmp_path, m, preds, None)
    assert {p.name for p in paths} == {"pred_vs_observed.png", "per_target_r2.png", "report.md"}
    md = (tmp_path / "report.md").read_text()
    assert "n/a" in md and TISSUES[3] in md


def test_ablation_table_mean_std_on_hand_example(tmp_path):
    rows = [
        {"modalities": ["rna", "dna"], "aggregator": "cross_attention", "seed": 0, "test_mean_r2": 0.40, "test_mean_spearman": 0.60},
        {"modalities": "dna+rna", "aggregator": "cross_attention", "seed": 1, "test_mean_r2": 0.44, "test_mean_spearman": 0.64},
        {"modalities": ["dna", "rna"], "aggregator": "cross_attention", "seed": 2, "test_mean_r2": 0.42, "test_mean_spearman": 0.68},
        {"modalities": ["rna"], "aggregator": "mean", "seed": 0, "test_mean_r2": 0.30, "test_mean_spearman": 0.50},
        {"modalities": ["rna"], "aggregator": "mean", "seed": 1, "test_mean_r2": 0.34, "test_mean_spearman": 0.56},
        {"modalities": ["dna"], "aggregator": "mean", "seed": 0, "test_mean_r2": 0.10, "test_mean_spearman": None},
    ]
    md, df = ablation_table(rows)
    assert list(df["modalities"]) == ["dna+rna", "rna", "dna"]  # sorted by mean test R^2, canonical modality order
    top = df.iloc[0]
    assert top["n_seeds"] == 3
    assert top["test_mean_r2_mean"] == pytest.approx(0.42)
    assert top["test_mean_r2_std"] == pytest.approx(0.02)  # sample std of 0.40, 0.44, 0.42
    assert top["test_mean_spearman_mean"] == pytest.approx(0.64)
    assert top["test_mean_spearman_std"] == pytest.approx(0.04)
    assert df.iloc[1]["test_mean_r2_std"] == pytest.approx(np.std([0.30, 0.34], ddof=1))
    assert math.isnan(df.iloc[2]["test_mean_r2_std"])  # one seed: undefined
    assert "0.420 ± 0.020" in md and "0.640 ± 0.040" in md and "0.100 ± n/a" in md
    path = ablation_plot(df, tmp_path / "ablation.png")
    _check_png(path)
    _check_png(ablation_plot(rows, tmp_path / "ablation_rows.png", metric="test_mean_spearman"))


def test_ablation_table_refuses_duplicate_runs_and_missing_fields():
    row = {"modalities": ["rna"], "aggregator": "mean", "seed": 0, "test_mean_r2": 0.3, "test_mean_spearman": 0.5}
    with pytest.raises(ValueError, match="share"):
        ablation_table([row, dict(row)])
    with pytest.raises(KeyError, match="test_mean_spearman"):
        ablation_table([{k: v for k, v in row.items() if k != "test_mean_spearman"}])
