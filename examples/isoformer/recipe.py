#!/usr/bin/env python
"""The IsoFormer paper's table from GTEx_final.csv and an hg38 FASTA, with the released encoders.

    python examples/isoformer/recipe.py --csv GTEx_final.csv --genome hg38.fa --out isoformer-run
    python examples/isoformer/recipe.py --csv ... --genome ... --out ... --plan    # prepare, then every build's plan only

Every step is an ordinary `fusion` / `embedcache` command, printed before it runs, so the recipe
can also be followed by hand. What each step uses comes from recipe.toml (beside this file); give
--config once or more to override it (later files win, tables merged key by key), e.g. with tiny
local models to run the whole recipe offline (tests/examples/test_isoformer_recipe.py does).

  1. prepare  `fusion prepare isoformer`, once per DNA window (NT ~12 kb, Enformer 196,608 bp)
  2. build    `embedcache build`: RNA (NT-v2), protein (ESM2-150M), DNA (NT-v2) and DNA (Enformer)
  3. ablate   `fusion ablate`: every modality subset x seeds, NT as DNA encoder, plus the ridge probe
  4. enformer `fusion train` per seed (and `fusion probe`): all three modalities, Enformer as DNA encoder
  5. table    OUT/paper_table.md and .csv: the runs beside the paper's figures (fusion.paper_table)

Run it again after an interruption: a prepared directory with the same settings is kept, builds
resume where they stopped, and finished ablations and training runs are kept (delete one to redo it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODALITY_OF_STORE = {"rna": "rna", "protein": "protein", "dna_nt": "dna", "dna_enformer": "dna"}
# Keys of a [stores.X] table that are the recipe's, not `embedcache build` flags.
STORE_KEYS = ("prepared", "fasta")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe([HERE / "recipe.toml", *args.config])
    out = Path(args.out)
    enformer = recipe["enformer"]["enabled"]
    stores = {name: s for name, s in recipe["stores"].items() if enformer or name != "dna_enformer"}

    # 1. prepare: one directory per DNA window the stores read (RNA and protein are the same in each).
    for name in dict.fromkeys(s["prepared"] for s in stores.values()):
        prepare(args.csv, args.genome, out / "prepared" / name, recipe["prepare"], recipe["prepare"]["dna_window"][name])

    # 2. build: one store per [stores.X] table; --plan prints the plans instead.
    for name, store in stores.items():
        fasta = out / "prepared" / store["prepared"] / store["fasta"]
        flags = to_flags({k: v for k, v in store.items() if k not in STORE_KEYS})
        run(["embedcache", "build", str(fasta), "-o", str(out / "stores" / f"{name}.zarr"), *flags, *(["--dry-run"] if args.plan else [])])
    if args.plan:
        return 0

    fusion_flags = to_flags(recipe["fusion"])
    # 3. the NT table: every subset of DNA (NT), RNA, protein, with the probe.
    nt_stores = store_flags(out, ["dna_nt", "rna", "protein"])
    ablation = out / "ablation"
    ablate = recipe["ablate"]
    if (ablation / "ablation_runs.csv").is_file():
        print(f"kept: {ablation} (finished before; delete it to train again)", flush=True)
    else:
        run(["fusion", "ablate", "--manifest", str(out / "prepared" / "nt"), *nt_stores, "--aggregators", ablate["aggregators"],
             "--seeds", ",".join(str(s) for s in ablate["seeds"]), *([] if ablate["probe"] else ["--no-probe"]), *fusion_flags,
             "--no-progress", "--out", str(ablation)])  # fmt: skip

    # 4. the Enformer row: all three modalities, Enformer as DNA encoder, one run per seed.
    enformer_runs, enformer_probe = [], None
    if enformer:
        cfg = recipe["enformer"]
        manifest = str(out / "prepared" / "enformer")
        enf_stores = store_flags(out, ["dna_enformer", "rna", "protein"])
        for seed in cfg["seeds"]:
            run_dir = out / "enformer" / f"seed{seed}"
            enformer_runs.append(run_dir)
            if finished(run_dir):
                print(f"kept: {run_dir} (finished before; delete it to train again)", flush=True)
                continue
            run(["fusion", "train", "--manifest", manifest, *enf_stores, "--aggregator", cfg["aggregator"], "--seed", str(seed),
                 *fusion_flags, "--no-progress", "--out", str(run_dir)])  # fmt: skip
        if cfg["probe"]:
            enformer_probe = out / "enformer" / "probe"
            if not (enformer_probe / "metrics.json").is_file():
                run(["fusion", "probe", "--manifest", manifest, *enf_stores, "--out", str(enformer_probe)])

    # 5. the table in the paper's layout, beside the paper's figures.
    from fusion.paper_table import paper_table, write_paper_table

    markdown, table = paper_table(ablation / "ablation_runs.csv", enformer_runs, aggregator=ablate["aggregators"].split(",")[0],
                                  enformer_probe=enformer_probe)  # fmt: skip
    md, csv = write_paper_table(out, markdown, table)
    print(markdown)
    print(f"written: {md} and {csv}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, help="GTEx_final.csv of InstaDeepAI/multi_omics_transcript_expression")
    p.add_argument("--genome", required=True, help="hg38 FASTA whose chromosome names match the CSV's chr column (chr1, ...)")
    p.add_argument("--out", required=True, help="directory for prepared data, stores, runs and the table")
    p.add_argument("--config", action="append", default=[], type=Path, help="TOML merged over recipe.toml (repeatable; later wins)")
    p.add_argument("--plan", action="store_true", help="prepare, then print each build's plan (embedcache build --dry-run); nothing is embedded or trained")
    return p.parse_args(argv)


def load_recipe(paths: list[Path]) -> dict:
    """recipe.toml with each later file merged over it, table by table."""
    recipe: dict = {}
    for path in paths:
        if not path.is_file():
            sys.exit(f"recipe: --config {str(path)!r}: no such file")
        try:
            recipe = merge(recipe, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            sys.exit(f"recipe: {path}: not valid TOML: {e}")
    return recipe


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_flags(options: dict) -> list[str]:
    """{"trust_remote_code": True, "pool_bins": 3} -> ["--trust-remote-code", "--pool-bins", "3"]; false drops the flag."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def store_flags(out: Path, names: list[str]) -> list[str]:
    return [f for n in names for f in ("--store", f"{MODALITY_OF_STORE[n]}={out / 'stores' / f'{n}.zarr'}")]


def prepare(csv: str, genome: str, out: Path, options: dict, dna_window: int) -> None:
    """`fusion prepare isoformer` into `out`, unless it already holds a complete directory with these settings."""
    wanted = {"dna_window": dna_window, "target_transform": options["target_transform"], "protein_coding_only": options["protein_coding_only"]}
    done = out / "prepare.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        have = {k: meta["config"].get(k) for k in wanted}
        if have == wanted and meta["source"]["csv"] == str(Path(csv).resolve()) and meta["source"]["genome"] == str(Path(genome).resolve()):
            print(f"kept: {out} (prepared before with {wanted})", flush=True)
            return
    run(["fusion", "prepare", "isoformer", "--csv", csv, "--genome", genome, "--out", str(out), "--dna-window", str(dna_window),
         "--target-transform", options["target_transform"], *(["--protein-coding-only"] if options["protein_coding_only"] else [])])  # fmt: skip


def finished(run_dir: Path) -> bool:
    path = run_dir / "run.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "complete"


def run(command: list[str]) -> None:
    """Print the command as a user would type it, then run it with this Python's console scripts."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    program = Path(sys.executable).parent / command[0]  # the same environment as this script
    executable = str(program) if program.is_file() else shutil.which(command[0])
    if executable is None:
        sys.exit(f"recipe: {command[0]!r} is not installed in this environment (pip install -e . in the project)")
    status = subprocess.run([executable, *command[1:]]).returncode
    if status != 0:
        sys.exit(f"recipe: `{command[0]} {command[1]}` exited with status {status}; fix the cause and run the recipe again (finished steps are kept)")


if __name__ == "__main__":
    sys.exit(main())
