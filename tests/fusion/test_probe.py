"""fusion.probe.fit_probe: the joint multi-target fit selects and predicts what per-target scikit-learn CV does."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fusion.probe import ProbeConfig, fit_probe, target_groups

ALPHAS = (1e-2, 1.0, 1e2, 1e4)


def planted(n: int = 240, d: int = 12, t: int = 5, seed: int = 0):
    """Features, targets whose best penalty differs per target (noise from none to mostly), and gene groups (3 rows each)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d)  # unequal scales: the scaler matters
    noise = np.linspace(0.05, 5.0, t)
    y = x @ rng.normal(size=(d, t)) / 10 + noise * rng.normal(size=(n, t))
    return x, y, np.repeat(np.arange(n // 3), 3).astype(str)


def per_target_reference(x, y, groups, alphas, folds):
    """alpha per target by out-of-fold squared error of StandardScaler -> Ridge (scikit-learn's own CV), refitted."""
    chosen, preds = [], []
    for j in range(y.shape[1]):
        sse = [np.sum((cross_val_predict(make_pipeline(StandardScaler(), Ridge(alpha=a)), x, y[:, j], groups=groups,
                                         cv=GroupKFold(n_splits=folds)) - y[:, j]) ** 2) for a in alphas]
        best = alphas[int(np.argmin(sse))]
        chosen.append(best)
        preds.append(make_pipeline(StandardScaler(), Ridge(alpha=best)).fit(x, y[:, j]).predict(x))
    return chosen, np.stack(preds, axis=1)


def test_joint_fit_equals_per_target_cross_validation():
    x, y, groups = planted()
    names = [f"t{j}" for j in range(y.shape[1])]
    probe, alphas = fit_probe(x, y, groups, ProbeConfig(alphas=ALPHAS, folds=4), names)
    chosen, reference = per_target_reference(x, y, groups, ALPHAS, 4)
    assert [alphas[n] for n in names] == chosen
    assert len(set(chosen)) > 1  # the targets really want different penalties: one shared alpha would fail this test
    np.testing.assert_allclose(probe.predict(x), reference, rtol=1e-6, atol=1e-8)


def test_missing_targets_are_fitted_on_their_own_rows():
    x, y, groups = planted(seed=1)
    y[:60, 1] = np.nan  # target 1 misses some rows, target 3 others
    y[100:130, 3] = np.nan
    names = [f"t{j}" for j in range(y.shape[1])]
    config = ProbeConfig(alphas=ALPHAS, folds=4)
    assert [list(c) for c in target_groups(~np.isnan(y))] == [[0, 2, 4], [1], [3]]
    probe, alphas = fit_probe(x, y, groups, config, names)
    for j in (1, 3):  # a target fitted alone on its valid rows gives the same alpha and the same predictions
        alone, alone_alpha = fit_probe(x, y[:, [j]], groups, config, [names[j]])
        assert alone_alpha[names[j]] == alphas[names[j]]
        np.testing.assert_allclose(probe.predict(x)[:, j], alone.predict(x)[:, 0], rtol=1e-6, atol=1e-8)
    assert np.isfinite(probe.predict(x)).all()


def test_too_few_valid_values_is_an_error_naming_the_target():
    x, y, groups = planted()
    y[3:, 2] = np.nan
    with pytest.raises(ValueError, match="target 't2' has 3 valid training values"):
        fit_probe(x, y, groups, ProbeConfig(alphas=ALPHAS, folds=4), [f"t{j}" for j in range(y.shape[1])])
