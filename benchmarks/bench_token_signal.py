"""A signal only tokens can see: per-token cross-attention against pooled mean-concat and the ridge probe.

The synthetic data gain the opt-in token term (fusion.prepare.synthetic, SyntheticConfig.share_token):
each coding protein holds exactly 18 serines, as 0-3 runs of 6 plus single ones, and the term is the
share of them that touch another. Every residue count is the same whatever the term, so a mean over
a protein's tokens carries none of it; the per-token rows, group-averaged to --max-tokens, do (a row
holding a run has a high serine share, see the module docstring there).

For each data seed (the demo's sizes and tiny random encoders, at the shares below; stores built
once and cached under --data), each modality subset:
    ridge probe        fusion.probe on pooled vectors (deterministic)
    pooled mean-concat the fusion model on pooled vectors (the demo ablation's inputs)
    tokens x-attn      the cross-attention fusion model on per-token rows averaged to --max-tokens
                       (one modality: its feed-forward layers only, nothing to attend to)
    tokens mean-concat (only with --models) mean-concat on those rows: the per-token inputs without the layers
test mean R^2 beside the subset's ceiling with the token term (the protein subsets') and without it
(the best a model blind to it can do), and `token corr`: the mean over tissues of the test correlation of
the predictions with the planted token term (0 for a model that cannot see it; the oracle's is printed).
Training seed = data seed.

    .venv/bin/python benchmarks/bench_token_signal.py --seeds 0,1,2 --json token_signal.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the library is the checkout's
    sys.path.insert(0, str(REPO))

from benchlib import machine_info, write_json  # noqa: E402  (after the path line above)
from cli.common import HelpFormatter  # noqa: E402
from fusion.ablation import modality_subsets  # noqa: E402
from fusion.data import DataConfig, StoreBatches, open_batches  # noqa: E402
from fusion.demo import DemoConfig, build_modality_stores, make_demo_encoders  # noqa: E402
from fusion.experiment import build_model, read_manifest  # noqa: E402
from fusion.metrics import regression_metrics  # noqa: E402
from fusion.models.fusion_model import fit_feature_stats_  # noqa: E402
from fusion.prepare.fasta import read_fasta  # noqa: E402
from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer  # noqa: E402
from fusion.prepare.manifest import load_prepared  # noqa: E402
from fusion.prepare.synthetic import MODALITIES, SyntheticConfig, generate_synthetic, true_signal  # noqa: E402
from fusion.probe import run_probe  # noqa: E402
from fusion.report import markdown_table  # noqa: E402
from fusion.train import TrainConfig, predict, seed_everything, train  # noqa: E402

# The demo's shares with 0.20 moved to the token term: every modality keeps a readable pooled term.
SHARES = dict(share_dna=0.20, share_rna=0.20, share_protein=0.15, share_token=0.20, share_noise=0.25)
DEMO_MODEL = {"d_model": DemoConfig.d_model, "n_heads": 4, "head_hidden": 2 * DemoConfig.d_model}  # fusion.demo's model size
PROBE, POOLED, TOKENS, TOKENS_MEAN = "ridge probe", "pooled mean-concat", "tokens x-attn", "tokens mean-concat"


@dataclass(frozen=True)
class TokenData:
    """One seed's planted data with the token term, prepared and embedded."""

    prepared: str  # prepared directory
    stores: dict[str, str]  # modality -> store path
    meta: dict  # synthetic.json


def token_data(root: Path, seed: int, n_genes: int, log=print) -> TokenData:
    """The demo's data at SHARES for `seed`, built once under root/ (done.json is written last, so a half-built one is rebuilt)."""
    out = root / f"token-seed{seed}-genes{n_genes}"
    done = out / "done.json"
    if done.exists():
        return TokenData(**json.loads(done.read_text()))
    shutil.rmtree(out, ignore_errors=True)
    info = generate_synthetic(out / "synthetic", SyntheticConfig(n_genes=n_genes, seed=seed, **SHARES))
    prepared = prepare_isoformer(info.csv_path, info.genome_path, out / "prepared", IsoformerPrepareConfig(dna_window=info.dna_window))
    models = make_demo_encoders(out / "models", hidden=DemoConfig.encoder_hidden, dna_window=info.dna_window)
    stores = build_modality_stores(prepared.out_dir, models, out / "stores", info.dna_window, progress=False, log=log)
    data = TokenData(str(prepared.out_dir), stores, json.loads(info.json_path.read_text()))
    done.write_text(json.dumps(data.__dict__))
    return data


def token_term(data: TokenData) -> dict[str, np.ndarray]:
    """sample id -> (30,) planted token term, recomputed from the prepared protein FASTA (0 for non-coding)."""
    prepared = Path(data.prepared)
    frame = load_prepared(prepared).frame
    fastas = [read_fasta(prepared / f"{m}.fa") for m in MODALITIES]
    terms = true_signal(data.meta, *fastas, frame["gene_id"].tolist(), frame["sample_id"].tolist())
    return dict(zip(frame["sample_id"], terms["token"]))


def token_corr(pred: np.ndarray, term: np.ndarray) -> float:
    """Mean over targets of the correlation of predictions (n, t) with the token term (n, t)."""
    return float(np.mean([np.corrcoef(pred[:, j], term[:, j])[0, 1] for j in range(term.shape[1])]))


def train_and_score(batches: StoreBatches, aggregator: str, train_config: TrainConfig, run_dir: Path, term: dict) -> dict:
    """What run_train does up to the test metrics (same model, statistics and loop), without the report's plots."""
    seed_everything(train_config.seed)
    model = build_model(batches, aggregator, DEMO_MODEL)
    fit_feature_stats_(model, batches("train", shuffle=False, epoch=0))
    result = train(model, batches, train_config, run_dir, target_names=batches.target_names, fingerprints=batches.fingerprints,
                   progress=False, log=lambda m: None)  # fmt: skip
    test = predict(model, batches("test"), target_names=batches.target_names)
    r2 = regression_metrics(test.pred, test.target, test.mask, test.target_names)["mean_r2"]
    return {"test_mean_r2": r2, "token_corr": token_corr(test.pred, np.stack([term[s] for s in test.sample_ids])),
            "best_epoch": result.best_epoch}  # fmt: skip


def run_seed(data: TokenData, seed: int, args: argparse.Namespace, tmp: Path, started: float) -> list[dict]:
    term = token_term(data)
    pooled_config = DataConfig(manifest=data.prepared, stores=data.stores, features="pooled", seed=seed)
    token_config = DataConfig(manifest=data.prepared, stores=data.stores, features="tokens", max_tokens=args.max_tokens,
                              seed=seed, reduced_dir=str(tmp / "reduced"))  # fmt: skip
    manifest = read_manifest(data.prepared)
    pooled = open_batches(pooled_config, manifest, log=lambda m: None)
    tokens = open_batches(token_config, manifest, log=lambda m: None)
    train_config = TrainConfig(epochs=args.epochs, seed=seed)
    rows = []
    for subset in modality_subsets(pooled.modalities):
        name = "+".join(subset)
        base = {"seed": seed, "modalities": name, "ceiling": data.meta["subset_ceiling_r2"][name],
                "ceiling_without_token": data.meta["subset_ceiling_r2_without_token"][name]}  # fmt: skip
        sub = DataConfig.from_dict({**pooled_config.to_dict(), "modalities": list(subset)})
        probe = run_probe(sub, tmp / "probe", batches=pooled.with_modalities(subset), log=lambda m: None)
        rows.append({**base, "model": PROBE, "test_mean_r2": probe.metrics["test"]["mean_r2"], "token_corr": None, "best_epoch": None})
        runs = [(POOLED, pooled, "mean-concat"), (TOKENS, tokens, "cross-attention"), (TOKENS_MEAN, tokens, "mean-concat")]
        for label, batches, aggregator in runs:
            if label not in args.models:
                continue
            rows.append({**base, "model": label, **train_and_score(batches.with_modalities(subset), aggregator, train_config, tmp / "run", term)})
        done = {r["model"]: f"{r['test_mean_r2']:.3f}" for r in rows if r["modalities"] == name}
        print(f"seed {seed} {name:>16}: {done} (ceiling {base['ceiling']:.3f}, without token {base['ceiling_without_token']:.3f}) "
              f"[{time.time() - started:.0f} s]", flush=True)  # fmt: skip
    return rows


def oracle_token_corr(data: TokenData) -> float:
    """token_corr of the oracle (offset + every planted term) on the test split: what a perfect model scores."""
    prepared = Path(data.prepared)
    frame = load_prepared(prepared).frame
    fastas = [read_fasta(prepared / f"{m}.fa") for m in MODALITIES]
    terms = true_signal(data.meta, *fastas, frame["gene_id"].tolist(), frame["sample_id"].tolist())
    test = (frame["split"] == "test").to_numpy()
    return token_corr(sum(terms.values())[test], terms["token"][test])


def summarise(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """model x modality subset: 'mean ± std' over seeds of `value` (the std left out with one seed)."""
    order = [c for c in ("+".join(s) for s in modality_subsets(MODALITIES)) if c in set(frame["modalities"])]
    stats = frame.groupby(["model", "modalities"], sort=False)[value].agg(["mean", "std"])
    cells = {
        model: {c: f"{stats.loc[(model, c), 'mean']:.3f}" + (f" ± {stats.loc[(model, c), 'std']:.3f}" if frame["seed"].nunique() > 1 else "")
                for c in order}
        for model in frame["model"].unique()
    }  # fmt: skip
    return pd.DataFrame.from_dict(cells, orient="index")[order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="planted-data seeds (the training seed is the same)")
    p.add_argument("--n-genes", type=int, default=400, help="planted genes (the demo's 400)")
    p.add_argument("--max-tokens", type=int, default=16, help="per-token rows are group-averaged to this many (the demo's 16)")
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="maximum epochs (early stopping ends most runs sooner)")
    p.add_argument("--models", default=f"{POOLED},{TOKENS}", help=f"learned models to train, comma-separated, of {[POOLED, TOKENS, TOKENS_MEAN]} (the probe always runs)")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "embedcache-token-data"), help="cache of built data")
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's tiny models train fastest on one)")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    unknown = sorted(set(args.models) - {POOLED, TOKENS, TOKENS_MEAN})
    if unknown:
        p.error(f"unknown --models {unknown}; valid: {[POOLED, TOKENS, TOKENS_MEAN]}")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, oracle, ceilings, started = [], {}, {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            data = token_data(Path(args.data), seed, args.n_genes, log=lambda m: None)
            print(f"seed {seed}: data ready [{time.time() - started:.0f} s]", flush=True)
            oracle[seed] = oracle_token_corr(data)
            ceilings[seed] = {"token_ceiling_r2": data.meta["token_ceiling_r2"], "test_oracle_r2": data.meta["empirical_r2_of_true_signal_by_split"]["test"]}
            rows += run_seed(data, seed, args, Path(tmp), started)
    seconds = time.time() - started
    write_json(args.json, {"machine": machine_info(), "seeds": seeds, "max_tokens": args.max_tokens, "epochs": args.epochs,
                           "shares": SHARES, "seconds": seconds, "ceilings": ceilings, "oracle_token_corr": oracle, "runs": rows})  # fmt: skip
    frame = pd.DataFrame(rows)
    r2 = summarise(frame, "test_mean_r2")
    ceiling = frame.groupby("modalities")[["ceiling", "ceiling_without_token"]].mean()
    r2.loc["ceiling (with token)"] = [f"{ceiling.loc[c, 'ceiling']:.3f}" for c in r2.columns]
    r2.loc["ceiling without token"] = [f"{ceiling.loc[c, 'ceiling_without_token']:.3f}" for c in r2.columns]
    print(f"\ntest mean R^2, mean ± std over data seeds {seeds} (max_tokens {args.max_tokens}; {seconds:.0f} s):")
    print(markdown_table(["model", *r2.columns], [[i, *row] for i, row in zip(r2.index, r2.to_numpy())]))
    corr = summarise(frame[frame["model"] != PROBE], "token_corr")
    print(f"\ntoken corr (mean over tissues of corr(test prediction, token term)); oracle "
          f"{np.mean(list(oracle.values())):.3f} (per seed {', '.join(f'{v:.3f}' for v in oracle.values())}):")  # fmt: skip
    print(markdown_table(["model", *corr.columns], [[i, *row] for i, row in zip(corr.index, corr.to_numpy())]))
    learned = frame[frame["model"] != PROBE].merge(frame[frame["model"] == PROBE][["seed", "modalities", "test_mean_r2"]],
                                                   on=["seed", "modalities"], suffixes=("", "_probe"))  # fmt: skip
    learned["vs_probe"] = learned["test_mean_r2"] - learned["test_mean_r2_probe"]
    gap = learned.groupby(["model", "modalities"], sort=False)["vs_probe"].agg(["mean", "min"]).reset_index()
    order = ["+".join(s) for s in modality_subsets(MODALITIES)]
    gap = gap.sort_values(["model", "modalities"], key=lambda c: c.map(order.index) if c.name == "modalities" else c)
    print("\nlearned minus probe, test mean R^2 (mean over seeds, worst seed):")
    print(markdown_table(["model", "modalities", "mean", "worst seed"],
                         [[m, s, f"{a:+.3f}", f"{b:+.3f}"] for m, s, a, b in gap.to_numpy()]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
