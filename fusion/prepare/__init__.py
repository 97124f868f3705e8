"""Data preparation: task adapters that write FASTA per modality + a manifest, and a generic manifest loader.

- `isoformer`: GTEx_final.csv + genome -> dna.fa / rna.fa / protein.fa / manifest.csv / prepare.json
- `manifest`: load any manifest (CSV/TSV/Parquet), group-aware splits, targets with NaN for missing
- `synthetic`: a small IsoFormer-shaped data set with planted, known per-modality signal
- `fasta`: FASTA writer/reader helpers
"""

from fusion.prepare.isoformer import IsoformerPrepareConfig, PreparedDataset, prepare_isoformer
from fusion.prepare.manifest import GroupSplit, Manifest, PrepareError, load_manifest, load_prepared, normalize_split

__all__ = [
    "GroupSplit",
    "IsoformerPrepareConfig",
    "Manifest",
    "PrepareError",
    "PreparedDataset",
    "load_manifest",
    "load_prepared",
    "normalize_split",
    "prepare_isoformer",
]
