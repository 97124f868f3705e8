"""`make demo` / `python -m cli.demo`: the whole pipeline on synthetic data, offline, on CPU."""

from __future__ import annotations

import argparse
import sys

from cli.common import HelpFormatter, add_debug_flag, run_main
from fusion.demo import DemoConfig, run_demo

INTERRUPTED = "the demo does not resume: run it again (it starts over in --out)"


def create_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m cli.demo",
        description="Synthetic IsoFormer data -> adapter -> embedcache stores (tiny Enformer / NT / ESM2) -> "
        "a per-token fusion run -> modality ablation beside the ridge probe and the known ceiling -> reports "
        "with plots. Offline, on the CPU: about 3.5 minutes on 2 idle cores (after the install); --full takes longer.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="demo-out", help="output directory")
    full = DemoConfig.full()
    p.add_argument("--full", action="store_true", help=f"the ablation over training seeds {','.join(map(str, full.seeds))} "
                   f"(mean +- std per row) instead of one, and {full.max_tokens} token rows per modality in the headline run")
    p.add_argument("--n-genes", type=int, default=d.n_genes, help="synthetic genes")
    p.add_argument("--max-tokens", type=int, default=None, help="per-token rows per modality in the headline cross-attention run (group-averaged; "
                   f"default: {d.max_tokens}, with --full {full.max_tokens})")
    p.add_argument("--ablation-features", choices=("tokens", "pooled"), default=d.ablation_features, help="inputs of the ablation grid")
    p.add_argument("--seeds", default=None, help=f"ablation training seeds, comma-separated (default: {','.join(map(str, d.seeds))}; with --full "
                   f"{','.join(map(str, full.seeds))})")
    p.add_argument("--epochs", type=int, default=d.epochs, help="maximum training epochs")
    p.set_defaults(func=demo)
    add_debug_flag(p)
    return p


def demo(args: argparse.Namespace) -> int:
    changes = dict(n_genes=args.n_genes, ablation_features=args.ablation_features, epochs=args.epochs)
    if args.seeds is not None:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.max_tokens is not None:
        changes["max_tokens"] = args.max_tokens
    config = DemoConfig.full(**changes) if args.full else DemoConfig(**changes)
    run_demo(args.out, config)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(create_parser(), argv, interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
