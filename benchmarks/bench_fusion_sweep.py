"""The sweep that chose the fusion defaults: learned models against the ridge probe on the demo's planted data.

For each planted-data seed (the demo's size and tiny encoders, built once and cached by demo_data.py),
each modality subset and each candidate setting, train a fusion model on pooled features (the demo
ablation's inputs) and fit the ridge probe (fusion.probe) on the same features; report test mean R^2
per (setting, subset), averaged over data seeds, beside the probe and the planted ceiling.

    .venv/bin/python benchmarks/bench_fusion_sweep.py --seeds 0,1,2 --json sweep.json
    .venv/bin/python benchmarks/bench_fusion_sweep.py --setting "lr=1e-3 input_norm=False" --setting "lr=3e-4"

A setting is the current defaults of TrainConfig / FusionModelConfig (at the demo's model size) with
the given fields replaced; --setting defaults: the defaults after the first sweep (FIRST_SWEEP) and now.
Training seed = data seed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchlib import machine_info, write_json
from demo_data import demo_data
from fusion.ablation import modality_subsets
from fusion.data import DataConfig, open_batches
from fusion.experiment import build_model, read_manifest
from fusion.metrics import regression_metrics
from fusion.models.fusion_model import fit_feature_stats_
from fusion.probe import run_probe
from fusion.report import markdown_table
from fusion.train import TrainConfig, predict, seed_everything, train

TRAIN_FIELDS = {"lr", "epochs", "early_stopping_patience", "weight_decay", "warmup_fraction", "min_lr_ratio", "batch_size"}
MODEL_FIELDS = {"d_model", "head", "head_hidden", "dropout", "n_layers", "input_norm"}
# The defaults before the first sweep (TrainConfig and FusionModelConfig as they were), after it, and the current ones.
BEFORE = "lr=1e-3 epochs=50 early_stopping_patience=10 weight_decay=0.01 input_norm=True head=mlp dropout=0.1"
FIRST_SWEEP = "weight_decay=0.1 head=mlp dropout=0.1"
NOW = "head=residual"
DEMO_MODEL = {"d_model": 64, "n_heads": 4, "head_hidden": 128}  # fusion.demo's model size


def parse_setting(text: str) -> dict:
    """'lr=3e-4 head=mlp input_norm=False' -> {"lr": 0.0003, "head": "mlp", "input_norm": False}."""
    out = {}
    for item in text.split():
        name, _, value = item.partition("=")
        if name not in TRAIN_FIELDS | MODEL_FIELDS | {"aggregator"}:
            raise SystemExit(f"unknown setting field {name!r}; valid: {sorted(TRAIN_FIELDS | MODEL_FIELDS | {'aggregator'})}")
        if value in ("True", "False"):
            out[name] = value == "True"
        elif name in ("head", "aggregator"):
            out[name] = value
        else:
            out[name] = int(value) if name in {"epochs", "early_stopping_patience", "batch_size", "d_model", "head_hidden", "n_layers"} else float(value)
    return out


def train_and_score(batches, aggregator: str, model_options: dict, train_config: TrainConfig, run_dir: Path) -> tuple[float, int]:
    """What run_train does up to the test metric (same model, statistics and loop), without the report's plots."""
    seed_everything(train_config.seed)
    model = build_model(batches, aggregator, model_options)
    fit_feature_stats_(model, batches("train", shuffle=False, epoch=0))
    result = train(model, batches, train_config, run_dir, target_names=batches.target_names, fingerprints=batches.fingerprints,
                   progress=False, log=lambda m: None)
    test = predict(model, batches("test"), target_names=batches.target_names)
    return regression_metrics(test.pred, test.target, test.mask, test.target_names)["mean_r2"], result.best_epoch


def as_markdown(table: pd.DataFrame) -> str:
    return markdown_table(["setting", *table.columns], [[i, *(f"{v:.3f}" for v in row)] for i, row in zip(table.index, table.to_numpy())])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="planted-data seeds (the training seed is the same)")
    p.add_argument("--setting", action="append", help=f"'FIELD=VALUE ...' replacing defaults; repeat (default: '{FIRST_SWEEP}' and '{NOW}')")
    p.add_argument("--aggregator", default="mean-concat", help="aggregator when the grid does not vary it")
    p.add_argument("--n-genes", type=int, default=400, help="planted genes (the demo's 400)")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "embedcache-demo-data"), help="cache of built demo data")
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's tiny models train fastest on one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    texts = args.setting or [FIRST_SWEEP, NOW]
    settings = [parse_setting(t) for t in texts]
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            data = demo_data(args.data, seed, n_genes=args.n_genes, log=lambda m: None)
            config = DataConfig(manifest=data.prepared, stores=data.stores, features="pooled", seed=seed)
            everything = open_batches(config, read_manifest(config.manifest), log=lambda m: None)
            for subset in modality_subsets(everything.modalities):
                view = everything.with_modalities(subset)
                sub = DataConfig.from_dict({**config.to_dict(), "modalities": list(subset)})
                probe = run_probe(sub, Path(tmp) / "probe", batches=view, log=lambda m: None)
                base = {"seed": seed, "modalities": "+".join(subset), "ceiling": data.subset_ceiling_r2["+".join(subset)]}
                probe_r2 = probe.metrics["test"]["mean_r2"]
                rows.append({**base, "setting": "ridge probe", "test_mean_r2": probe_r2, "best_epoch": None})
                for setting in settings:
                    train = TrainConfig(**{**{k: v for k, v in setting.items() if k in TRAIN_FIELDS}, "seed": seed})
                    model = {**DEMO_MODEL, **{k: v for k, v in setting.items() if k in MODEL_FIELDS}}
                    r2, best_epoch = train_and_score(view, setting.get("aggregator", args.aggregator), model, train, Path(tmp) / "run")
                    name = texts[settings.index(setting)]
                    rows.append({**base, "setting": name, "test_mean_r2": r2, "best_epoch": best_epoch})
                    print(f"seed {seed} {base['modalities']:>16} {name:>40}: {r2:.3f} (probe {probe_r2:.3f}, "
                          f"best epoch {best_epoch}) [{time.time() - started:.0f} s]", flush=True)
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index="setting", columns="modalities", values="test_mean_r2", aggfunc="mean")
    order = ["+".join(s) for s in modality_subsets(("dna", "rna", "protein"))]
    table = table[[c for c in order if c in table.columns]]
    table["mean"] = table.mean(axis=1)
    spread = frame.pivot_table(index="setting", columns="modalities", values="test_mean_r2", aggfunc="std")
    ceiling = frame.groupby("modalities")["ceiling"].mean()
    table.loc["planted ceiling"] = [ceiling.get(c, float("nan")) for c in table.columns[:-1]] + [ceiling.mean()]
    print(f"\ntest mean R^2, mean over data seeds {seeds} ({time.time() - started:.0f} s):")
    print(as_markdown(table))
    print("\nstd over data seeds:")
    print(as_markdown(spread[[c for c in order if c in spread.columns]]))
    if args.json:
        write_json(args.json, {"machine": machine_info(), "seeds": seeds, "settings": texts, "runs": rows,
                               "mean": table.reset_index().to_dict(orient="records")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
