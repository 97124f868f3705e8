"""Plots and a markdown report of one run, and the ablation table over runs.

matplotlib with the Agg backend (no display needed); numpy/pandas only, no torch.

write_report(run_dir, ...) writes into run_dir:
    pred_vs_observed.png   observed vs predicted over all valid (sample, target) pairs, diagonal, R^2 in the title
    per_target_r2.png      horizontal bars of R^2 per target (tissue), sorted, mean line
    learning_curves.png    train/val loss per epoch, val mean R^2 on a second axis, best epoch marked
    report.md              headline metrics per split, per-target table, configuration, links to the plots
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fusion.metrics import Predictions  # noqa: E402

HEXBIN_ABOVE = 5000  # pairs above which the pred-vs-observed plot is a hexbin density instead of a scatter
CANONICAL_MODALITY_ORDER = ("dna", "rna", "protein")  # how modality sets are written in ablation tables


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.{digits}f}"


def _none_to_nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; cells are str() of the values (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _splits_of(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Accept metrics.json content ({"splits": {...}}), {split: regression_metrics}, or one regression_metrics dict."""
    if "splits" in metrics:
        return metrics["splits"]
    if "per_target" in metrics:
        return {"eval": metrics}
    return metrics


def _history_frame(history: list[dict[str, Any]] | str | Path | pd.DataFrame | None) -> pd.DataFrame | None:
    if history is None:
        return None
    if isinstance(history, pd.DataFrame):
        return history
    if isinstance(history, (str, Path)):
        return pd.read_csv(history)
    return pd.DataFrame(history)


# ---------------------------------------------------------------- plots of one run


def plot_pred_vs_observed(path: str | Path, predictions: Predictions, title: str = "") -> Path:
    """Observed (x) vs predicted (y) over all valid pairs; hexbin above HEXBIN_ABOVE pairs."""
    y = predictions.target[predictions.mask].astype(np.float64)
    p = predictions.pred[predictions.mask].astype(np.float64)
    fig, ax = plt.subplots(figsize=(6, 6))
    if y.size == 0:
        ax.text(0.5, 0.5, "no valid targets", ha="center", va="center", transform=ax.transAxes)
    else:
        if y.size > HEXBIN_ABOVE:
            hb = ax.hexbin(y, p, gridsize=80, bins="log", mincnt=1, cmap="viridis")
            fig.colorbar(hb, ax=ax, label="pairs (log scale)")
        else:
            ax.scatter(y, p, s=6, alpha=0.5, linewidths=0)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="y = x")
        ax.legend(loc="upper left")
    ax.set_xlabel("observed")
    ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_per_target_r2(path: str | Path, split_metrics: dict[str, Any], title: str = "") -> Path:
    """Horizontal bars of per-target R^2, sorted, with the mean over targets as a vertical line.
    Height grows with the number of targets so 30 tissue names stay readable."""
    items = [(name, _none_to_nan(v["r2"])) for name, v in split_metrics["per_target"].items()]
    items.sort(key=lambda kv: (-math.inf if math.isnan(kv[1]) else kv[1]))
    names = [k + (" (n/a)" if math.isnan(v) else "") for k, v in items]
    values = [0.0 if math.isnan(v) else v for _, v in items]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(items)))
    ax.barh(np.arange(len(items)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(np.arange(len(items)), labels=names, fontsize=8)
    ax.set_ylim(-0.6, len(items) - 0.4)
    mean = _none_to_nan(split_metrics.get("mean_r2"))
    if not math.isnan(mean):
        ax.axvline(mean, color="black", ls="--", lw=1, label=f"mean R² = {mean:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("R² (coefficient of determination)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_learning_curves(path: str | Path, history: pd.DataFrame, title: str = "") -> Path:
    """Train and validation loss per epoch (left axis), validation mean R^2 (right axis).

    The y-axes cover the epochs after the first: epoch 0's loss (the untrained model) is often several
    times the rest and would flatten the part that decides the run; a clipped point is drawn at the
    top edge. Epoch ticks are integers and the legend sits below the axes, off the data.
    """
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot(history["epoch"], history["train_loss"], marker="o", ms=3, label="train loss")
    ax.plot(history["epoch"], history["val_loss"], marker="o", ms=3, label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked MSE (standardised targets)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    later = history[history["epoch"] > history["epoch"].min()] if len(history) > 2 else history
    losses = pd.concat([later["train_loss"], later["val_loss"]]).astype(float)
    losses = losses[np.isfinite(losses)]
    if len(losses):
        lo, hi = float(losses.min()), float(losses.max())
        pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
    handles, labels = ax.get_legend_handles_labels()
    if "val_mean_r2" in history:
        ax2 = ax.twinx()
        (h,) = ax2.plot(history["epoch"], history["val_mean_r2"], color="tab:green", ls=":", marker="s", ms=3, label="validation mean R²")
        r2 = later["val_mean_r2"].astype(float)
        r2 = r2[np.isfinite(r2)]
        if len(r2):
            lo, hi = float(r2.min()), float(r2.max())
            pad = 0.05 * (hi - lo) if hi > lo else 0.02
            ax2.set_ylim(lo - pad, hi + pad)
        ax2.set_ylabel("validation mean R²")
        handles.append(h)
        labels.append(h.get_label())
    if len(history):
        best = history.loc[history["val_loss"].idxmin()]
        ax.axvline(best["epoch"], color="grey", lw=0.8, ls="--")
        title = title or f"best epoch {int(best['epoch'])}: val loss {best['val_loss']:.4f}"
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------- report of one run


def run_description(run_dir: Path) -> dict | None:
    """The run's own description: run.json (fusion train / finetune) or probe.json (fusion probe), else None."""
    for name in ("run.json", "probe.json"):
        if (run_dir / name).is_file():
            return json.loads((run_dir / name).read_text())
    return None


def _inputs_section(meta: dict) -> list[str]:
    """What the model saw: features (per-token or pooled, max_tokens), manifest, stores, loading, fingerprints."""
    data = meta.get("data", {})
    stores = data.get("stores", {})
    used = meta.get("modalities") or data.get("modalities") or list(stores)
    features = data.get("features", "?")
    if features == "tokens":
        seen = "per-token rows with masks" + (f", longer inputs group-averaged to at most {data['max_tokens']} rows"
                                              if data.get("max_tokens") else ", every row (no max_tokens)")
    else:
        seen = "one pooled vector per modality"
    loading = meta.get("loading") or {}
    rows = [[m, f"`{stores.get(m, '?')}`", loading.get(m, features), f"`{(meta.get('fingerprints') or {}).get(m, '')}`"] for m in used]
    return [
        "## Inputs: what the model saw", "",
        f"- mode: {meta.get('mode', 'ridge probe' if meta.get('format') == 'fusion-probe' else '?')}",
        f"- features: {features} ({seen})",
        f"- manifest: `{data.get('manifest', '?')}`",
        f"- batch size: {data.get('batch_size', '?')}, shuffling seed: {data.get('seed', '?')}", "",
        markdown_table(["modality", "store", "loading", "fingerprint"], rows), "",
    ]


def _configuration_section(meta: dict) -> list[str]:
    """The run's configs as run.json (or probe.json) holds them: training values with their meaning, resolved values, model."""
    lines = []
    if meta.get("train"):
        from fusion.train import TrainConfig  # the fields' one-line comments live in the code (imported only for a trained run)

        comments = TrainConfig.comments()
        lines += ["## Training configuration", "", markdown_table(["field", "value", "meaning"],
                  [[k, f"`{v}`", comments.get(k, "")] for k, v in meta["train"].items()]), ""]
    if meta.get("resolved"):
        lines += ["Resolved here: " + ", ".join(f"{k} `{v}`" for k, v in meta["resolved"].items()), ""]
    if meta.get("finetune"):
        lines += ["Finetune configuration:", "", "```json", json.dumps(meta["finetune"], indent=2), "```", ""]
    if meta.get("model"):
        lines += ["Model configuration:", "", "```json", json.dumps(meta["model"], indent=2), "```", ""]
    if meta.get("probe"):
        lines += ["## Probe configuration", "", "```json", json.dumps(meta["probe"], indent=2), "```", "",
                  f"{meta.get('n_features', '?')} features; alpha chosen per target: "
                  + ", ".join(f"{a:g} ×{n}" for a, n in sorted(Counter(meta.get("alpha_per_target", {}).values()).items())), ""]
    return lines


HEADLINE = (
    ("mean_r2", "mean R²"),
    ("mean_spearman", "mean Spearman"),
    ("mean_pearson", "mean Pearson"),
    ("all_pairs_r2", "all-pairs R²"),
    ("all_pairs_spearman", "all-pairs Spearman"),
    ("all_pairs_pearson", "all-pairs Pearson"),
)


def write_report(
    run_dir: str | Path,
    metrics: dict[str, Any],
    predictions: Predictions,
    history: list[dict[str, Any]] | str | Path | pd.DataFrame | None,
    *,
    split: str | None = None,
    run: dict | None = None,
) -> list[Path]:
    """Write the three plots and report.md into run_dir; return their paths.

    metrics: metrics.json content, {split: regression_metrics}, or one regression_metrics dict.
    predictions: the predictions of `split` (default: "test" if present, else the last split).
    history: rows of history.csv, its path, a DataFrame, or None (no learning curves).
    run: what the run saw and how it was configured (run.json or probe.json content); default: read
      from run_dir (an evaluation elsewhere passes its run's, with the data it evaluated).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = _splits_of(metrics)
    if split is None:
        split = "test" if "test" in splits else list(splits)[-1]
    if split not in splits:
        raise KeyError(f"split {split!r} not in metrics; splits there: {list(splits)}")
    m = splits[split]
    hist = _history_frame(history)
    paths = []

    r2 = _none_to_nan(m.get("all_pairs_r2"))
    paths.append(plot_pred_vs_observed(
        run_dir / "pred_vs_observed.png", predictions,
        title=f"{split}: all-pairs R² = {_fmt(r2)}, mean per-target R² = {_fmt(m.get('mean_r2'))}\n"
              f"{int(predictions.mask.sum()):,} pairs, {len(predictions):,} samples",
    ))
    paths.append(plot_per_target_r2(run_dir / "per_target_r2.png", m, title=f"{split}: R² per target"))
    if hist is not None and len(hist):
        paths.append(plot_learning_curves(run_dir / "learning_curves.png", hist))

    lines = [f"# Run report: {run_dir.name}", "", f"Run directory: `{run_dir}`", ""]
    lines += ["## Headline metrics", ""]
    header = ["split", "samples"] + [label for _, label in HEADLINE] + ["targets used (R²)"]
    rows = []
    for s, sm in splits.items():
        used = sm.get("n_targets_used", {})
        used_r2 = used.get("r2") if isinstance(used, dict) else used
        rows.append([s, _fmt(sm.get("n_samples"))] + [_fmt(sm.get(k)) for k, _ in HEADLINE] + [f"{used_r2}/{sm.get('n_targets')}"])
    lines += [markdown_table(header, rows), ""]
    lines += ["Definitions: R² = 1 − SS_res/SS_tot per target around that target's mean of the evaluated samples "
              "(can be negative); Spearman = Pearson of average ranks; 'mean' = mean over targets (undefined targets "
              "excluded); 'all-pairs' = over all valid (sample, target) pairs pooled.", ""]
    if hist is not None and len(hist):
        best = hist.loc[hist["val_loss"].idxmin()]
        lines += [f"Best epoch {int(best['epoch'])} of {len(hist)} run: validation loss {best['val_loss']:.4f}.", ""]

    lines += [f"## Per target ({split})", ""]
    per = sorted(m["per_target"].items(), key=lambda kv: math.inf if math.isnan(_none_to_nan(kv[1]["r2"])) else -kv[1]["r2"])  # best first, n/a last
    lines += [markdown_table(["target", "R²", "Spearman", "Pearson", "n"],
                             [[name, _fmt(v["r2"]), _fmt(v["spearman"]), _fmt(v["pearson"]), v["n"]] for name, v in per]), ""]
    if m.get("excluded_targets"):
        lines += [f"Excluded from means (fewer than 2 values or zero variance): {', '.join(m['excluded_targets'])}", ""]

    run = run if run is not None else run_description(run_dir)
    lines += _inputs_section(run) if run else []
    lines += ["## Plots", ""]
    for p in paths:
        lines += [f"![{p.stem}]({p.name})", ""]
    lines += _configuration_section(run) if run else []

    report_path = run_dir / "report.md"
    report_path.write_text("\n".join(lines))
    paths.append(report_path)
    return paths


# ---------------------------------------------------------------- ablations over runs

ABLATION_METRICS = ("test_mean_r2", "test_mean_spearman")


def _modality_key(modalities: str | Sequence[str]) -> str:
    """'dna+rna' from ['rna', 'dna'] or 'rna+dna': canonical order dna, rna, protein, then others sorted."""
    parts = modalities.split("+") if isinstance(modalities, str) else list(modalities)
    parts = [p.strip() for p in parts if p.strip()]
    order = {m: i for i, m in enumerate(CANONICAL_MODALITY_ORDER)}
    return "+".join(sorted(parts, key=lambda m: (order.get(m, len(order)), m)))


def ablation_table(
    rows: list[dict[str, Any]], metrics: Sequence[str] = ABLATION_METRICS, *, ceilings: dict[str, float] | None = None
) -> tuple[str, pd.DataFrame]:
    """Mean ± std over seeds of each metric, per (modalities, aggregator), sorted by the first metric (best first).

    rows: one dict per run with "modalities" (list or 'dna+rna'), "aggregator", "seed" and
    the metric values (None/NaN ignored). std is the sample standard deviation (ddof=1) over
    seeds; with one seed it is undefined (n/a). ceilings: best achievable R^2 per modality set
    ("dna+rna"), shown as a column when given. Returns (markdown, DataFrame with columns
    modalities, aggregator, n_seeds, <metric>_mean, <metric>_std for each metric[, ceiling_r2]).
    """
    if not rows:
        raise ValueError("ablation_table got no rows")
    for i, r in enumerate(rows):
        missing = [k for k in ("modalities", "aggregator", "seed", *metrics) if k not in r]
        if missing:
            raise KeyError(f"ablation row {i} ({ {k: r.get(k) for k in ('modalities', 'aggregator', 'seed')} }) lacks {missing}")
    df = pd.DataFrame(
        [{"modalities": _modality_key(r["modalities"]), "aggregator": str(r["aggregator"]), "seed": r["seed"],
          **{m: _none_to_nan(r[m]) for m in metrics}} for r in rows]
    )
    dupes = df[df.duplicated(["modalities", "aggregator", "seed"], keep=False)]
    if len(dupes):
        raise ValueError(f"several runs share (modalities, aggregator, seed): {dupes[['modalities', 'aggregator', 'seed']].drop_duplicates().values.tolist()}")
    grouped = df.groupby(["modalities", "aggregator"], sort=False)
    out = grouped.size().rename("n_seeds").to_frame()
    for m in metrics:
        out[f"{m}_mean"] = grouped[m].mean()
        out[f"{m}_std"] = grouped[m].std(ddof=1)
    out = out.reset_index().sort_values(f"{metrics[0]}_mean", ascending=False, na_position="last").reset_index(drop=True)
    if ceilings:
        known = {_modality_key(k): float(v) for k, v in ceilings.items()}
        out["ceiling_r2"] = [known.get(m, math.nan) for m in out["modalities"]]

    def pm(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "n/a"
        return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f} ± n/a"

    header = ["modalities", "aggregator", "seeds"] + [m.replace("_", " ") for m in metrics] + (["ceiling R²"] if ceilings else [])
    body = [[r.modalities, r.aggregator, int(r.n_seeds)] + [pm(getattr(r, f"{m}_mean"), getattr(r, f"{m}_std")) for m in metrics]
            + ([_fmt(r.ceiling_r2)] if ceilings else []) for r in out.itertuples()]
    md = markdown_table(header, body) + "\n\nmean ± sample standard deviation (ddof=1) over seeds"
    md += ("; ceiling R² = best achievable mean R² from the planted signal of those modalities (noise and the other terms unexplainable).\n"
           if ceilings else ".\n")
    return md, out


def ablation_plot(rows_or_table: list[dict[str, Any]] | pd.DataFrame, path: str | Path, *, metric: str = "test_mean_r2",
                  title: str = "") -> Path:
    """Bars grouped by modality set (in canonical subset order), one colour per aggregator (the probe too),
    height = mean of `metric` over seeds, error bar = std; a black line over a group marks its ceiling
    (table column ceiling_r2) where one is known."""
    table = rows_or_table if isinstance(rows_or_table, pd.DataFrame) else ablation_table(rows_or_table, metrics=(metric,))[1]
    if f"{metric}_mean" not in table:
        raise KeyError(f"metric {metric!r} not in the ablation table; columns: {list(table.columns)}")
    order = {m: i for i, m in enumerate(CANONICAL_MODALITY_ORDER)}
    groups = sorted(table["modalities"].unique(), key=lambda k: (len(k.split("+")), [order.get(p, len(order)) for p in k.split("+")]))
    aggregators = sorted(dict.fromkeys(table["aggregator"]), key=lambda a: a == "ridge probe")  # the probe last, learned models first
    colours = dict(zip(aggregators, plt.get_cmap("tab10").colors))
    width = 0.8 / len(aggregators)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(aggregators) / 2) + 1.5), 4.8))
    for j, agg in enumerate(aggregators):
        part = table[table["aggregator"] == agg].set_index("modalities")
        xs = [i for i, g in enumerate(groups) if g in part.index]
        means = [float(part.loc[groups[i], f"{metric}_mean"]) for i in xs]
        stds = [float(np.nan_to_num(part.loc[groups[i], f"{metric}_std"])) for i in xs]
        offset = (j - (len(aggregators) - 1) / 2) * width
        ax.bar(np.array(xs) + offset, means, width=width * 0.95, yerr=stds, capsize=3, color=colours[agg], label=agg)
    if "ceiling_r2" in table and metric.endswith("r2"):
        ceiling = table.groupby("modalities")["ceiling_r2"].first()
        for i, g in enumerate(groups):
            c = ceiling.get(g, math.nan)
            if not math.isnan(c):
                ax.hlines(c, i - 0.45, i + 0.45, color="black", lw=1.5, label="ceiling (planted signal)" if i == 0 else None)
    ax.set_xticks(np.arange(len(groups)), labels=groups, rotation=30, ha="right", fontsize=9)
    ax.set_ylabel(metric.replace("_", " ") + " (mean ± std over seeds)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
