"""Regression metrics for multi-target (per-tissue) expression prediction, and the
`Predictions` value type they are computed from.

numpy/scipy only (no torch), so reports and notebooks can use it without a model.

Definitions (also written into every metrics.json as METRIC_DEFINITIONS):
- Only masked-in (sample, target) pairs count; a masked-out value is never read.
- R^2 (coefficient of determination) = 1 - SS_res / SS_tot, with
  SS_res = sum_i (y_i - p_i)^2 and SS_tot = sum_i (y_i - mean(y))^2, where mean(y) is the
  mean of the evaluated (masked-in) samples of that target. Predicting that mean gives 0;
  worse than that is negative. Not the squared Pearson correlation.
- Pearson r = cov(y, p) / (std(y) std(p)) (scipy.stats.pearsonr).
- Spearman rho = Pearson r of the average ranks of y and p, ties getting the mean of the
  ranks they span (scipy.stats.spearmanr).
- Per target, a metric is NaN when the target has < 2 valid values or zero variance over
  them (R^2 and both correlations), and the correlations are also NaN when the
  predictions are constant over those values (correlation undefined). NaN values are
  excluded from the means over targets; `n_targets_used` says how many entered each mean.
- all_pairs_*: the same three metrics over ALL valid (sample, target) pairs pooled into
  one vector; R^2 there is around the single pooled mean, so between-target differences
  in level count as explained variance (unlike the per-target R^2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

METRIC_DEFINITIONS = {
    "r2": "1 - SS_res/SS_tot over masked-in samples, SS_tot around that target's mean of the evaluated samples (coefficient of determination; can be negative)",
    "pearson": "Pearson correlation of observed and predicted (scipy.stats.pearsonr)",
    "spearman": "Pearson correlation of average ranks, ties averaged (scipy.stats.spearmanr)",
    "n": "number of masked-in (valid) values",
    "mean_*": "mean over targets of the per-target metric, NaN targets excluded; n_targets_used[metric] targets entered it",
    "all_pairs_*": "metric over all valid (sample, target) pairs pooled into one vector (R^2 around the pooled mean)",
    "degenerate": "a target with < 2 valid values or zero observed variance gives NaN (null in JSON); constant predictions give NaN correlations",
}

METRIC_NAMES = ("r2", "spearman", "pearson")


@dataclass
class Predictions:
    """Model outputs aligned with observed targets, one row per sample."""

    sample_ids: list[str]  # (n,) sample identifiers, in prediction order
    pred: np.ndarray  # (n, t) float: predicted values
    target: np.ndarray  # (n, t) float: observed values; meaningless where mask is False
    mask: np.ndarray  # (n, t) bool: True where the observed value is valid
    target_names: list[str]  # (t,) names of the target columns (e.g. tissues)

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        t = len(self.target_names)
        for name in ("pred", "target", "mask"):
            shape = tuple(np.shape(getattr(self, name)))
            if shape != (n, t):
                raise ValueError(
                    f"Predictions.{name} has shape {shape}, expected (n_samples, n_targets) = ({n}, {t}) "
                    f"from {n} sample_ids and {t} target_names"
                )

    def __len__(self) -> int:
        return len(self.sample_ids)


def _metrics_1d(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """R^2, Spearman, Pearson of one vector pair (already masked), float64; NaN when undefined."""
    n = int(y.size)
    out = {"r2": math.nan, "spearman": math.nan, "pearson": math.nan, "n": n}
    if n < 2:
        return out
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0 or np.ptp(y) == 0.0:
        return out
    ss_res = float(np.sum((y - p) ** 2))
    out["r2"] = 1.0 - ss_res / ss_tot
    if np.ptp(p) > 0.0:  # constant predictions: correlation undefined (scipy would warn and return NaN)
        out["pearson"] = float(stats.pearsonr(y, p).statistic)
        out["spearman"] = float(stats.spearmanr(y, p).statistic)
    return out


def regression_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, target_names: list[str]) -> dict[str, Any]:
    """Per-target, mean-over-target and pooled R^2 / Spearman / Pearson (see the module docstring).

    pred, target: (n, t) float; mask: (n, t) bool, True where target is valid.
    Returns a dict:
      per_target: {name: {"r2", "spearman", "pearson", "n"}}
      mean_r2, mean_spearman, mean_pearson: means over targets with a defined value
      n_targets, n_targets_used: {"r2": k, "spearman": k, "pearson": k}, excluded_targets: [names with NaN R^2]
      all_pairs_r2, all_pairs_spearman, all_pairs_pearson, all_pairs_n: over all valid pairs pooled
      n_samples: rows evaluated (n)
    Values are Python floats/ints; NaN stays NaN here and becomes null in `to_json`.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool, got dtype {mask.dtype}")
    if pred.ndim != 2 or pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(f"pred {pred.shape}, target {target.shape} and mask {mask.shape} must all be the same (n, t) shape")
    if len(target_names) != pred.shape[1]:
        raise ValueError(f"{len(target_names)} target_names for {pred.shape[1]} target columns")
    if len(set(target_names)) != len(target_names):
        raise ValueError(f"duplicate target names: {sorted({n for n in target_names if list(target_names).count(n) > 1})}")
    bad = mask & ~np.isfinite(pred)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{int(bad.sum())} non-finite predictions at valid positions, first at row {i}, target {target_names[j]!r}: {pred[i, j]}")

    per_target = {}
    for j, name in enumerate(target_names):
        m = mask[:, j]
        per_target[name] = _metrics_1d(target[m, j], pred[m, j])

    result: dict[str, Any] = {"per_target": per_target, "n_samples": int(pred.shape[0]), "n_targets": len(target_names)}
    n_used = {}
    for metric in METRIC_NAMES:
        values = [v[metric] for v in per_target.values() if not math.isnan(v[metric])]
        n_used[metric] = len(values)
        result[f"mean_{metric}"] = float(np.mean(values)) if values else math.nan
    result["n_targets_used"] = n_used
    result["excluded_targets"] = [name for name, v in per_target.items() if math.isnan(v["r2"])]

    pooled = _metrics_1d(target[mask], pred[mask])
    for metric in METRIC_NAMES:
        result[f"all_pairs_{metric}"] = pooled[metric]
    result["all_pairs_n"] = pooled["n"]
    return result


def json_safe(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays into Python values and NaN/inf into None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(metrics: dict[str, Any], path: str | Path | None = None) -> str:
    """Serialise a metrics dict (NaN -> null); write it to `path` too when given."""
    text = json.dumps(json_safe(metrics), indent=2, allow_nan=False)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text


def masked_mse_np(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared error over masked-in entries (float64); NaN when there are none."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return math.nan
    diff = np.asarray(pred, dtype=np.float64)[mask] - np.asarray(target, dtype=np.float64)[mask]
    return float(np.mean(diff**2))
