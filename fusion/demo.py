"""The whole path on synthetic data, offline, on a CPU in minutes (`make demo`).

synthetic IsoFormer-schema CSV + genome -> the real IsoFormer adapter -> DNA / RNA / protein
stores built by embedcache with tiny random-initialised models of the real architectures
(Enformer, Nucleotide Transformer, ESM2) -> a cross-attention fusion run -> the modality ablation
-> reports with plots. Every step goes through the same library calls a user's run makes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.reader import describe
from embedcache.tiny_models import make_tiny_enformer, make_tiny_esm2, make_tiny_nucleotide_transformer
from fusion.data import DataConfig
from fusion.ablation import PROBE, run_ablation
from fusion.experiment import run_train
from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic
from fusion.train import TrainConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. The defaults are `make demo` (minutes on 2 CPU cores); `full()` is the 3-seed grid."""

    n_genes: int = 400  # synthetic genes (1-8 isoforms each)
    seed: int = 0  # synthetic data seed
    encoder_hidden: int = 64  # width of the tiny ESM2 / NT models (Enformer: dim 48 -> 96-wide embeddings)
    max_tokens: int = 16  # the headline run's per-token inputs are group-averaged to this many rows (CPU budget)
    ablation_features: str = "pooled"  # the ablation grid's inputs: pooled vectors keep 42 runs within minutes on a CPU
    aggregators: tuple[str, ...] = ("cross-attention", "mean-concat")  # compared in the ablation
    seeds: tuple[int, ...] = (0,)  # training seeds of the ablation; full() has three, for mean +- std
    epochs: int = TrainConfig().epochs  # maximum epochs (early stopping usually ends runs sooner)
    d_model: int = 64  # fusion width
    batch_size: int = 32
    torch_threads: int = 1  # the tiny models' ops are too small to split: on 2 shared cores one thread trained 2x faster than two


    @classmethod
    def full(cls, **changes) -> "DemoConfig":
        """Three training seeds, so each ablation row has a spread to judge differences by, and twice the
        headline run's token rows (its model's cost doubles, for a small gain in test R^2: docs/demo.md)."""
        return cls(**{"seeds": (0, 1, 2), "max_tokens": 32, **changes})


MODALITY_ENCODERS = {"dna": "enformer", "rna": "nucleotide-transformer", "protein": "esm2"}


def make_demo_encoders(models: Path, *, hidden: int, dna_window: int, layers: int = 2, seed: int = 0) -> dict[str, Path]:
    """Tiny random models of the real architectures, saved like checkpoints: modality -> model directory."""
    return {
        "protein": make_tiny_esm2(models / "esm2", hidden=hidden, layers=layers, seed=seed),
        "rna": make_tiny_nucleotide_transformer(models / "nucleotide-transformer", hidden=hidden, layers=layers, seed=seed),
        # the whole DNA window as bins: target_length = window / 128
        "dna": make_tiny_enformer(models / "enformer", dim=48, target_length=dna_window // 128, seed=seed),
    }


def build_modality_stores(
    prepared: Path, model_dirs: dict[str, Path], stores_dir: Path, dna_window: int, *, progress: bool = True, log: Log = print
) -> dict[str, str]:
    """One embedcache store per modality from the prepared FASTAs: modality -> store path.

    Enformer embeds the whole DNA window (`window` = the prepared window, every 128-bp bin kept).
    """
    stores = {}
    for modality, encoder in MODALITY_ENCODERS.items():
        extra = {"window": dna_window} if encoder == "enformer" else {}
        config = BuildConfig.create(encoder, str(model_dirs[modality]), **extra)
        store = stores_dir / f"{modality}.zarr"
        log(f"[embedcache] {modality}: {encoder} -> {store}")
        build(config, [prepared / f"{modality}.fa"], store, progress=progress, log=log)
        stores[modality] = str(store)
    return stores


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), log: Log = print) -> dict:
    """Run every stage; return (and write to summary.json) where everything is and the headline figures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        return _run_demo(Path(out), config, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, config: DemoConfig, log: Log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    log(f"[1/5] synthetic IsoFormer-schema data: {config.n_genes} genes")
    info = generate_synthetic(out / "synthetic", SyntheticConfig(n_genes=config.n_genes, seed=config.seed))
    log(f"      best achievable mean R^2 (the ceiling): {info.ceiling_r2:.3f}")

    log("[2/5] prepare with the IsoFormer adapter (one DNA window per gene, RNA per transcript, protein per coding transcript)")
    prepared = prepare_isoformer(info.csv_path, info.genome_path, out / "prepared", IsoformerPrepareConfig(dna_window=info.dna_window))
    log(f"      {prepared.counts}")

    log("[3/5] embed each modality once with embedcache")
    model_dirs = make_demo_encoders(out / "models", hidden=config.encoder_hidden, dna_window=info.dna_window)
    stores = build_modality_stores(prepared.out_dir, model_dirs, out / "stores", info.dna_window, log=log)
    log(describe(open_store(stores["rna"]).info()))

    data = DataConfig(
        manifest=str(prepared.out_dir), stores=stores, features="tokens", max_tokens=config.max_tokens, batch_size=config.batch_size,
        reduced_dir=str(out / "reduced"),  # the demo keeps everything it makes in its own directory
    )
    model_options = {"d_model": config.d_model, "n_heads": 4, "head_hidden": 2 * config.d_model}
    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size)

    log(f"[4/5] fusion train: cross-attention over DNA + RNA + protein tokens (group-averaged to <= {config.max_tokens} rows)")
    run = run_train(data, "cross-attention", model_options, train_config, out / "run", log=log)

    log(f"[5/5] ablation: every modality subset x {list(config.aggregators)} x seeds {list(config.seeds)}, beside the ridge probe")
    ablation_data = DataConfig.from_dict({**data.to_dict(), "features": config.ablation_features, "max_tokens": None})
    markdown, table = run_ablation(ablation_data, list(config.aggregators), list(config.seeds), model_options, train_config, out / "ablation", log=log)
    learned = table[table["aggregator"] != PROBE]
    best = learned.iloc[0]  # the table is sorted best first
    versus_probe = learned_vs_probe(table)
    monotone = modality_additions(table)

    summary = {
        "config": asdict(config),
        "ceiling_mean_r2": info.ceiling_r2,
        "subset_ceiling_r2": info.subset_ceiling_r2,
        "tokens_run_test_mean_r2": run.metrics["test"]["mean_r2"],
        "tokens_run_test_mean_spearman": run.metrics["test"]["mean_spearman"],
        "best_ablation": {
            "modalities": best["modalities"],
            "aggregator": best["aggregator"],
            "test_mean_r2": float(best["test_mean_r2_mean"]),
            "test_mean_r2_std": float(best["test_mean_r2_std"]) if len(config.seeds) > 1 else None,  # one seed: no spread
        },
        "learned_vs_probe": versus_probe,
        "modality_additions": monotone,
        "report": str(run.run_dir / "report.md"),
        "ablation": str(out / "ablation" / "ablation.md"),
        "stores": stores,
        "seconds": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("\n" + markdown)
    b = summary["best_ablation"]
    log(
        f"\nbest model: {b['modalities']} with {b['aggregator']} ({config.ablation_features} features): test mean R^2 "
        f"{b['test_mean_r2']:.3f}{spread(b['test_mean_r2_std'], len(config.seeds))}; best achievable (ceiling) {info.ceiling_r2:.3f}"
    )
    log(
        f"per-token cross-attention run: test mean R^2 {summary['tokens_run_test_mean_r2']:.3f}, Spearman "
        f"{summary['tokens_run_test_mean_spearman']:.3f} (the planted signals are sequence composition, which pooled "
        f"vectors already summarise)"
    )
    behind = [f"{m} ({a})" for m, v in versus_probe.items() for a, r2 in v["learned"].items() if r2 < v["probe"]]
    log("every learned aggregator vs the ridge probe on the same pooled features (mean over seeds): "
        + ("at or above the probe for every subset" if not behind else f"below the probe for {behind}"))
    lowered = [f"{a}: {r['from']} -> {r['to']} ({r['change']:+.3f}, seed spread {r['spread']:.3f})" for a, rows in monotone.items()
               for r in rows if r["change"] < -r["spread"]]
    judged = "beyond the seeds' spread" if len(config.seeds) > 1 else "(one seed, so any drop counts)"
    log("adding a modality " + (f"never lowered test mean R^2 {judged}" if not lowered else f"lowered it: {lowered}"))
    log(f"report: {summary['report']}\nablation: {summary['ablation']}\ntook {summary['seconds']} s")
    return summary


def spread(std: float | None, n_seeds: int) -> str:
    return f" ± {std:.3f} over {n_seeds} seeds" if n_seeds > 1 else " (one training seed; --full runs three)"


def learned_vs_probe(table: pd.DataFrame) -> dict[str, dict]:
    """Per modality subset: the probe's test mean R^2 and each learned aggregator's mean over seeds."""
    probe = table[table["aggregator"] == PROBE].set_index("modalities")["test_mean_r2_mean"]
    learned = table[table["aggregator"] != PROBE]
    return {m: {"probe": float(probe[m]), "learned": {a: float(r2) for a, r2 in zip(part["aggregator"], part["test_mean_r2_mean"])}}
            for m, part in learned.groupby("modalities", sort=False)}


def modality_additions(table: pd.DataFrame) -> dict[str, list[dict]]:
    """Per learned aggregator, every (subset -> subset plus one modality) with the change of test mean R^2 and the
    seed spread it is judged against (the larger of the two rows' standard deviations over seeds; 0 with one
    seed, which has no spread, so any drop counts).

    An aggregator's own single-modality rows are used; where it has none (ablations from before single-modality
    cross-attention kept its feed-forward layers trained those subsets once, as mean-concat), mean-concat's stand in.
    """
    learned = table[table["aggregator"] != PROBE]
    singles = learned[~learned["modalities"].str.contains("+", regex=False) & (learned["aggregator"] == "mean-concat")].set_index("modalities")
    out = {}
    for aggregator in learned["aggregator"].unique():
        rows = {**singles.to_dict("index"), **learned[learned["aggregator"] == aggregator].set_index("modalities").to_dict("index")}
        changes = []
        for small, a in rows.items():
            for large, b in rows.items():
                if len(large.split("+")) == len(small.split("+")) + 1 and set(small.split("+")) < set(large.split("+")):
                    spread = max(_std(a), _std(b))
                    changes.append({"from": small, "to": large, "change": float(b["test_mean_r2_mean"] - a["test_mean_r2_mean"]), "spread": spread})
        out[aggregator] = changes
    return out


def _std(row: dict) -> float:
    std = float(row["test_mean_r2_std"])
    return 0.0 if math.isnan(std) else std  # one seed: no spread
