"""The IsoFormer paper's results table, and this project's runs laid out beside it.

The paper (Garau-Luis, Bordes et al., NeurIPS 2024, arXiv 2406.14150) reports test R^2 and Spearman
(mean +- std over seeds) of its cross-attention model per modality subset, with the Nucleotide
Transformer as DNA encoder, plus one row with Enformer as DNA encoder. `PAPER_ROWS` holds those
figures as transcribed from reviews of the paper; no training code was released to check them against.

`paper_table` reads what examples/isoformer/recipe.py produced:
    - `fusion ablate`'s ablation_runs.csv (one row per run; NT as DNA encoder): every subset with the
      recipe's aggregator (single-modality subsets included) and the "ridge probe" rows;
    - the run directories of `fusion train` with Enformer as DNA encoder (one per seed), and
      optionally that subset's `fusion probe` directory;
and returns one row per paper row (plus subsets the paper does not report), in the paper's order:
this project's mean +- std over seeds next to the paper's figure, and the ridge probe on the same
stores' pooled vectors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PROBE = "ridge probe"  # the aggregator name `fusion ablate` gives its probe rows (fusion.ablation.PROBE)


@dataclass(frozen=True, slots=True)
class PaperRow:
    """One row of the paper's table: inputs, DNA encoder, and its test R^2 / Spearman (mean, std over seeds)."""

    label: str  # as the paper writes the inputs
    modalities: str  # the project's subset key, e.g. "dna+rna"
    dna_encoder: str  # "NT" or "Enformer" ("-" where there is no DNA)
    r2: tuple[float, float] | None  # (mean, std); None where the paper reports no such row
    spearman: tuple[float, float] | None


# In the paper's order. NT is the DNA encoder unless said.
PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow("DNA only", "dna", "NT", (0.13, 0.02), (0.43, 0.01)),
    PaperRow("RNA only", "rna", "-", (0.36, 0.03), (0.61, 0.01)),
    PaperRow("protein only", "protein", "-", (0.20, 0.01), (0.46, 0.01)),
    PaperRow("DNA + protein", "dna+protein", "NT", (0.28, 0.01), (0.52, 0.01)),
    PaperRow("DNA + RNA", "dna+rna", "NT", (0.39, 0.01), (0.64, 0.01)),
    PaperRow("DNA + RNA + protein", "dna+rna+protein", "NT", (0.43, 0.01), (0.65, 0.01)),
    PaperRow("DNA + RNA + protein", "dna+rna+protein", "Enformer", (0.53, 0.01), (0.72, 0.00)),
    # Not in the paper's table; `fusion ablate` trains it anyway (every subset), so it is shown.
    PaperRow("RNA + protein", "rna+protein", "-", None, None),
)
SOURCE = "Garau-Luis, Bordes et al., NeurIPS 2024 (arXiv 2406.14150); figures as transcribed from reviews of the paper"

COLUMNS = (
    "inputs", "modalities", "dna_encoder", "aggregator", "n_seeds",
    "r2_mean", "r2_std", "paper_r2_mean", "paper_r2_std",
    "spearman_mean", "spearman_std", "paper_spearman_mean", "paper_spearman_std",
    "probe_r2", "probe_spearman",
)  # fmt: skip


class PaperTableError(ValueError):
    """A recipe output is missing or does not hold what the table needs (names the file)."""


def read_run_metrics(run_dir: str | Path, split: str = "test") -> dict:
    """`split`'s metrics of a finished `fusion train` / `fusion probe` directory, with its seed (None for a probe)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise PaperTableError(f"{path}: no such file; did the run finish?")
    metrics = json.loads(path.read_text())
    splits = metrics.get("splits", metrics)
    if split not in splits:
        raise PaperTableError(f"{path}: no {split!r} split; it has {sorted(splits)}")
    seed = None
    run_json = run_dir / "run.json"
    if run_json.is_file():
        run = json.loads(run_json.read_text())
        if run.get("status") != "complete":
            raise PaperTableError(f"{run_json}: status {run.get('status')!r}, not 'complete': the run did not finish")
        seed = run.get("train", {}).get("seed")
    return {"seed": seed, "mean_r2": splits[split]["mean_r2"], "mean_spearman": splits[split]["mean_spearman"]}


def paper_table(
    ablation_runs: str | Path | pd.DataFrame,
    enformer_runs: Sequence[str | Path] = (),
    *,
    aggregator: str = "cross-attention",
    enformer_probe: str | Path | None = None,
) -> tuple[str, pd.DataFrame]:
    """(Markdown, DataFrame with `COLUMNS`) of this project's runs beside the paper's figures.

    ablation_runs: `fusion ablate`'s ablation_runs.csv (or its frame), trained with `aggregator` and NT
    as DNA encoder. enformer_runs: `fusion train` run directories (one per seed) of all three
    modalities with Enformer as DNA encoder; none leaves that row empty. std is over seeds (ddof 1).
    """
    runs = ablation_runs if isinstance(ablation_runs, pd.DataFrame) else _read_csv(Path(ablation_runs))
    where = "ablation runs" if isinstance(ablation_runs, pd.DataFrame) else str(ablation_runs)
    missing = {"modalities", "aggregator", "seed", "test_mean_r2", "test_mean_spearman"} - set(runs.columns)
    if missing:
        raise PaperTableError(f"{where}: lacks column(s) {sorted(missing)}; is it fusion ablate's ablation_runs.csv?")
    enformer = pd.DataFrame([read_run_metrics(d) for d in enformer_runs], columns=["seed", "mean_r2", "mean_spearman"])
    enformer_probe_metrics = read_run_metrics(enformer_probe) if enformer_probe is not None else None

    rows = []
    for paper in PAPER_ROWS:
        if paper.dna_encoder == "Enformer":
            r2, spearman = enformer["mean_r2"], enformer["mean_spearman"]
            used = aggregator
            probe = enformer_probe_metrics
        else:
            used = aggregator
            mine = runs[(runs["modalities"] == paper.modalities) & (runs["aggregator"] == used)]
            r2, spearman = mine["test_mean_r2"], mine["test_mean_spearman"]
            probe_rows = runs[(runs["modalities"] == paper.modalities) & (runs["aggregator"] == PROBE)]
            probe = None if probe_rows.empty else {"mean_r2": probe_rows["test_mean_r2"].iloc[0],
                                                   "mean_spearman": probe_rows["test_mean_spearman"].iloc[0]}  # fmt: skip
        if paper.r2 is None and r2.empty:
            continue  # neither the paper nor this run has the row
        rows.append({
            "inputs": paper.label, "modalities": paper.modalities, "dna_encoder": paper.dna_encoder,
            "aggregator": used, "n_seeds": int(r2.count()),
            "r2_mean": _mean(r2), "r2_std": _std(r2),
            "paper_r2_mean": paper.r2[0] if paper.r2 else math.nan, "paper_r2_std": paper.r2[1] if paper.r2 else math.nan,
            "spearman_mean": _mean(spearman), "spearman_std": _std(spearman),
            "paper_spearman_mean": paper.spearman[0] if paper.spearman else math.nan,
            "paper_spearman_std": paper.spearman[1] if paper.spearman else math.nan,
            "probe_r2": probe["mean_r2"] if probe else math.nan,
            "probe_spearman": probe["mean_spearman"] if probe else math.nan,
        })  # fmt: skip
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return _markdown(table, aggregator), table


def write_paper_table(out_dir: str | Path, markdown: str, table: pd.DataFrame) -> tuple[Path, Path]:
    """paper_table.md and paper_table.csv in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv = out_dir / "paper_table.md", out_dir / "paper_table.csv"
    table.to_csv(csv, index=False)
    md.write_text(markdown)
    return md, csv


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PaperTableError(f"{path}: no such file; did `fusion ablate` finish?")
    return pd.read_csv(path)


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if values.count() else math.nan


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if values.count() > 1 else math.nan


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"


def _markdown(table: pd.DataFrame, aggregator: str) -> str:
    header = ["inputs", "DNA encoder", "R² (this run)", "R² (paper)", "Spearman (this run)", "Spearman (paper)",
              "ridge probe R²", "seeds"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        lines.append("| " + " | ".join([
            r.inputs, r.dna_encoder, _pm(r.r2_mean, r.r2_std), _pm(r.paper_r2_mean, r.paper_r2_std),
            _pm(r.spearman_mean, r.spearman_std), _pm(r.paper_spearman_mean, r.paper_spearman_std),
            "-" if math.isnan(r.probe_r2) else f"{r.probe_r2:.3f}", str(r.n_seeds),
        ]) + " |")  # fmt: skip
    notes = (
        f"\nTest split; mean ± std over seeds (ddof 1). Paper: {SOURCE}. Every row uses {aggregator} (with one "
        f"modality, cross-attention's feed-forward layers only: nothing to attend to). The ridge probe is fitted on "
        f"the same stores' pooled vectors. '-': not run, or not reported by the paper.\n"
    )
    return "\n".join(lines) + "\n" + notes


__all__ = ["COLUMNS", "PAPER_ROWS", "PaperRow", "PaperTableError", "paper_table", "read_run_metrics", "write_paper_table"]
