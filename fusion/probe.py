"""The linear-probe baseline: ridge regression per target on pooled features, with scikit-learn.

For a modality subset, each sample's input is the concatenation of its pooled vectors (one per
modality, read through the same data layer as `fusion train --features pooled`); a modality some
samples lack (a non-coding isoform's protein) enters as zeros plus a presence flag. Per target
(tissue): StandardScaler -> Ridge, alpha from `alphas` by cross-validation with GroupKFold folds by gene
on the training split only (isoforms of one gene share its DNA: an ungrouped fold would leak), the
target's missing values left out of its fit. Targets are fitted together where they share their valid
rows (see `fit_probe`): a probe on the demo's data takes about a second. The refitted pipeline predicts every split; metrics,
predictions and the report are the same files `fusion train` writes.

A run directory receives:
    probe.json        format fusion-probe: ProbeConfig, data config, modalities, feature width, chosen alpha per target
    metrics.json      as fusion.train.evaluate_run
    predictions.csv   as fusion.train.evaluate_run
    report.md + plots as fusion.report.write_report (no learning curves: nothing is trained by epochs)
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.model_selection import GroupKFold
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from fusion.data import DataConfig, DataError, StoreBatches, open_batches
from fusion.metrics import Predictions, json_safe
from fusion.prepare.manifest import load_manifest, load_prepared
from fusion.report import write_report
from fusion.train import write_evaluation

Log = Callable[[str], None]
SPLITS = ("train", "validation", "test")
# Up to this many features, the probe's solves run on one BLAS thread. Each is milliseconds of work there,
# and a multi-threaded BLAS's threads wait on each other: on the shared 2-core VM under load a 968 x 160
# multi-target Ridge fit took ~1 s with the default threads and ~5 ms with one. Wider designs (IsoFormer's
# pooled vectors concatenate to ~4,500 features) keep the library's threads, where they pay.
ONE_THREAD_UP_TO = 1024


@dataclass(frozen=True)
class ProbeConfig:
    """How the ridge probe picks its penalty. Written into probe.json."""

    alphas: tuple[float, ...] = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5)  # ridge penalties tried per target (on standardised features)
    folds: int = 5  # GroupKFold folds over the training split's genes
    group_column: str = "gene_id"  # manifest column whose groups never straddle a fold

    def __post_init__(self) -> None:
        if not self.alphas or min(self.alphas) <= 0:
            raise ValueError(f"alphas must be non-empty and positive, got {self.alphas}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")


@dataclass
class ProbeResult:
    run_dir: Path
    alphas: dict[str, float]  # target -> chosen alpha
    metrics: dict  # split -> regression metrics


def pooled_design(batches: StoreBatches, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x (n, sum d_m [+ presence flags]), y (n, t) with NaN = missing, sample ids) of one split.

    Presence flags are added for every modality the split's samples lack somewhere in the whole
    manifest, so all splits get the same columns.
    """
    arrays = batches.split_arrays(split)
    parts = []
    for m, feats in batches.features.items():
        f = feats.gather(arrays.keys[m])  # (n, 1, d) pooled, zeros where absent
        if f.x.shape[1] != 1:
            raise DataError(f"the probe needs pooled features; modality {m!r} gives {f.x.shape[1]} rows per sample")
        parts.append(f.x[:, 0].double().numpy())
        if not batches.manifest.present(m).all():
            parts.append(f.present.double().numpy()[:, None])
    y = arrays.targets.double().numpy()
    return np.hstack(parts), y, arrays.sample_ids


@dataclass
class FittedProbe:
    """The fitted probe: one StandardScaler -> Ridge pipeline per group of targets with the same valid training rows.

    A group's Ridge holds one alpha per target (scikit-learn's `alpha` of shape (n_targets,)), so
    every target keeps its own penalty while a group is fitted in one call.
    """

    parts: list[tuple[np.ndarray, Pipeline]]  # (target columns, fitted pipeline predicting those columns)
    n_targets: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, d) features -> (n, n_targets) predictions."""
        out = np.empty((len(x), self.n_targets))
        for columns, model in self.parts:
            out[:, columns] = model.predict(x).reshape(len(x), len(columns))
        return out


def target_groups(valid: np.ndarray) -> list[np.ndarray]:
    """Target columns grouped by their valid-row pattern (valid: (n, t) bool): each group can share one Ridge fit."""
    groups: dict[bytes, list[int]] = {}
    for j in range(valid.shape[1]):
        groups.setdefault(np.packbits(valid[:, j]).tobytes(), []).append(j)
    return [np.array(columns) for columns in groups.values()]


def fit_probe(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, config: ProbeConfig, target_names: list[str]
) -> tuple[FittedProbe, dict[str, float]]:
    """The probe fitted on (x (n, d), y (n, t), NaN = missing), alpha per target by grouped CV; returns (probe, alpha per target).

    Selection: GroupKFold over `groups`; in each fold a StandardScaler fitted on the fold's training
    rows, then for each alpha one multi-target Ridge fit per group of targets that share their valid
    rows (all 30 tissues at once when none is missing), scored by squared error on the fold's
    held-out rows. Per target, the alpha with the lowest summed squared error over the folds wins,
    and StandardScaler -> Ridge(alpha per target) is refitted on the target's valid training rows.
    The selection is what GridSearchCV(Pipeline(StandardScaler, Ridge), GroupKFold) does per target
    (the scaler fitted on all of a fold's rows rather than on the target's valid ones); fitting the
    targets together makes it folds x alphas solves instead of folds x alphas x targets (~30x fewer).
    Grouped, not leave-one-out (RidgeCV's fast path): isoforms of one gene share its DNA window, so a
    left-out isoform's twin stays in the fit and favours too small an alpha.
    """
    n_groups = len(set(groups.tolist()))
    if n_groups < config.folds:
        raise ValueError(f"the training split has {n_groups} {config.group_column} groups, fewer than folds={config.folds}")
    valid = ~np.isnan(y)  # (n, t)
    for j, name in enumerate(target_names):
        if valid[:, j].sum() < config.folds:
            raise ValueError(f"target {name!r} has {int(valid[:, j].sum())} valid training values, fewer than folds={config.folds}")
    with blas_threads_for(x):
        return _fit_probe(x, y, groups, config, target_names, valid)


def blas_threads_for(x: np.ndarray):
    """One BLAS thread while solving on a design up to ONE_THREAD_UP_TO features wide; the library's own beyond."""
    return threadpool_limits(limits=1, user_api="blas") if x.shape[1] <= ONE_THREAD_UP_TO else nullcontext()


def _fit_probe(x, y, groups, config, target_names, valid) -> tuple[FittedProbe, dict[str, float]]:
    columns_by_rows = target_groups(valid)
    sse = np.zeros((len(config.alphas), y.shape[1]))  # (alphas, t)
    for train_rows, test_rows in GroupKFold(n_splits=config.folds).split(x, groups=groups):
        scaled = StandardScaler().fit(x[train_rows]).transform(x)  # (n, d), fitted on the fold's training rows
        for columns in columns_by_rows:
            rows = valid[:, columns[0]]  # the group's valid rows
            fit_rows, score_rows = train_rows[rows[train_rows]], test_rows[rows[test_rows]]
            if len(fit_rows) == 0 or len(score_rows) == 0:
                continue
            for a, alpha in enumerate(config.alphas):
                ridge = Ridge(alpha=alpha).fit(scaled[fit_rows], y[np.ix_(fit_rows, columns)])
                residual = ridge.predict(scaled[score_rows]).reshape(len(score_rows), len(columns)) - y[np.ix_(score_rows, columns)]
                sse[a, columns] += np.sum(residual**2, axis=0)
    best = np.asarray(config.alphas, dtype=float)[np.argmin(sse, axis=0)]  # (t,)
    parts = []
    for columns in columns_by_rows:
        rows = valid[:, columns[0]]
        model = make_pipeline(StandardScaler(), Ridge(alpha=best[columns]))  # one alpha per target of the group
        parts.append((columns, model.fit(x[rows], y[np.ix_(rows, columns)])))
    return FittedProbe(parts=parts, n_targets=y.shape[1]), {name: float(best[j]) for j, name in enumerate(target_names)}


def run_probe(
    data: DataConfig, run_dir: str | Path, config: ProbeConfig = ProbeConfig(), *, batches: StoreBatches | None = None, log: Log = print
) -> ProbeResult:
    """Fit the ridge probe on the training split of `data` (pooled features), evaluate every split, write the report.

    `batches` lets an ablation reuse pooled features already loaded (a view with the run's modalities).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if data.features != "pooled":
        data = DataConfig.from_dict({**data.to_dict(), "features": "pooled", "max_tokens": None})
    if batches is None:
        path = Path(data.manifest)
        batches = open_batches(data, load_prepared(path) if path.is_dir() else load_manifest(path), log=log)
    frame = batches.manifest.frame
    if config.group_column not in frame.columns:
        raise DataError(
            f"manifest {batches.manifest.path} has no group column {config.group_column!r} for the probe's folds; "
            f"columns: {list(frame.columns)}"
        )
    x_train, y_train, _ = pooled_design(batches, "train")
    groups = batches.split_manifest("train").frame[config.group_column].astype(str).to_numpy()
    names = batches.target_names
    log(f"probe: ridge per target on {x_train.shape[1]} pooled features of {'+'.join(batches.modalities)}, "
        f"{len(x_train)} training samples, {config.folds}-fold CV grouped by {config.group_column}")
    probe, alphas = fit_probe(x_train, y_train, groups, config, names)
    (run_dir / "probe.json").write_text(json.dumps(json_safe({
        "format": "fusion-probe",
        "probe": asdict(config),
        "data": data.to_dict(),
        "modalities": list(batches.modalities),
        "n_features": int(x_train.shape[1]),
        "fingerprints": batches.fingerprints,
        "alpha_per_target": alphas,
    }), indent=2) + "\n")
    predictions = {}
    for split in SPLITS:
        x, y, ids = pooled_design(batches, split)
        with blas_threads_for(x):
            pred = probe.predict(x).astype(np.float32)  # (n, t)
        mask = ~np.isnan(y)
        predictions[split] = Predictions(sample_ids=ids, pred=pred, target=np.nan_to_num(y).astype(np.float32), mask=mask, target_names=names)
    evaluation = write_evaluation(run_dir, predictions, extra={"model": "ridge probe"}, log=log)
    write_report(run_dir, evaluation.metrics, predictions["test"], None)
    return ProbeResult(run_dir=run_dir, alphas=alphas, metrics=evaluation.metrics)


__all__ = ["FittedProbe", "ProbeConfig", "ProbeResult", "fit_probe", "target_groups", "pooled_design", "run_probe"]
