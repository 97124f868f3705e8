"""`make demo` / `python -m cli.demo`: the whole pipeline on synthetic data, offline, on CPU."""

from __future__ import annotations

import argparse
import sys

from cli.common import HelpFormatter, quiet_libraries
from fusion.demo import DemoConfig, run_demo


def create_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m cli.demo",
        description="Synthetic IsoFormer data -> adapter -> embedcache stores (tiny Enformer / NT / ESM2) -> "
        "fusion training -> modality ablation -> report with plots. Offline; a few minutes on 2 CPU cores.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="demo-out", help="output directory")
    p.add_argument("--n-genes", type=int, default=d.n_genes, help="synthetic genes")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="per-token rows per modality in the headline cross-attention run (group-averaged)")
    p.add_argument("--ablation-features", choices=("tokens", "pooled"), default=d.ablation_features, help="inputs of the ablation grid")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="ablation training seeds")
    p.add_argument("--epochs", type=int, default=d.epochs, help="maximum training epochs")
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = create_parser().parse_args(argv)
    config = DemoConfig(
        n_genes=args.n_genes,
        max_tokens=args.max_tokens,
        ablation_features=args.ablation_features,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        epochs=args.epochs,
    )
    run_demo(args.out, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
