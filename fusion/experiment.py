"""One function per `fusion` command: train, evaluate, predict (ablate: fusion.ablation; probe: fusion.probe).

Training, evaluation and reports are the shared run pipeline of `fusion.run` (the same for
`fusion finetune`); this module holds what the commands add: where evaluations go, the
predictions file, and the ablation grid.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Callable

from fusion.errors import ConfigError
from fusion.run import (RUN_FILE, SPLITS, RunResult, build_model, evaluate_and_report, evaluation_run_info, load_run, open_run, read_manifest,
                        run_directory, train_run)  # fmt: skip
from fusion.train import predict, write_predictions_csv

Log = Callable[[str], None]


# `fusion train`: the run pipeline with its default feed, cached features.
run_train = train_run


def evaluation_dir(run_dir: Path, out: str | Path | None) -> Path:
    """Where `fusion evaluate` writes: --out, or a new `evaluate-<UTC time>` folder inside the run.

    Never the run directory itself: its report.md and metrics.json are the run's own record.
    """
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out_dir, n = run_dir / f"evaluate-{stamp}", 1
        while out_dir.exists():
            n += 1
            out_dir = run_dir / f"evaluate-{stamp}-{n}"
        return out_dir
    out_dir = Path(out)
    if out_dir.exists() and out_dir.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {str(out)!r} is the run directory: evaluating there would overwrite the run's own report.md and metrics.json")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; evaluate writes a directory (metrics.json, predictions.csv, report.md)")
    return out_dir


def run_evaluate(
    run_dir: str | Path,
    *,
    manifest: str | None = None,
    stores: dict[str, str] | None = None,
    out: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    log: Log = print,
) -> tuple[Path, dict]:
    """Metrics of a finished run (either mode) on its splits, or on a new manifest / stores; returns (where written, split -> metrics)."""
    run = open_run(run_dir, manifest=manifest, stores=stores, trust_remote_code=trust_remote_code, progress=progress, log=log)
    out_dir = evaluation_dir(run.run_dir, out)
    column = run.batches.manifest.split_column
    present = [s for s in SPLITS if column and (run.batches.manifest.frame[column] == s).any()]
    if not present:
        raise ConfigError(f"manifest {run.batches.manifest.path} has no train/validation/test rows to evaluate")
    with run_directory(out_dir):  # a failed evaluation leaves no empty directory
        metrics = evaluate_and_report(run.model, run.batches, out_dir, present, history=run.run_dir / "history.csv",
                                      run=evaluation_run_info(run), progress=progress, log=log)  # fmt: skip
    return out_dir, metrics


def run_predict(
    run_dir: str | Path,
    out: str | Path,
    *,
    manifest: str | None = None,
    stores: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    log: Log = print,
) -> Path:
    """Predictions of a finished run (either mode) for every sample of a manifest (targets not needed), as CSV."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; give the predictions CSV file to write, e.g. {str(out / 'predictions.csv')!r}")
    run = open_run(run_dir, manifest=manifest, stores=stores, trust_remote_code=trust_remote_code, log=log)
    frame, column = run.batches.manifest.frame, run.batches.manifest.split_column
    splits = frame[column].unique().tolist() if column else []
    preds = {s: predict(run.model, run.batches(s), target_names=run.batches.target_names) for s in splits}
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_predictions_csv(out, preds)
