"""The demo's planted data (synthetic IsoFormer table -> adapter -> three tiny-encoder stores), cached per seed.

Shared by bench_fusion_sweep.py (the sweep that chose the fusion defaults) and anyone who wants the
demo's stores without the demo's training: `demo_data(root, seed)` builds once into root/seed<N>/
and reuses a finished build (it writes `done.json` last, so a half-built directory is rebuilt).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fusion.demo import DemoConfig, build_modality_stores, make_demo_encoders
from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic


@dataclass(frozen=True)
class DemoData:
    prepared: str  # prepared directory (manifest + prepare.json)
    stores: dict[str, str]  # modality -> store path
    ceiling_r2: float  # best achievable test mean R^2 with all three modalities
    subset_ceiling_r2: dict[str, float]  # the same per modality subset ("dna+rna", ...)


def demo_data(root: str | Path, seed: int, *, n_genes: int = DemoConfig.n_genes, log=print) -> DemoData:
    """The demo's data for generator seed `seed` (demo sizes and encoders), built under root/seed<N>/ once."""
    out = Path(root) / f"seed{seed}-genes{n_genes}"
    done = out / "done.json"
    if done.exists():
        return DemoData(**json.loads(done.read_text()))
    shutil.rmtree(out, ignore_errors=True)
    info = generate_synthetic(out / "synthetic", SyntheticConfig(n_genes=n_genes, seed=seed))
    prepared = prepare_isoformer(info.csv_path, info.genome_path, out / "prepared", IsoformerPrepareConfig(dna_window=info.dna_window))
    models = make_demo_encoders(out / "models", hidden=DemoConfig.encoder_hidden, dna_window=info.dna_window)
    stores = build_modality_stores(prepared.out_dir, models, out / "stores", info.dna_window, progress=False, log=log)
    data = DemoData(str(prepared.out_dir), stores, info.ceiling_r2, info.subset_ceiling_r2)
    done.write_text(json.dumps(data.__dict__, indent=2))
    return data
