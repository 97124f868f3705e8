"""fusion.metrics: definitions checked against independent numpy/scipy computations."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from fusion.metrics import Predictions, masked_mse_np, regression_metrics, to_json


def _all_valid(shape):
    return np.ones(shape, dtype=bool)


def test_perfect_prediction_gives_r2_one():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(20, 3))
    m = regression_metrics(y.copy(), y, _all_valid(y.shape), ["a", "b", "c"])
    assert m["mean_r2"] == pytest.approx(1.0)
    assert m["mean_spearman"] == pytest.approx(1.0)
    assert m["mean_pearson"] == pytest.approx(1.0)
    assert m["all_pairs_r2"] == pytest.approx(1.0)
    assert m["n_targets_used"] == {"r2": 3, "spearman": 3, "pearson": 3}
    assert all(v["n"] == 20 for v in m["per_target"].values())


def test_predicting_each_targets_mean_gives_r2_zero():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(15, 2)) + np.array([5.0, -3.0])
    pred = np.broadcast_to(y.mean(axis=0), y.shape).copy()
    m = regression_metrics(pred, y, _all_valid(y.shape), ["a", "b"])
    for v in m["per_target"].values():
        assert v["r2"] == pytest.approx(0.0, abs=1e-12)
        assert math.isnan(v["pearson"]) and math.isnan(v["spearman"])  # constant prediction: correlation undefined
    assert m["mean_r2"] == pytest.approx(0.0, abs=1e-12)
    assert m["n_targets_used"] == {"r2": 2, "spearman": 0, "pearson": 0}
    assert math.isnan(m["mean_pearson"])


def test_hand_example_each_metric():
    y = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0], [5.0, 5.0]])
    p = np.array([[1.5, 2.0], [1.5, 3.0], [3.5, 3.0], [3.0, 3.0], [6.0, 4.0]])  # ties in column 1
    m = regression_metrics(p, y, _all_valid(y.shape), ["x", "y"])
    for j, name in enumerate(["x", "y"]):
        yy, pp = y[:, j], p[:, j]
        r2 = 1 - np.sum((yy - pp) ** 2) / np.sum((yy - yy.mean()) ** 2)
        pear = np.corrcoef(yy, pp)[0, 1]
        spear = np.corrcoef(stats.rankdata(yy), stats.rankdata(pp))[0, 1]  # average ranks for ties
        assert m["per_target"][name]["r2"] == pytest.approx(r2)
        assert m["per_target"][name]["pearson"] == pytest.approx(pear)
        assert m["per_target"][name]["spearman"] == pytest.approx(spear)
    # column x: SS_res = 0.25+0.25+0.25+1+1 = 2.75, SS_tot = 10 -> 0.725
    assert m["per_target"]["x"]["r2"] == pytest.approx(0.725)
    assert m["mean_r2"] == pytest.approx(np.mean([m["per_target"][n]["r2"] for n in "xy"]))
    yf, pf = y.ravel(), p.ravel()
    assert m["all_pairs_r2"] == pytest.approx(1 - np.sum((yf - pf) ** 2) / np.sum((yf - yf.mean()) ** 2))
    assert m["all_pairs_pearson"] == pytest.approx(np.corrcoef(yf, pf)[0, 1])
    assert m["all_pairs_spearman"] == pytest.approx(np.corrcoef(stats.rankdata(yf), stats.rankdata(pf))[0, 1])
    assert m["all_pairs_n"] == 10


def test_mask_excludes_values():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(30, 2))
    p = y + 0.1 * rng.normal(size=y.shape)
    mask = _all_valid(y.shape)
    mask[::3, 0] = False
    garbage_y, garbage_p = y.copy(), p.copy()
    garbage_y[~mask] = 1e9
    garbage_p[~mask] = -1e9
    a = regression_metrics(p, y, mask, ["a", "b"])
    b = regression_metrics(garbage_p, garbage_y, mask, ["a", "b"])
    assert a == b
    assert a["per_target"]["a"]["n"] == 20 and a["per_target"]["b"]["n"] == 30
    keep = mask[:, 0]
    expect = 1 - np.sum((y[keep, 0] - p[keep, 0]) ** 2) / np.sum((y[keep, 0] - y[keep, 0].mean()) ** 2)
    assert a["per_target"]["a"]["r2"] == pytest.approx(expect)
    assert masked_mse_np(garbage_p, garbage_y, mask) == pytest.approx(np.mean((p[mask] - y[mask]) ** 2))


def test_degenerate_targets_are_nan_excluded_and_null_in_json():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(10, 3))
    y[:, 1] = 2.5  # zero variance
    mask = _all_valid(y.shape)
    mask[1:, 2] = False  # one valid value
    p = y + 0.05 * rng.normal(size=y.shape)
    m = regression_metrics(p, y, mask, ["ok", "flat", "single"])
    assert math.isnan(m["per_target"]["flat"]["r2"]) and math.isnan(m["per_target"]["single"]["spearman"])
    assert m["excluded_targets"] == ["flat", "single"]
    assert m["n_targets_used"]["r2"] == 1
    assert m["mean_r2"] == pytest.approx(m["per_target"]["ok"]["r2"])
    parsed = json.loads(to_json(m))
    assert parsed["per_target"]["flat"]["r2"] is None
    assert parsed["per_target"]["single"]["n"] == 1
    assert parsed["mean_r2"] == pytest.approx(m["mean_r2"])


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        regression_metrics(np.zeros((4, 2)), np.zeros((4, 3)), np.ones((4, 3), bool), ["a", "b", "c"])
    with pytest.raises(ValueError, match="target_names"):
        Predictions(sample_ids=["s1"], pred=np.zeros((1, 2)), target=np.zeros((1, 2)), mask=np.ones((1, 2), bool), target_names=["a"])
