"""`fusion ablate`: every modality subset x aggregator x seed, beside the ridge probe and the known ceiling.

Features are loaded once; each run trains on a view with its subset's modalities. Every aggregator
is trained on every subset, single-modality ones included: with one modality cross-attention keeps
its feed-forward layers (see CrossAttentionAggregator), so it is not mean-concat there. The ridge
probe (fusion.probe, deterministic) is fitted once per subset on the pooled features of the same
stores. Where the data are planted (fusion prepare synthetic), the best achievable R^2 per subset is
read from synthetic.json and shown as the ceiling.

out_dir receives: runs/<subset>__<aggregator>__seed<k>/ (a full `fusion train` run each),
probe/<subset>/ (a full `fusion probe` run each), ablation_runs.csv (one row per run),
ablation.csv / ablation.md (mean +- std over seeds) and ablation.png.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from fusion.data import DataConfig, open_batches
from fusion.experiment import read_manifest, run_train
from fusion.probe import ProbeConfig, run_probe
from fusion.report import ablation_plot, ablation_table
from fusion.train import TrainConfig

Log = Callable[[str], None]
PROBE = "ridge probe"  # the aggregator column of the probe's rows


def modality_subsets(modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every non-empty subset, singles first, in the given modality order."""
    return [c for r in range(1, len(modalities) + 1) for c in itertools.combinations(modalities, r)]


def planned_runs(subsets: list[tuple[str, ...]], aggregators: list[str], seeds: list[int]) -> list[tuple[tuple[str, ...], str, int]]:
    """(subset, aggregator, seed) to train: every subset with every aggregator and seed, in that order."""
    return [(subset, a, s) for subset in subsets for a in aggregators for s in seeds]


def known_ceilings(manifest: str | Path) -> dict[str, float] | None:
    """Best achievable R^2 per modality subset when the manifest was prepared from planted data, else None.

    Follows prepare.json's source CSV to the synthetic.json beside it. The ceilings hold for log1p
    targets and any per-target affine map of them (R^2 is invariant to it), so for the adapter's
    log1p and log1p-standardize transforms only.
    """
    path = Path(manifest)
    prepare = (path if path.is_dir() else path.parent) / "prepare.json"
    if not prepare.is_file():
        return None
    meta = json.loads(prepare.read_text())
    csv = meta.get("source", {}).get("csv")
    if not csv or meta.get("config", {}).get("target_transform") not in ("log1p", "log1p-standardize"):
        return None
    synthetic = Path(csv).parent / "synthetic.json"
    if not synthetic.is_file():
        return None
    planted = json.loads(synthetic.read_text())
    return planted.get("subset_ceiling_r2") if planted.get("kind") == "isoformer-synthetic" else None


def run_ablation(
    data: DataConfig,
    aggregators: list[str],
    seeds: list[int],
    model_options: dict,
    train_config: TrainConfig,
    out_dir: str | Path,
    *,
    subsets: list[tuple[str, ...]] | None = None,
    probe: ProbeConfig | None = ProbeConfig(),
    ceilings: dict[str, float] | None = None,
    progress: bool = True,
    log: Log = print,
) -> tuple[str, pd.DataFrame]:
    """Train every planned (subset, aggregator, seed) and the probe per subset; write ablation.md/.csv/.png.

    probe=None leaves the probe rows out. ceilings: best achievable R^2 per subset ("dna+rna"), default
    read by `known_ceilings` from the manifest's provenance.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    everything = open_batches(data, read_manifest(data.manifest), log=log, progress=progress)
    subsets = subsets or modality_subsets(everything.modalities)
    ceilings = ceilings if ceilings is not None else known_ceilings(data.manifest)
    runs = planned_runs(subsets, aggregators, seeds)
    total = len(runs) + (len(subsets) if probe is not None else 0)
    probes = f" + {len(subsets)} probe fits" if probe is not None else ""
    log(f"ablation: {len(runs)} training runs ({len(subsets)} modality subsets x {aggregators} x seeds {seeds}){probes} -> {out_dir}")
    rows = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc="ablation", unit="run", disable=not progress, dynamic_ncols=True)

    def done(k: int, what: str) -> None:
        bar.update(1)
        elapsed = time.perf_counter() - started
        eta = elapsed / k * (total - k)
        log(f"[{k}/{total}] {what} | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")

    k = 0
    if probe is not None:
        pooled = everything if data.features == "pooled" else None
        if pooled is None:
            pooled_data = DataConfig.from_dict({**data.to_dict(), "features": "pooled", "max_tokens": None})
            pooled = open_batches(pooled_data, everything.manifest, log=lambda m: None)
        for subset in subsets:
            sub = DataConfig.from_dict({**data.to_dict(), "modalities": list(subset)})
            result = run_probe(sub, out_dir / "probe" / "+".join(subset), probe, batches=pooled.with_modalities(subset), log=lambda m: None)
            rows.append(_row(subset, PROBE, 0, result.metrics["test"], None, ceilings))
            k += 1
            done(k, f"{'+'.join(subset)} {PROBE}: test mean R2 {result.metrics['test']['mean_r2']:.3f}")
    for subset, aggregator, seed in runs:
        name = f"{'+'.join(subset)}__{aggregator}__seed{seed}"
        result = run_train(
            DataConfig.from_dict({**data.to_dict(), "modalities": list(subset)}),
            aggregator,
            model_options,
            TrainConfig.from_dict({**train_config.to_dict(), "seed": seed}),
            out_dir / "runs" / name,
            batches=everything.with_modalities(subset),
            progress=False,
            log=lambda m: None,
        )
        test = result.metrics["test"]
        rows.append(_row(subset, aggregator, seed, test, result.train.best_epoch, ceilings))
        k += 1
        done(k, f"{name}: test mean R2 {test['mean_r2']:.3f}, Spearman {test['mean_spearman']:.3f} (best epoch {result.train.best_epoch})")
    bar.close()
    pd.DataFrame(rows).to_csv(out_dir / "ablation_runs.csv", index=False)
    markdown, table = ablation_table(rows, ceilings=ceilings)
    note = (f"\nInputs: {data.features} features of {', '.join(f'{m}={p}' for m, p in data.stores.items())}; manifest {data.manifest}. "
            f"The {PROBE} (ridge per target, alpha by gene-grouped CV on the training split) is deterministic: one fit per subset.\n")
    table.to_csv(out_dir / "ablation.csv", index=False)
    (out_dir / "ablation.md").write_text(markdown + note)
    ablation_plot(table, out_dir / "ablation.png", title=f"Modality ablation (test split, {data.features} features)")
    return markdown + note, table


def _row(subset: tuple[str, ...], aggregator: str, seed: int, test: dict, best_epoch: int | None, ceilings: dict | None) -> dict:
    key = "+".join(subset)
    return {
        "modalities": key,
        "aggregator": aggregator,
        "seed": seed,
        "test_mean_r2": test["mean_r2"],
        "test_mean_spearman": test["mean_spearman"],
        "test_all_pairs_r2": test["all_pairs_r2"],
        "best_epoch": best_epoch,
        "ceiling_r2": (ceilings or {}).get(key),
    }


__all__ = ["PROBE", "known_ceilings", "modality_subsets", "planned_runs", "run_ablation"]
