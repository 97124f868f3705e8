"""IsoFormer task adapter: GTEx_final.csv + a genome FASTA -> FASTA per modality, manifest, prepare.json.

Input: `GTEx_final.csv` of the Hugging Face dataset `InstaDeepAI/multi_omics_transcript_expression`
(one row per transcript: transcript_id_gtex, gene_id_gtex, split, chr, strand, start, end, RNA,
5UTR, CDS, 3UTR, Protein and one column per tissue) and an hg38-like genome FASTA whose
chromosome names match the `chr` column.

Output directory:
    dna.fa        one DNA window per GENE (id = gene_id_gtex), isoforms share it as in IsoFormer
    rna.fa        one RNA per transcript (id = transcript id), upper-cased, DNA alphabet (T not U)
    protein.fa    one protein per coding transcript (id = transcript id), trailing '*' stripped
    manifest.csv  sample_id, gene_id, split, dna_id, rna_id, protein_id, <targets in CSV order>
    prepare.json  config, targets, modality files, key/split columns, the fitted target transform,
                  counts and source paths; written LAST, so its presence marks a complete directory.

Coordinates. GTEx/GENCODE `start`/`end` are 1-based and inclusive (start <= end on both strands);
pyfaidx slices are 0-based half-open. The transcript's TSS in 0-based coordinates is `start - 1`
on '+' and `end - 1` on '-'.

The gene's TSS. Isoforms of one gene can start at different places but IsoFormer gives a gene a
single DNA input, so we take the gene's MOST UPSTREAM TSS on its strand: min(start) on '+',
max(end) on '-' (i.e. the gene start). Deterministic, and independent of row order and of the
protein_coding_only filter (it is computed over all rows of the gene).

The window. `dna_window` bp read on the gene's strand with the TSS at index `dna_window // 2`:
on '+' the genomic interval is [tss - w//2, tss - w//2 + w); on '-' it is
[tss - (w - w//2) + 1, tss + w//2 + 1), reverse-complemented. Where it runs off a chromosome end
it is padded with N, so every window has exactly `dna_window` letters. Soft-masked (lower-case)
genome letters are upper-cased, other IUPAC codes become N (the DNA encoders take ACGTN).

Targets. The CSV holds TPM-like values per tissue. `log1p` writes log(1 + TPM); `standardize`
writes (x - mean) / std per target with mean and std (ddof 0) fitted on the TRAIN split only;
`log1p-standardize` does both, in that order; `none` copies the values. Missing values stay
missing (empty in manifest.csv): they are masked in the loss later, never filled.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fusion.prepare.fasta import FastaWriter, reverse_complement
from fusion.prepare.manifest import PREPARE_JSON, Manifest, PrepareError, load_prepared, normalize_split

# Columns the adapter reads; every other column (except pandas index columns) is a target.
REQUIRED_COLUMNS = ("transcript_id_gtex", "gene_id_gtex", "split", "chr", "strand", "start", "end", "RNA", "Protein")
# The full fixed block of GTEx_final.csv. 5UTR/CDS/3UTR are not used (RNA already holds them)
# but they are never targets.
FIXED_COLUMNS = (
    "transcript_id_gtex", "gene_id_gtex", "split", "chr", "strand", "start", "end",
    "RNA", "5UTR", "CDS", "3UTR", "Protein",
)  # fmt: skip
TRANSFORMS = ("log1p", "standardize", "log1p-standardize", "none")
MANIFEST_COLUMNS = ("sample_id", "gene_id", "split", "dna_id", "rna_id", "protein_id")
MODALITY_FILES = {"dna": "dna.fa", "rna": "rna.fa", "protein": "protein.fa"}
KEY_COLUMNS = {"dna": "dna_id", "rna": "rna_id", "protein": "protein_id"}

_RNA_LETTERS = frozenset("ACGTN")
# ESM2's residue vocabulary, as embedcache.alphabets.PROTEIN accepts it.
_PROTEIN_LETTERS = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")
# Genome letters: keep ACGTN, turn every other IUPAC code into N.
_TO_ACGTN = str.maketrans("RYKMSWBDHV", "NNNNNNNNNN")


@dataclass(frozen=True, slots=True)
class IsoformerPrepareConfig:
    """How to turn GTEx_final.csv + genome into prepared files (written into prepare.json)."""

    dna_window: int = 196_608  # bp per gene around the TSS (Enformer's input length; the demo uses ~1-2 kb)
    target_transform: str = "log1p"  # log1p | standardize | log1p-standardize | none (see module docstring)
    protein_coding_only: bool = False  # keep only transcripts with a protein (the paper's protein-coding subset)
    fasta_line_width: int = 80  # residues per FASTA line; 0 writes each sequence on one line

    def __post_init__(self) -> None:
        if not isinstance(self.dna_window, int) or self.dna_window <= 0:
            raise PrepareError(f"dna_window must be a positive int, got {self.dna_window!r}")
        if self.target_transform not in TRANSFORMS:
            raise PrepareError(
                f"unknown target_transform {self.target_transform!r}; expected one of {list(TRANSFORMS)}"
            )
        if self.fasta_line_width < 0:
            raise PrepareError(f"fasta_line_width must be >= 0, got {self.fasta_line_width!r}")


@dataclass(frozen=True)
class PreparedDataset:
    """What prepare_isoformer wrote (the same facts are in prepare.json)."""

    out_dir: Path  # the prepared directory
    manifest_path: Path  # out_dir / manifest.csv
    prepare_json: Path  # out_dir / prepare.json
    sequence_files: dict[str, Path]  # modality -> FASTA path
    targets: tuple[str, ...]  # target (tissue) columns, in CSV order
    counts: dict  # the "counts" block of prepare.json

    def manifest(self) -> Manifest:
        return load_prepared(self.out_dir)


def prepare_isoformer(
    csv_path: str | Path,
    genome_fasta: str | Path,
    out_dir: str | Path,
    config: IsoformerPrepareConfig = IsoformerPrepareConfig(),
) -> PreparedDataset:
    """Write dna.fa, rna.fa, protein.fa, manifest.csv and prepare.json for the IsoFormer task (see module docstring)."""
    csv_path, genome_fasta, out_dir = Path(csv_path), Path(genome_fasta), Path(out_dir)
    table, targets = read_gtex_csv(csv_path)
    genome = _open_genome(genome_fasta)
    rows = _validate_rows(table, csv_path, genome, genome_fasta)
    genes = _gene_tss(rows, csv_path)

    raw = table[list(targets)].to_numpy(dtype=np.float64)  # (n, t)
    keep = (
        np.array([r["protein"] is not None for r in rows]) if config.protein_coding_only else np.ones(len(rows), bool)
    )
    rows = [r for r, k in zip(rows, keep) if k]
    raw = raw[keep]
    if not rows:
        raise PrepareError(f"{csv_path}: no transcripts left (protein_coding_only={config.protein_coding_only})")
    splits = np.array([r["split"] for r in rows])
    transform = fit_transform(
        raw, splits, targets, config.target_transform, csv_path=csv_path, lines=[r["line"] for r in rows]
    )
    values = apply_transform(raw, transform, targets)
    overflow = np.argwhere(np.abs(values) > np.finfo(np.float32).max)  # training is float32: these would be inf
    if len(overflow):
        i, j = overflow[0]
        raise PrepareError(
            f"{csv_path}: line {rows[i]['line']}: column {targets[j]!r} value {float(raw[i, j])!r} is {float(values[i, j]):.3g} "
            f"after the {config.target_transform!r} transform, beyond float32 range; use target_transform='log1p'"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / PREPARE_JSON
    if stale.exists():  # a half-rewritten directory must not look complete
        stale.unlink()
    kept_genes = list(dict.fromkeys(r["gene"] for r in rows))  # first-appearance order
    padded = 0
    with FastaWriter(out_dir / MODALITY_FILES["dna"], line_width=config.fasta_line_width) as w:
        for gene in kept_genes:
            g = genes[gene]
            seq, n_pad = cut_window(genome, g["chrom"], g["tss0"], g["strand"], config.dna_window)
            padded += n_pad > 0
            w.write(gene, seq)
    with FastaWriter(out_dir / MODALITY_FILES["rna"], line_width=config.fasta_line_width) as w:
        for r in rows:
            w.write(r["transcript"], r["rna"])
    with FastaWriter(out_dir / MODALITY_FILES["protein"], line_width=config.fasta_line_width) as w:
        for r in rows:
            if r["protein"] is not None:
                w.write(r["transcript"], r["protein"])

    keys = (
        [r["transcript"] for r in rows],  # sample_id
        [r["gene"] for r in rows],  # gene_id
        splits,  # split
        [r["gene"] for r in rows],  # dna_id: one window per gene
        [r["transcript"] for r in rows],  # rna_id
        [r["transcript"] if r["protein"] is not None else None for r in rows],  # protein_id: empty if non-coding
    )
    manifest = pd.DataFrame(dict(zip(MANIFEST_COLUMNS, keys)))
    manifest = pd.concat([manifest, pd.DataFrame(values, columns=list(targets))], axis=1)
    manifest.to_csv(out_dir / "manifest.csv", index=False, na_rep="")

    counts = _counts(rows, splits, values, n_dropped=int((~keep).sum()), padded=padded)
    meta = {
        "kind": "isoformer",
        "config": asdict(config),
        "targets": list(targets),
        "manifest": "manifest.csv",
        "modalities": dict(MODALITY_FILES),
        "key_columns": dict(KEY_COLUMNS),
        "sample_id_column": "sample_id",
        "group_column": "gene_id",
        "split_column": "split",
        "transform": transform,
        "counts": counts,
        "source": {"csv": str(csv_path.resolve()), "genome": str(genome_fasta.resolve())},
    }
    (out_dir / PREPARE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return PreparedDataset(
        out_dir=out_dir,
        manifest_path=out_dir / "manifest.csv",
        prepare_json=out_dir / PREPARE_JSON,
        sequence_files={m: out_dir / f for m, f in MODALITY_FILES.items()},
        targets=tuple(targets),
        counts=counts,
    )


# ---------------------------------------------------------------------------------------------
# Reading and checking the CSV


def read_gtex_csv(csv_path: Path) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The table (ids/sequences as str, targets float64) and its target columns in file order."""
    if not csv_path.exists():
        raise PrepareError(f"IsoFormer CSV {str(csv_path)!r} does not exist")
    if csv_path.is_dir():
        raise PrepareError(f"IsoFormer CSV {str(csv_path)!r} is a directory")
    try:
        header = pd.read_csv(csv_path, nrows=0)
    except pd.errors.EmptyDataError as e:
        raise PrepareError(f"IsoFormer CSV {str(csv_path)!r} is empty") from e
    except (UnicodeDecodeError, pd.errors.ParserError, EOFError, OSError) as e:  # binary, Latin-1, truncated .gz
        raise PrepareError(f"cannot read IsoFormer CSV {str(csv_path)!r} (UTF-8 text, optionally .gz, expected): {e}") from e
    columns = [str(c) for c in header.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise PrepareError(f"{csv_path}: missing required column(s) {missing}; columns found: {columns}")
    # Tissues = every column outside the fixed block, in file order. "Unnamed: 0" is a pandas
    # index written by to_csv(index=True), not a tissue.
    targets = tuple(c for c in columns if c not in FIXED_COLUMNS and not c.startswith("Unnamed:"))
    if not targets:
        raise PrepareError(f"{csv_path}: no target (tissue) columns besides the fixed ones; columns found: {columns}")
    text = [c for c in FIXED_COLUMNS if c in columns and c not in ("start", "end")]
    try:
        table = pd.read_csv(csv_path, dtype={c: str for c in text}, low_memory=False)
    except (UnicodeDecodeError, pd.errors.ParserError, EOFError, OSError) as e:
        raise PrepareError(f"cannot read IsoFormer CSV {str(csv_path)!r} (UTF-8 text, optionally .gz, expected): {e}") from e
    if len(table) == 0:
        raise PrepareError(f"{csv_path}: header only, no transcript rows")
    for column in targets:
        table[column] = _numeric_column(table[column], csv_path, column)
    return table, targets


def _numeric_column(values: pd.Series, csv_path: Path, column: str) -> pd.Series:
    out = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = out.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise PrepareError(f"{csv_path}: line {i + 2}: column {column!r} has non-numeric value {values.iloc[i]!r}")
    infinite = np.isinf(out.to_numpy())
    if infinite.any():
        i = int(np.flatnonzero(infinite)[0])
        raise PrepareError(f"{csv_path}: line {i + 2}: column {column!r} has infinite value {values.iloc[i]!r}; leave the cell empty if it is missing")
    return out


def _text(value: object) -> str:
    """Cell as stripped str; NaN/None -> ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _validate_rows(table: pd.DataFrame, csv_path: Path, genome, genome_path: Path) -> list[dict]:
    """One dict per row with checked, normalised fields; the first bad row raises."""
    chrom_len = {name: len(genome[name]) for name in genome.keys()}
    seen: dict[str, int] = {}
    rows = []
    cols = {c: table[c].tolist() for c in REQUIRED_COLUMNS}
    for i in range(len(table)):
        line = i + 2  # header is line 1
        tid = _text(cols["transcript_id_gtex"][i])
        where = f"{csv_path}: line {line} (transcript {tid!r})"
        if not tid:
            raise PrepareError(f"{csv_path}: line {line}: empty transcript_id_gtex")
        if tid in seen:
            raise PrepareError(f"{where}: transcript id appears twice (first at line {seen[tid]})")
        seen[tid] = line
        gene = _text(cols["gene_id_gtex"][i])
        if not gene:
            raise PrepareError(f"{where}: empty gene_id_gtex")
        split = normalize_split(cols["split"][i], where=where)
        chrom = _text(cols["chr"][i])
        if chrom not in chrom_len:
            shown = list(chrom_len)[:8]
            raise PrepareError(
                f"{where}: chromosome {chrom!r} is not in genome {genome_path} "
                f"(it has {len(chrom_len)} sequences: {shown}{' ...' if len(chrom_len) > 8 else ''})"
            )
        strand = _text(cols["strand"][i])
        if strand not in ("+", "-"):
            raise PrepareError(f"{where}: strand {cols['strand'][i]!r} is not '+' or '-'")
        start, end = _coordinate(cols["start"][i], "start", where), _coordinate(cols["end"][i], "end", where)
        if start < 1:
            raise PrepareError(f"{where}: start {start} < 1 (coordinates are 1-based)")
        if start > end:
            raise PrepareError(f"{where}: start {start} > end {end}")
        if end > chrom_len[chrom]:
            raise PrepareError(
                f"{where}: end {end} is beyond the end of {chrom} ({chrom_len[chrom]} bp) in {genome_path}; "
                f"another genome build?"
            )
        rna = "".join(_text(cols["RNA"][i]).split()).upper()
        if not rna:
            raise PrepareError(f"{where}: empty RNA sequence")
        bad = sorted(set(rna) - _RNA_LETTERS)
        if bad:
            raise PrepareError(f"{where}: RNA has letter(s) {bad} outside ACGTN")
        protein = _protein(cols["Protein"][i], where)
        rows.append(
            dict(line=line, transcript=tid, gene=gene, split=split, chrom=chrom, strand=strand,
                 start=start, end=end, rna=rna, protein=protein)
        )  # fmt: skip
    return rows


def _coordinate(value: object, name: str, where: str) -> int:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if math.isnan(x) or x != int(x):
        raise PrepareError(f"{where}: {name} {value!r} is not an integer coordinate")
    return int(x)


def _protein(value: object, where: str) -> str | None:
    """Upper-cased protein, or None for a non-coding transcript (empty/NaN).

    A trailing '*' is the stop codon written by some translators; it is not a residue and
    ESM2 has no token for it, so it is stripped. A '*' anywhere else is an error.
    """
    protein = "".join(_text(value).split()).upper()
    if protein.endswith("*"):
        protein = protein.rstrip("*")
    if not protein:
        return None
    bad = sorted(set(protein) - _PROTEIN_LETTERS)
    if bad:
        raise PrepareError(f"{where}: protein has character(s) {bad} outside {''.join(sorted(_PROTEIN_LETTERS))}")
    return protein


def _gene_tss(rows: list[dict], csv_path: Path) -> dict[str, dict]:
    """Per gene: chromosome, strand and the most upstream 0-based TSS over all its transcripts."""
    genes: dict[str, dict] = {}
    for r in rows:
        g = genes.get(r["gene"])
        tss0 = r["start"] - 1 if r["strand"] == "+" else r["end"] - 1
        if g is None:
            genes[r["gene"]] = dict(chrom=r["chrom"], strand=r["strand"], tss0=tss0, line=r["line"])
            continue
        if (g["chrom"], g["strand"]) != (r["chrom"], r["strand"]):
            raise PrepareError(
                f"{csv_path}: line {r['line']} (transcript {r['transcript']!r}): gene {r['gene']!r} is on "
                f"{r['chrom']}{r['strand']} here but on {g['chrom']}{g['strand']} at line {g['line']}"
            )
        g["tss0"] = min(g["tss0"], tss0) if r["strand"] == "+" else max(g["tss0"], tss0)
    return genes


# ---------------------------------------------------------------------------------------------
# Genome windows


def _open_genome(path: Path):
    import pyfaidx

    if not path.exists():
        raise PrepareError(f"genome FASTA {str(path)!r} does not exist")
    try:
        # as_raw: slices are plain str. The .fai index is built beside the file on first use.
        return pyfaidx.Fasta(str(path), as_raw=True, sequence_always_upper=True)
    except Exception as e:  # pyfaidx raises its own types (unindexable gzip, ragged lines, ...)
        raise PrepareError(
            f"cannot open genome FASTA {str(path)!r} with pyfaidx (plain or bgzip FASTA expected): {e}"
        ) from e


def window_bounds(tss0: int, strand: str, window: int) -> tuple[int, int]:
    """0-based half-open genomic interval [lo, hi) whose strand-oriented reading has the TSS at index window // 2."""
    lo = tss0 - window // 2 if strand == "+" else tss0 - (window - window // 2) + 1
    return lo, lo + window


def cut_window(genome, chrom: str, tss0: int, strand: str, window: int) -> tuple[str, int]:
    """The strand-oriented, N-padded window of `window` bp around `tss0`, and how many Ns were padded."""
    lo, hi = window_bounds(tss0, strand, window)
    n = len(genome[chrom])
    a, b = max(lo, 0), min(hi, n)
    core = str(genome[chrom][a:b]) if a < b else ""
    left = min(window, max(0, -lo))
    right = window - left - len(core)
    seq = ("N" * left + core.upper() + "N" * right).translate(_TO_ACGTN)
    if strand == "-":
        seq = reverse_complement(seq)
    return seq, left + right


# ---------------------------------------------------------------------------------------------
# Target transform


def fit_transform(
    raw: np.ndarray,
    splits: np.ndarray,
    targets: Sequence[str],
    name: str,
    *,
    csv_path: Path | str = "",
    lines: Sequence[int] = (),
) -> dict:
    """The transform record for prepare.json: its name, and for standardisation per-target mean/std fitted on train."""
    if name not in TRANSFORMS:
        raise PrepareError(f"unknown target_transform {name!r}; expected one of {list(TRANSFORMS)}")
    log1p = name in ("log1p", "log1p-standardize")
    standardize = name in ("standardize", "log1p-standardize")
    if log1p:
        neg = np.argwhere(raw < 0)
        if len(neg):
            i, j = neg[0]
            line = lines[i] if len(lines) else i + 2
            raise PrepareError(
                f"{csv_path}: line {line}: column {targets[j]!r} has negative value {float(raw[i, j])!r}; "
                f"the {name!r} transform expects raw TPM >= 0 (if the CSV already holds log or standardized values, "
                f"use target_transform='none' or 'standardize')"
            )
    record: dict = {
        "name": name,
        "log1p": log1p,
        "standardize": standardize,
        "forward": {
            "log1p": "y = log(1 + x)",
            "standardize": "y = (x - mean) / std",
            "log1p-standardize": "y = (log(1 + x) - mean) / std",
            "none": "y = x",
        }[name],
        "inverse": {
            "log1p": "x = exp(y) - 1",
            "standardize": "x = y * std + mean",
            "log1p-standardize": "x = exp(y * std + mean) - 1",
            "none": "x = y",
        }[name],
    }
    if standardize:
        train = raw[splits == "train"]
        if len(train) == 0:
            raise PrepareError(f"{csv_path}: cannot fit {name!r}: the train split is empty")
        base = np.log1p(train) if log1p else train
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are reported below
            mean = np.nanmean(base, axis=0)
            std = np.nanstd(base, axis=0)
        for j, t in enumerate(targets):
            if np.isnan(mean[j]):
                raise PrepareError(f"{csv_path}: cannot standardize target {t!r}: no train value is present")
            if not std[j] > 0:
                raise PrepareError(
                    f"{csv_path}: cannot standardize target {t!r}: its train values are constant ({float(mean[j])!r})"
                )
        record.update(
            fitted_on="train",
            ddof=0,
            mean={t: float(m) for t, m in zip(targets, mean)},
            std={t: float(s) for t, s in zip(targets, std)},
        )
    return record


def apply_transform(raw: np.ndarray, transform: dict, targets: Sequence[str]) -> np.ndarray:
    """(n, t) raw values -> transformed values, per the record from `fit_transform`. NaN stays NaN."""
    y = np.log1p(raw) if transform["log1p"] else np.array(raw, dtype=np.float64, copy=True)
    if transform["standardize"]:
        y = (y - _vector(transform["mean"], targets)) / _vector(transform["std"], targets)
    return y


def invert_transform(y: np.ndarray, transform: dict, targets: Sequence[str]) -> np.ndarray:
    """(n, t) transformed values (e.g. predictions) -> raw TPM-scale values. NaN stays NaN."""
    x = np.asarray(y, dtype=np.float64)
    if transform["standardize"]:
        x = x * _vector(transform["std"], targets) + _vector(transform["mean"], targets)
    return np.expm1(x) if transform["log1p"] else x


def _vector(per_target: dict[str, float], targets: Sequence[str]) -> np.ndarray:
    missing = [t for t in targets if t not in per_target]
    if missing:
        raise PrepareError(f"transform has no statistics for target(s) {missing}; it has {list(per_target)}")
    return np.array([per_target[t] for t in targets], dtype=np.float64)


def _counts(rows: list[dict], splits: np.ndarray, values: np.ndarray, *, n_dropped: int, padded: int) -> dict:
    gene_splits: dict[str, set[str]] = {}
    for r in rows:
        gene_splits.setdefault(r["gene"], set()).add(r["split"])
    leaky = sorted(g for g, s in gene_splits.items() if len(s) > 1)
    if leaky:
        # IsoFormer splits by gene; a gene in two splits puts the same DNA in train and test.
        warnings.warn(f"{len(leaky)} gene(s) have transcripts in more than one split, e.g. {leaky[:5]}", stacklevel=3)
    by_split = {}
    for s in ("train", "validation", "test"):
        mask = splits == s
        by_split[s] = {
            "transcripts": int(mask.sum()),
            "genes": len({r["gene"] for r, m in zip(rows, mask) if m}),
        }
    coding = sum(r["protein"] is not None for r in rows)
    return {
        "transcripts": len(rows),
        "genes": len(gene_splits),
        "coding_transcripts": int(coding),
        "noncoding_transcripts": int(len(rows) - coding),
        "dropped_noncoding": n_dropped,
        "by_split": by_split,
        "missing_target_values": int(np.isnan(values).sum()),
        "genes_in_several_splits": len(leaky),
        "dna_windows_padded": int(padded),
    }
