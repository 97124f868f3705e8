"""One function per `fusion` command: train, evaluate, predict (ablate: fusion.ablation).

A run directory describes itself: `run.json` holds the data config, the model config (with
dimensions read from the stores) and the training config; `checkpoint.pt` carries the stores'
fingerprints, so evaluating or predicting against other features is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fusion.checkpoint import check_fingerprints, load_checkpoint
from fusion.data import DataConfig, StoreBatches, open_batches
from fusion.models import FusionModel, FusionModelConfig, input_dims_from_dict
from fusion.models.fusion_model import fit_feature_stats_
from fusion.prepare.manifest import Manifest, load_manifest, load_prepared
from fusion.report import write_report
from fusion.train import TrainConfig, TrainResult, evaluate_run, predict, seed_everything, train, write_predictions_csv

Log = Callable[[str], None]
RUN_FILE = "run.json"
SPLITS = ("train", "validation", "test")


def read_manifest(path: str | Path) -> Manifest:
    """A prepared directory (prepare.json inside) or a manifest table with prepare.json beside it."""
    path = Path(path)
    return load_prepared(path) if path.is_dir() else load_manifest(path)


def build_model(batches: StoreBatches, aggregator: str, model_options: dict) -> FusionModel:
    """A fusion model whose input dimensions come from the stores, never from flags."""
    config = FusionModelConfig(
        modalities=batches.modalities,
        input_dims=input_dims_from_dict(batches.input_dims, batches.modalities),
        n_targets=len(batches.target_names),
        target_names=tuple(batches.target_names),
        aggregator=aggregator,
        **model_options,
    )
    return FusionModel(config)


@dataclass
class RunResult:
    run_dir: Path
    train: TrainResult
    metrics: dict  # split -> regression metrics


def run_train(
    data: DataConfig,
    aggregator: str,
    model_options: dict,
    train_config: TrainConfig,
    run_dir: str | Path,
    *,
    batches: StoreBatches | None = None,
    progress: bool = True,
    log: Log = print,
) -> RunResult:
    """Train a fusion model on cached features, evaluate every split, write the report.

    `batches` lets an ablation reuse features already loaded (a view with the run's modalities).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    batches = batches or open_batches(data, read_manifest(data.manifest), log=log)
    for split in SPLITS:  # an empty split is an error now, not after an epoch of training
        batches.split_manifest(split)
    seed_everything(train_config.seed)  # the model's initial weights depend on the seed too
    model = build_model(batches, aggregator, model_options)
    fit_feature_stats_(model, batches("train", shuffle=False, epoch=0))
    write_run_json(run_dir, "cached", data, model.config, train_config, batches)
    result = train(
        model,
        batches,
        train_config,
        run_dir,
        target_names=batches.target_names,
        fingerprints=batches.fingerprints,
        model_config=model.config.to_dict(),
        progress=progress,
        log=log,
    )
    return RunResult(run_dir=run_dir, train=result, metrics=evaluate_and_report(model, batches, run_dir, log))


def write_run_json(
    run_dir: Path, mode: str, data: DataConfig, model_config: FusionModelConfig, train_config: TrainConfig, batches: StoreBatches, **extra
) -> None:
    """run.json: what a run was trained on and how (cached or finetune mode), written before training starts."""
    run = {
        "format": "fusion-run",
        "mode": mode,
        "data": data.to_dict(),
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        **extra,
        "fingerprints": batches.fingerprints,
        "loading": batches.loading,
    }
    (run_dir / RUN_FILE).write_text(json.dumps(run, indent=2))


def evaluate_and_report(model: torch.nn.Module, batches: StoreBatches, run_dir: Path, log: Log) -> dict:
    """Metrics of every split, predictions.csv, and the report with plots; returns split -> metrics."""
    evaluation = evaluate_run(model, batches, run_dir, target_names=batches.target_names, splits=SPLITS, log=log)
    write_report(run_dir, evaluation.metrics, evaluation.predictions["test"], run_dir / "history.csv")
    return evaluation.metrics


def load_run(run_dir: str | Path) -> tuple[dict, FusionModel, dict]:
    """(run.json, model with the best weights, checkpoint) of a finished run."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a fusion run directory (no {RUN_FILE})")
    run = json.loads((run_dir / RUN_FILE).read_text())
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    model = FusionModel(FusionModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model_state"])
    return run, model.eval(), checkpoint


def _batches_for(run: dict, checkpoint: dict, manifest: str | None, stores: dict[str, str] | None, log: Log) -> StoreBatches:
    """Open the run's data (or new manifest / stores) and refuse features with other fingerprints."""
    data = DataConfig.from_dict(run["data"])
    overrides = {}
    if manifest:
        overrides["manifest"] = manifest
    if stores:
        overrides["stores"] = {**data.stores, **stores}
    data = DataConfig.from_dict({**data.to_dict(), **overrides})
    batches = open_batches(data, read_manifest(data.manifest), log=log)
    model_targets = list(checkpoint["target_names"])
    if batches.target_names != model_targets:
        raise ValueError(
            f"targets of manifest {data.manifest} {batches.target_names[:5]}... differ from the model's "
            f"{model_targets[:5]}... ({len(batches.target_names)} vs {len(model_targets)})"
        )
    check_fingerprints(
        checkpoint["fingerprints"],
        batches.fingerprints,
        source="evaluation data",
        checkpoint_path=str(checkpoint.get("path", "")),
        store_path=", ".join(f"{m}={p}" for m, p in data.stores.items()),
    )
    return batches


def run_evaluate(
    run_dir: str | Path, *, manifest: str | None = None, stores: dict[str, str] | None = None, out: str | Path | None = None, log: Log = print
) -> dict:
    """Metrics of a trained run on its splits (or on a new manifest / stores); writes metrics and report."""
    run, model, checkpoint = load_run(run_dir)
    batches = _batches_for(run, checkpoint, manifest, stores, log)
    out_dir = Path(out or run_dir)
    present = [s for s in SPLITS if (batches.manifest.frame[batches.manifest.split_column] == s).any()]
    evaluation = evaluate_run(model, batches, out_dir, target_names=batches.target_names, splits=present, log=log)
    last = "test" if "test" in present else present[-1]
    history = Path(run_dir) / "history.csv"
    write_report(out_dir, evaluation.metrics, evaluation.predictions[last], history if history.exists() else None)
    return evaluation.metrics


def run_predict(
    run_dir: str | Path, out: str | Path, *, manifest: str | None = None, stores: dict[str, str] | None = None, log: Log = print
) -> Path:
    """Predictions for every sample of a manifest (targets not needed), as CSV."""
    run, model, checkpoint = load_run(run_dir)
    batches = _batches_for(run, checkpoint, manifest, stores, log)
    splits = batches.manifest.frame[batches.manifest.split_column].unique().tolist() if batches.manifest.split_column else []
    preds = {s: predict(model, batches(s), target_names=batches.target_names) for s in splits}
    return write_predictions_csv(out, preds)


__all__ = ["RunResult", "build_model", "load_run", "read_manifest", "run_evaluate", "run_predict", "run_train"]

