"""The sample manifest: one row per sample, naming its record in each modality and its targets.

A manifest is a table (CSV, TSV or Parquet) with a sample id column, one key column per
modality (the record id of that sample in that modality's FASTA or embedding store; empty
when the sample lacks the modality, e.g. a non-coding transcript has no protein), target
columns (missing values stay missing: they are masked in the loss, never filled) and a split
column ("train" / "validation" / "test"). When the file has no split column, `GroupSplit`
assigns whole groups (genes) to splits so that no group straddles two splits.

A prepared directory (see `fusion.prepare.isoformer`) holds `manifest.csv` beside
`prepare.json`; `load_prepared` reads the key, target and split columns from there. For any other
table, `write_prepare_json` (`fusion prepare manifest`) writes that file from column names.

prepare.json (JSON object; only the first two fields are required):
    targets            list of target column names, in model output order
    key_columns        {modality: column holding the sample's record id in that modality's store}
    manifest           file name of the table beside prepare.json (default "manifest.csv")
    sample_id_column   column of unique sample ids (default "sample_id")
    split_column       column of train / validation / test (default "split"; aliases accepted)
    group_split        {"column", "fractions", "seed"}: when the table has no split column,
                       whole groups (e.g. genes) are assigned to splits (`GroupSplit`)
    modalities         {modality: FASTA file beside prepare.json} (written by prepare steps)
Anything else (kind, config, transform, counts, source) describes how the data was made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fusion.errors import FusionError

SPLITS = ("train", "validation", "test")

# Spellings seen in public datasets for the three splits; everything else is refused so that a
# typo ("tset") cannot silently drop samples from evaluation.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "eval": "validation",
    "evaluation": "validation",
    "test": "test",
    "testing": "test",
}

PREPARE_JSON = "prepare.json"


class PrepareError(FusionError):
    """Bad input to data preparation; the message names the file, the row or record, and the value."""


@dataclass(frozen=True, slots=True)
class GroupSplit:
    """Assign train/validation/test to whole groups (e.g. genes), shuffled with a seed."""

    column: str = "gene_id"  # samples sharing a value of this column always land in the same split
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # shares of GROUPS in train, validation, test
    seed: int = 0  # permutation seed; the same seed and the same set of groups give the same assignment

    def __post_init__(self) -> None:
        f = tuple(float(x) for x in self.fractions)
        if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
            raise PrepareError(
                f"GroupSplit fractions {self.fractions!r} must be three non-negative numbers "
                f"(train, validation, test) summing to 1"
            )


def normalize_split(value: object, *, where: str) -> str:
    """Map a split spelling ('valid', 'val', 'Train', ...) to 'train' / 'validation' / 'test'.

    `where` says where the value came from (file and row) for the error message.
    """
    key = "" if _missing(value) else str(value).strip().lower()
    if key not in SPLIT_ALIASES:
        raise PrepareError(
            f"{where}: unknown split value {value!r}; expected one of {sorted(SPLIT_ALIASES)} "
            f"(normalised to {list(SPLITS)})"
        )
    return SPLIT_ALIASES[key]


def assign_group_splits(groups: pd.Series, split: GroupSplit) -> pd.Series:
    """Split label per row, constant within each group.

    Groups are sorted (as strings) before the seeded permutation, so the assignment does not
    depend on row order. Counts are cumulative roundings of the fractions: with G groups,
    round(0.8 G) go to train, round(0.9 G) - round(0.8 G) to validation, the rest to test.
    """
    names = sorted(set(groups.astype(str)))
    order = np.random.default_rng(split.seed).permutation(len(names))
    f_train, f_val, _ = split.fractions
    n_train = int(round(f_train * len(names)))
    n_train_val = int(round((f_train + f_val) * len(names)))
    label = {}
    for rank, i in enumerate(order):
        label[names[i]] = "train" if rank < n_train else "validation" if rank < n_train_val else "test"
    return groups.astype(str).map(label)


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest: the table plus which columns mean what."""

    frame: pd.DataFrame  # one row per sample; key columns hold str or NaN, target columns float64 (NaN = missing)
    sample_id_column: str  # column of unique sample ids
    key_columns: dict[str, str]  # modality name -> column with that sample's record id in the modality
    target_columns: tuple[str, ...]  # target column names, in model output order
    split_column: str | None  # column holding 'train' / 'validation' / 'test'; None when the manifest has no splits
    path: Path | None = None  # file it was read from, for error messages
    # modality -> FASTA written by a prepare step (filled by load_prepared / prepare.json only)
    sequence_files: dict[str, Path] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def sample_ids(self) -> list[str]:
        return self.frame[self.sample_id_column].tolist()

    def split(self, name: str) -> Manifest:
        """The samples of one split ('train', 'validation' or 'test'; aliases such as 'valid' accepted)."""
        where = f"{self.path or 'manifest'}: split requested"
        if self.split_column is None:
            raise PrepareError(f"{where}: the manifest has no split column; load it with a split_column or group_split")
        canonical = normalize_split(name, where=where)
        rows = self.frame[self.split_column] == canonical
        if not rows.any():
            counts = self.frame[self.split_column].value_counts().to_dict()
            raise PrepareError(
                f"{self.path or 'manifest'}: split {canonical!r} is empty; samples per split present: {counts}"
            )
        return replace(self, frame=self.frame.loc[rows].reset_index(drop=True))

    def keys(self, modality: str) -> list[str]:
        """Record ids of `modality` for the samples that have it, in row order (missing keys skipped)."""
        column = self._key_column(modality)
        values = self.frame[column]
        return values[values.notna()].astype(str).tolist()

    def present(self, modality: str) -> np.ndarray:
        """(n,) bool: True where the sample has a record of `modality`."""
        return self.frame[self._key_column(modality)].notna().to_numpy()

    def targets(self) -> np.ndarray:
        """(n, t) float32 targets in `target_columns` order, NaN where missing."""
        return self.frame[list(self.target_columns)].to_numpy(dtype=np.float32, na_value=np.nan)

    def _key_column(self, modality: str) -> str:
        if modality not in self.key_columns:
            raise PrepareError(
                f"{self.path or 'manifest'}: unknown modality {modality!r}; "
                f"this manifest has {sorted(self.key_columns)}"
            )
        return self.key_columns[modality]


def load_manifest(
    path: str | Path,
    key_columns: dict[str, str] | None = None,
    target_columns: list[str] | None = None,
    split_column: str | None = "split",
    group_split: GroupSplit | None = None,
    *,
    sample_id_column: str | None = None,
) -> Manifest:
    """Read a manifest table and check it.

    `key_columns` maps modality -> column holding the sample's record id in that modality.
    `target_columns=None` (or `key_columns=None`) is only allowed when a `prepare.json` sits
    beside the file: the missing pieces, and the split column, are then read from it.
    If `split_column` is absent from the file (or None) and `group_split` is given, splits are
    assigned by group into a column named `split_column or "split"`. `sample_id_column=None` means
    prepare.json's, else "sample_id".
    """
    path = Path(path)
    if not path.exists():  # said first: a missing table also lacks a prepare.json beside it, which is not the news
        raise PrepareError(f"manifest file {str(path)!r} does not exist")
    prepared = (
        _read_prepare_json(path.parent / PREPARE_JSON) if (target_columns is None or key_columns is None) else None
    )
    if prepared is not None:
        sample_id_column = sample_id_column or prepared.get("sample_id_column")
        if group_split is None and prepared.get("group_split") is not None:
            group_split = _group_split(prepared["group_split"], path.parent / PREPARE_JSON)
    sample_id_column = sample_id_column or "sample_id"
    if target_columns is None:
        if prepared is None:
            raise PrepareError(
                f"{path}: target_columns not given and there is no {PREPARE_JSON} beside the file to read them from"
            )
        target_columns = list(prepared["targets"])
        split_column = prepared.get("split_column", split_column)
    if key_columns is None:
        if prepared is None:
            raise PrepareError(
                f"{path}: key_columns not given and there is no {PREPARE_JSON} beside the file to read them from"
            )
        key_columns = dict(prepared["key_columns"])

    df = _read_table(path)
    if len(df) == 0:
        raise PrepareError(f"{path}: manifest has a header but no rows")
    columns = [str(c) for c in df.columns]

    if sample_id_column not in df.columns:
        raise PrepareError(f"{path}: no sample id column {sample_id_column!r}; columns are {columns}")
    unknown_keys = {m: c for m, c in key_columns.items() if c not in df.columns}
    if unknown_keys:
        raise PrepareError(
            f"{path}: key column(s) {unknown_keys} (modality: column) not in the file; columns are {columns}"
        )
    unknown_targets = [t for t in target_columns if t not in df.columns]
    if unknown_targets:
        raise PrepareError(f"{path}: unknown target column(s) {unknown_targets}; columns are {columns}")
    if len(set(target_columns)) != len(target_columns):
        raise PrepareError(f"{path}: target columns repeat a name: {list(target_columns)}")

    df[sample_id_column] = _as_id_strings(df[sample_id_column])
    if df[sample_id_column].isna().any():
        rows = (np.flatnonzero(df[sample_id_column].isna().to_numpy()) + 2).tolist()[:10]
        raise PrepareError(f"{path}: empty sample id in column {sample_id_column!r} at row(s) {rows} (header is row 1)")
    dup = df[sample_id_column].duplicated(keep=False)
    if dup.any():
        examples = df.loc[dup, sample_id_column].head(10).tolist()
        rows = (np.flatnonzero(dup.to_numpy()) + 2).tolist()[:10]
        raise PrepareError(f"{path}: duplicate sample id(s) {sorted(set(examples))} at rows {rows} (header is row 1)")
    for column in key_columns.values():
        df[column] = _as_id_strings(df[column])
    for column in target_columns:
        df[column] = _as_float(df[column], path=path, column=column)

    if split_column is not None and split_column in df.columns:
        df[split_column] = [normalize_split(v, where=f"{path}: row {i + 2}") for i, v in enumerate(df[split_column])]
    elif group_split is not None:
        if group_split.column not in df.columns:
            raise PrepareError(
                f"{path}: group column {group_split.column!r} for the split not in the file; columns are {columns}"
            )
        groups = _as_id_strings(df[group_split.column])
        if groups.isna().any():
            rows = (np.flatnonzero(groups.isna().to_numpy()) + 2).tolist()[:10]
            raise PrepareError(f"{path}: empty group value in column {group_split.column!r} at row(s) {rows}")
        split_column = split_column or "split"
        df[split_column] = assign_group_splits(groups, group_split)
    elif split_column is not None:
        raise PrepareError(
            f"{path}: no split column {split_column!r}; columns are {columns}. "
            f"Pass group_split=GroupSplit(column=...) to assign splits by group, or split_column=None for no splits"
        )

    sequence_files = {}
    if prepared is not None and "modalities" in prepared:
        sequence_files = {m: path.parent / f for m, f in prepared["modalities"].items()}
    return Manifest(
        frame=df.reset_index(drop=True),
        sample_id_column=sample_id_column,
        key_columns=dict(key_columns),
        target_columns=tuple(target_columns),
        split_column=split_column,
        path=path,
        sequence_files=sequence_files,
    )


def _group_split(spec: object, where: Path) -> GroupSplit:
    if not isinstance(spec, dict) or "column" not in spec or set(spec) - {"column", "fractions", "seed"}:
        raise PrepareError(f"{where}: group_split {spec!r} must be an object with 'column' and optional 'fractions', 'seed'")
    return GroupSplit(column=spec["column"], fractions=tuple(spec.get("fractions", (0.8, 0.1, 0.1))), seed=int(spec.get("seed", 0)))


def write_prepare_json(
    table: str | Path,
    *,
    key_columns: dict[str, str],
    targets: list[str] | None = None,
    sample_id_column: str = "sample_id",
    split_column: str = "split",
    group_split: GroupSplit | None = None,
) -> tuple[Path, Manifest]:
    """Describe a manifest table in a prepare.json beside it, so `fusion train --manifest TABLE` can read it.

    `targets=None`: every column that is not the sample id, a key, the split or the group column.
    The table is loaded and checked with these columns first; nothing is written if it fails, and an
    existing prepare.json is never replaced.
    """
    table = Path(table)
    out = table.parent / PREPARE_JSON
    if out.exists():
        raise PrepareError(f"{out} exists already; remove it first if it should describe {table.name}")
    if targets is None:
        header = [str(c) for c in _read_table(table).columns]
        used = {sample_id_column, split_column, *key_columns.values(), *([group_split.column] if group_split else [])}
        targets = [c for c in header if c not in used]
        if not targets:
            raise PrepareError(f"{table}: no target columns left besides {sorted(used)}; columns are {header}")
    manifest = load_manifest(
        table, key_columns=key_columns, target_columns=targets, split_column=split_column,
        group_split=group_split, sample_id_column=sample_id_column,
    )  # fmt: skip
    meta = {
        "kind": "manifest",
        "manifest": table.name,
        "sample_id_column": sample_id_column,
        "key_columns": dict(key_columns),
        "targets": list(targets),
        "split_column": split_column,
    }
    if group_split is not None:
        meta["group_split"] = {"column": group_split.column, "fractions": list(group_split.fractions), "seed": group_split.seed}
    out.write_text(json.dumps(meta, indent=2) + "\n")
    return out, manifest


def load_prepared(out_dir: str | Path) -> Manifest:
    """The manifest of a prepared directory, with keys, targets and split column from its prepare.json."""
    out_dir = Path(out_dir)
    meta = _read_prepare_json(out_dir / PREPARE_JSON)
    if meta is None:
        raise PrepareError(f"{out_dir}: no {PREPARE_JSON}; is this a directory written by a prepare step?")
    manifest = load_manifest(
        out_dir / meta.get("manifest", "manifest.csv"),
        key_columns=dict(meta["key_columns"]),
        target_columns=list(meta["targets"]),
        split_column=meta.get("split_column", "split"),
        group_split=_group_split(meta["group_split"], out_dir / PREPARE_JSON) if meta.get("group_split") is not None else None,
        sample_id_column=meta.get("sample_id_column", "sample_id"),
    )
    files = {m: out_dir / f for m, f in meta.get("modalities", {}).items()}
    return replace(manifest, sequence_files=files)


def _read_prepare_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise PrepareError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("targets", "key_columns") if k not in meta]
    if missing:
        raise PrepareError(f"{path}: missing field(s) {missing}; fields are {sorted(meta)}")
    if not isinstance(meta["targets"], list) or not isinstance(meta["key_columns"], dict):
        raise PrepareError(f"{path}: 'targets' must be a list of column names and 'key_columns' an object {{modality: column}}")
    return meta


def _read_table(path: Path) -> pd.DataFrame:
    """CSV / TSV (optionally .gz) or Parquet, chosen by suffix. Text tables are read as strings."""
    if not path.exists():
        raise PrepareError(f"manifest file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise PrepareError(f"manifest file {str(path)!r} is empty")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".tab", ".txt"):
            # Strings first so ids such as "007" keep their zeros, and no guessing of missing values:
            # pandas would read an id "NA" (or "null", "None") as missing. Only an empty cell is missing
            # for ids; targets accept the usual spellings of a missing number (`MISSING_NUMBERS`).
            return pd.read_csv(path, sep="," if suffix == ".csv" else "\t", dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError as e:
        raise PrepareError(f"manifest file {str(path)!r} is empty ({e})") from e
    except Exception as e:  # pandas/pyarrow raise many types; say which file failed and why
        raise PrepareError(f"cannot read manifest {str(path)!r}: {e}") from e
    raise PrepareError(
        f"manifest {str(path)!r}: unsupported suffix {suffix!r}; use .csv, .tsv, .parquet (text may be .gz)"
    )


def _missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return value is pd.NA or value is pd.NaT


def _as_id_strings(values: pd.Series) -> pd.Series:
    """Ids as str with surrounding space stripped; empty or missing -> NaN (object dtype)."""
    out = [None if _missing(v) or str(v).strip() == "" else str(v).strip() for v in values]
    return pd.Series(out, index=values.index, dtype=object).where(lambda s: s.notna(), np.nan)


# How a missing number is written in the tables people export (R, pandas, spreadsheets).
MISSING_NUMBERS = frozenset({"", "na", "nan", "n/a", "null", "none", "-"})
# Targets are trained in float32: a larger magnitude would become inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _as_float(values: pd.Series, *, path: Path, column: str) -> pd.Series:
    """Targets as float64; empty or NA -> NaN (missing, masked); anything else must be a finite number
    that float32 can hold: the first offending value is an error naming the row and value."""
    # Plain lists: Series.map would re-infer a string dtype and turn None back into NaN.
    cells = [None if _missing(v) else v.strip() if isinstance(v, str) else v for v in values.tolist()]
    blank = pd.Series([v is None or (isinstance(v, str) and v.lower() in MISSING_NUMBERS) for v in cells], index=values.index)
    numbers = pd.to_numeric(
        pd.Series([np.nan if b else v for v, b in zip(cells, blank)], index=values.index, dtype=object), errors="coerce"
    )
    out = numbers.astype("float64")
    bad = out.isna() & ~blank
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise PrepareError(
            f"{path}: target column {column!r}, row {i + 2}: value {values.iloc[i]!r} is not a number "
            f"({int(bad.sum())} such value(s) in this column)"
        )
    too_big = ~blank & ~(out.abs() <= FLOAT32_MAX)  # inf, -inf, and finite values that overflow float32
    if too_big.any():
        i = int(np.flatnonzero(too_big.to_numpy())[0])
        raise PrepareError(
            f"{path}: target column {column!r}, row {i + 2}: value {values.iloc[i]!r} is not a finite number "
            f"within float32 range (|x| <= {FLOAT32_MAX:.3g}); leave the cell empty for a missing value "
            f"({int(too_big.sum())} such value(s) in this column)"
        )
    return out
