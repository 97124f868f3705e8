#!/usr/bin/env python
"""What the recipe's builds cost at the IsoFormer data set's size: tokens, disk, projected time on one H100.

The one source of docs/sizes.md, which it writes with --docs. Offline, without GTEx_final.csv (with
the real file, run `recipe.py --plan` on it instead: the same plan with the true lengths). Steps:
  1. Write a sample in the GTEx_final.csv schema at the data set's proportions (SAMPLE_GENES genes,
     the ASSUMED length distributions below) and a random genome that holds its genes.
  2. Run `recipe.py --plan` on it (prepare, then `embedcache build --dry-run` per store: the project's
     own plan) with tiny models that tokenize exactly as the released ones (the same vocabularies,
     NT 2,048 positions, ESM2 1,026, Enformer 896 output bins), so the token counts, windows and crops
     are the released encoders'.
  3. Scale the plan's counts from the sample to 170,000 transcripts over 20,000 genes, and its size
     to the released widths (the plan's per-token rows x width x 2 bytes).
  4. Count the released architectures' forward FLOPs with torch's FlopCounterMode on the meta device
     (no weights, no hub): per Enformer window, and a*L + b*L^2 per sequence of L tokens for NT-v2-250M
     and ESM2-150M; sum over the sample's sequences and scale.
  5. Project time = FLOPs / (H100 dense bf16 peak x an ASSUMED MFU). No GPU measured these.

    python examples/isoformer/estimate.py --work /tmp/isoformer-estimate --json examples/isoformer/estimate.json --docs docs/sizes.md
    python examples/isoformer/estimate.py --from-json examples/isoformer/estimate.json --docs docs/sizes.md   # page only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent

# The IsoFormer data set (InstaDeepAI/multi_omics_transcript_expression, GTEx_final.csv): about
# 170,000 transcripts of about 20,000 genes, about 91,000 of them protein-coding.
PAPER_TRANSCRIPTS = 170_000
PAPER_GENES = 20_000
SAMPLE_GENES = 200
# ASSUMED, not measured on GTEx_final.csv (not available offline): lognormal lengths.
CODING_FRACTION = 91_000 / 170_000  # coding transcripts
RNA_MEDIAN_NT, RNA_SIGMA = 2_000, 0.75  # mean 2,000 * exp(0.75^2 / 2) = 2.65 kb
PROTEIN_MEDIAN_AA, PROTEIN_SIGMA = 380, 0.6  # mean 455 aa; every coding transcript its own protein (upper bound)
# ASSUMED GPU: H100 SXM dense bf16 peak, and the share of it each encoder's forward reaches.
H100_PEAK_FLOPS = 989e12
MFU = {"nucleotide-transformer": 0.40, "esm2": 0.40, "enformer": 0.30}
# MEASURED (benchmarks/README.md, bench_build_host: a build's host side writing per-token fp16 rows, its forward a
# free stand-in, at width 640, the recipe's narrowest (the most per-token work per byte); the median of 3 runs,
# 881-969 MB/s, 2-core VM).
STORE_WRITE_BPS = 905e6
# MEASURED (benchmarks/README.md, bench_fusion_pace at the recipe's shapes, 2-core VM): training samples per
# second the loader delivers from the reduced arrays (512 rows), streamed from disk (a cold first epoch: the
# median of 12 runs, 337-595) and gathered from memory.
LOADER_SAMPLES_PER_S = 466.0
GATHER_SAMPLES_PER_S = 4658.0
# ASSUMED: the share of an H100's bf16 peak the fusion model's training step reaches (a small model:
# its matrices are d_model = 256 wide).
TRAIN_MFU = 0.10
WIDTH = {"rna": 768, "protein": 640, "dna_nt": 768, "dna_enformer": 3072}  # the released encoders' per-token widths
TISSUES = 30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="scratch directory (~0.2 GB); required unless --from-json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--docs", type=Path, help="write the sizes page (docs/sizes.md) here")
    p.add_argument("--from-json", type=Path, help="compute nothing: read the figures of an earlier --json")
    args = p.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if args.docs:
            args.docs.write_text(sizes_page(result))
        print(markdown(result["builds"]))
        return 0
    if args.work is None:
        p.error("--work is required unless --from-json is given")
    args.work.mkdir(parents=True, exist_ok=True)
    sample = write_sample(args.work / "sample", np.random.default_rng(args.seed))
    with_enformer = write_tiny_models(args.work / "tiny")
    plans = run_plan(args.work, sample, with_enformer)
    flops = count_flops(args.work / "out" / "prepared", with_enformer)
    rows = project(plans, flops, sample)
    training = training_estimate(args.work / "out" / "prepared", sample, with_enformer)
    print(markdown(rows))
    print()
    print(training_markdown(training))
    result = {"builds": rows, "training": training,
              "sample": {"genes": sample["genes"], "transcripts": sample["transcripts"], "coding": sample["coding"]}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        args.docs.write_text(sizes_page(result))
    return 0


def write_sample(out: Path, rng: np.random.Generator) -> dict:
    """GTEx_final.csv-schema table of SAMPLE_GENES genes at the paper's transcripts per gene, and its genome."""
    out.mkdir(parents=True, exist_ok=True)
    spacing, margin, per_chrom = 250_000, 150_000, 50  # genes 250 kb apart: no 196 kb window runs off a chromosome
    n_chrom = SAMPLE_GENES // per_chrom
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)
    with open(out / "genome.fa", "w") as f:
        for c in range(n_chrom):
            seq = bases[rng.integers(0, 4, 2 * margin + per_chrom * spacing)].tobytes().decode()
            f.write(f">chr{c + 1}\n" + "\n".join(seq[i:i + 80] for i in range(0, len(seq), 80)) + "\n")
    per_gene = 1 + rng.poisson(PAPER_TRANSCRIPTS / PAPER_GENES - 1, SAMPLE_GENES)
    amino = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    records = []
    for g in range(SAMPLE_GENES):
        chrom, tss = f"chr{g // per_chrom + 1}", margin + (g % per_chrom) * spacing
        strand = "+-"[g % 2]
        split = "train" if g % 10 < 8 else ("valid" if g % 10 == 8 else "test")
        for t in range(per_gene[g]):
            rna_len = max(200, int(rng.lognormal(np.log(RNA_MEDIAN_NT), RNA_SIGMA)))
            coding = rng.random() < CODING_FRACTION
            protein = amino[rng.integers(0, 20, max(50, int(rng.lognormal(np.log(PROTEIN_MEDIAN_AA), PROTEIN_SIGMA))))].tobytes().decode() if coding else ""
            span = 10_000
            start, end = (tss + 1, tss + span) if strand == "+" else (tss - span + 2, tss + 1)
            records.append({
                "transcript_id_gtex": f"ENST{g:06d}{t:02d}", "gene_id_gtex": f"ENSG{g:06d}", "split": split, "chr": chrom,
                "strand": strand, "start": start, "end": end, "RNA": bases[rng.integers(0, 4, rna_len)].tobytes().decode(),
                "5UTR": "", "CDS": "", "3UTR": "", "Protein": protein,
            })  # fmt: skip
    table = pd.DataFrame(records)
    tissues = pd.DataFrame(rng.gamma(0.5, 10.0, (len(table), TISSUES)), columns=[f"tissue_{k}" for k in range(TISSUES)])
    pd.concat([table, tissues], axis=1).to_csv(out / "GTEx_final.csv", index=False)
    return {"dir": out, "transcripts": len(table), "genes": SAMPLE_GENES, "coding": int((table["Protein"] != "").sum())}


def write_tiny_models(out: Path) -> bool:
    """Tiny models with the released tokenizers' vocabularies and lengths; True if Enformer's was made."""
    from embedcache.encoders.enformer import enformer_available
    from embedcache.tiny_models import make_tiny_enformer, make_tiny_esm2, make_tiny_nucleotide_transformer

    make_tiny_nucleotide_transformer(out / "nt", hidden=64, max_positions=2050)  # 2,048 positions, as NT-v2
    make_tiny_esm2(out / "esm2", hidden=64)  # 1,026 positions, as ESM2
    if enformer_available():
        make_tiny_enformer(out / "enformer", target_length=896)  # 896 output bins, as the released trunk
        return True
    return False


def run_plan(work: Path, sample: dict, with_enformer: bool) -> dict[str, dict]:
    """recipe.py --plan on the sample; per store: records, sequences, tokens, windows, cropped, rows."""
    tiny = work / "tiny"
    overlay = work / "plan.toml"
    overlay.write_text(
        f'[stores.rna]\nmodel = "{tiny / "nt"}"\ntrust_remote_code = false\n'
        f'[stores.protein]\nmodel = "{tiny / "esm2"}"\n'
        f'[stores.dna_nt]\nmodel = "{tiny / "nt"}"\ntrust_remote_code = false\n'
        f'[stores.dna_enformer]\nmodel = "{tiny / "enformer"}"\n'
        f"[enformer]\nenabled = {str(with_enformer).lower()}\n"
    )
    command = [sys.executable, str(HERE / "recipe.py"), "--csv", str(sample["dir"] / "GTEx_final.csv"),
               "--genome", str(sample["dir"] / "genome.fa"), "--out", str(work / "out"), "--config", str(overlay), "--plan"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"estimate: recipe.py --plan failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    print(result.stdout, file=sys.stderr)
    plans = {}
    for block in result.stdout.split("\n$ ")[1:]:
        store = re.search(r"store: .*?stores/(\w+)\.zarr", block)
        if not store:
            continue
        records = re.search(r"records: ([\d,]+) \(([\d,]+) unique", block)
        embed = re.search(r"to embed: ([\d,]+) sequences, ([\d,]+) (\w+) in ([\d,]+) model windows", block)
        cropped = re.search(r"cropped on request: ([\d,]+)", block)
        n = lambda m, i=1: int(m.group(i).replace(",", ""))  # noqa: E731
        sequences, tokens = n(embed), n(embed, 2)
        rows = n(re.search(r"per-token rows to store: ([\d,]+)", block))  # priced below at the released width
        plans[store.group(1)] = {
            "records": n(records), "sequences": sequences, "tokens": tokens, "unit": embed.group(3),
            "windows": n(embed, 4), "cropped": n(cropped), "rows": rows,
        }  # fmt: skip
    return plans


def count_flops(prepared: Path, with_enformer: bool) -> dict[str, float]:
    """Forward FLOPs of the released architectures over the sample's sequences (meta device: no weights)."""
    from transformers import EsmConfig, EsmModel

    def esm_fit(config: EsmConfig) -> tuple[float, float]:
        """(a, b) with forward FLOPs of one sequence of L tokens = a*L + b*L^2 (linear layers; attention)."""
        with torch.device("meta"):
            model = EsmModel(config, add_pooling_layer=False)
        f = []
        for length in (512, 1024):
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(input_ids=torch.zeros(1, length, dtype=torch.long, device="meta"))
            f.append(counter.get_total_flops())
        b = (f[1] / 1024 - f[0] / 512) / 512
        return f[0] / 512 - b * 512, b

    # NT-v2-250M: 24 layers, hidden 768 (16 heads; the head count does not change the FLOPs), SwiGLU FFN of 3,072 (three 768x3,072 matrices); an EsmModel with a
    # plain FFN of 4,608 has the same matrix sizes. ESM2-150M: 30 layers, hidden 640, 20 heads, FFN 2,560.
    nt = esm_fit(EsmConfig(vocab_size=4107, hidden_size=768, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4608,
                           max_position_embeddings=2050, position_embedding_type="rotary", pad_token_id=1))  # fmt: skip
    esm = esm_fit(EsmConfig(vocab_size=33, hidden_size=640, num_hidden_layers=30, num_attention_heads=20, intermediate_size=2560,
                            max_position_embeddings=1026, position_embedding_type="rotary", pad_token_id=1))  # fmt: skip

    def sum_flops(fasta: Path, fit: tuple[float, float], tokens_of, cap: int) -> float:
        lengths = np.array([min(tokens_of(s), cap) + specials for s in read_lengths(fasta)], dtype=np.float64)
        return float(fit[0] * lengths.sum() + fit[1] * (lengths**2).sum())

    specials = 1  # <cls> (NT); ESM2 adds <eos> too, counted below
    out = {
        "rna": sum_flops(prepared / "nt" / "rna.fa", nt, lambda n: n // 6 + n % 6, 2047),
        "dna_nt": sum_flops(prepared / "nt" / "dna.fa", nt, lambda n: n // 6 + n % 6, 2047),
        "protein": sum_flops(prepared / "nt" / "protein.fa", esm, lambda n: n + 1, 1023),
    }
    if with_enformer:
        from enformer_pytorch import Enformer

        with torch.device("meta"):
            model = Enformer.from_hparams(dim=1536, depth=11, heads=8, output_heads=dict(human=5313), target_length=896)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 196_608, 4, device="meta"), return_only_embeddings=True)
        out["dna_enformer_per_window"] = counter.get_total_flops()
    out["fit"] = {"nt": nt, "esm2": esm}
    return out


def training_estimate(prepared: Path, sample: dict, with_enformer: bool) -> dict:
    """Per-token data in RAM after recipe.toml's max_tokens averaging, and one training step's FLOPs per sample."""
    from fusion.batch import ModalityBatch
    from fusion.models.config import FusionModelConfig
    from fusion.models.fusion_model import FusionModel

    fusion = tomllib.loads((HERE / "recipe.toml").read_text())["fusion"]
    cap = fusion["max_tokens"]
    token_bins = tomllib.loads((HERE / "recipe.toml").read_text())["stores"]["dna_enformer"]["token_bins"]
    # Per-token rows per record as the stores hold them (specials stripped), then averaged down to `cap`.
    rows = {
        "rna": [min(n // 6 + n % 6, 2047) for n in read_lengths(prepared / "nt" / "rna.fa")],
        "protein": [min(n, 1022) for n in read_lengths(prepared / "nt" / "protein.fa")],
        "dna_nt": [min(n // 6 + n % 6, 2047) for n in read_lengths(prepared / "nt" / "dna.fa")],
        "dna_enformer": [token_bins] * sample["genes"],
    }
    ram_gb = {}
    for store, r in rows.items():
        scale = PAPER_GENES / sample["genes"] if store.startswith("dna") else PAPER_TRANSCRIPTS / sample["transcripts"]
        ram_gb[store] = float(np.minimum(r, cap).sum()) * WIDTH[store] * 2 * scale / 1e9

    def step_flops(dna: str) -> float:
        """Forward + backward FLOPs of one sample at `cap` rows per modality (FlopCounterMode, CPU)."""
        dims = {"dna": WIDTH[dna], "rna": WIDTH["rna"], "protein": WIDTH["protein"]}
        n = {"dna": min(cap, token_bins) if dna == "dna_enformer" else cap, "rna": cap, "protein": cap}
        config = FusionModelConfig(
            modalities=("dna", "rna", "protein"), input_dims=tuple(dims.items()), n_targets=TISSUES,
            target_names=tuple(f"t{k}" for k in range(TISSUES)), aggregator="cross-attention",
            d_model=fusion["d_model"], n_layers=fusion["n_layers"], n_heads=fusion["n_heads"],
        )  # fmt: skip
        model = FusionModel(config)
        batch = {m: ModalityBatch(torch.randn(1, n[m], dims[m]), torch.ones(1, n[m], dtype=torch.bool), torch.ones(1, dtype=torch.bool))
                 for m in dims}  # fmt: skip
        with FlopCounterMode(display=False) as counter:
            model(batch).sum().backward()
        return float(counter.get_total_flops())

    train_fraction = 0.8  # genes in the train split (the paper's protein-coding split: ~90%)
    return {
        "max_tokens": cap, "ram_gb": ram_gb, "train_samples": round(PAPER_TRANSCRIPTS * train_fraction),
        "step_flops_per_sample": {"nt": step_flops("dna_nt"), **({"enformer": step_flops("dna_enformer")} if with_enformer else {})},
    }  # fmt: skip


def training_markdown(t: dict) -> str:
    lines = [f"Per-token data held in RAM after averaging to max_tokens = {t['max_tokens']} rows: "
             + ", ".join(f"{k} {v:,.0f} GB" for k, v in t["ram_gb"].items())]
    for dna, f in t["step_flops_per_sample"].items():
        lines.append(f"cross-attention, all three modalities, DNA = {dna}: {f / 1e9:,.1f} GFLOP per training sample (forward + backward); "
                     f"an epoch of {t['train_samples']:,} samples is {f * t['train_samples'] / 1e15:,.2f} PFLOP")  # fmt: skip
    return "\n".join(lines)


def read_lengths(fasta: Path) -> list[int]:
    lengths, n = [], None
    for line in fasta.read_text().splitlines():
        if line.startswith(">"):
            if n is not None:
                lengths.append(n)
            n = 0
        else:
            n += len(line.strip())
    return lengths + ([n] if n is not None else [])


def project(plans: dict[str, dict], flops: dict, sample: dict) -> list[dict]:
    encoder = {"rna": "nucleotide-transformer", "protein": "esm2", "dna_nt": "nucleotide-transformer", "dna_enformer": "enformer"}
    rows = []
    for store, plan in plans.items():
        scale = PAPER_GENES / sample["genes"] if store.startswith("dna") else PAPER_TRANSCRIPTS / sample["transcripts"]
        total = flops["dna_enformer_per_window"] * plan["windows"] if store == "dna_enformer" else flops[store]
        seconds = total * scale / (H100_PEAK_FLOPS * MFU[encoder[store]])
        rows.append({
            "store": store, "records": round(plan["records"] * scale), "sequences": round(plan["sequences"] * scale),
            "tokens": round(plan["tokens"] * scale), "unit": plan["unit"], "windows": round(plan["windows"] * scale),
            "cropped": round(plan["cropped"] * scale), "rows": round(plan["rows"] * scale),
            "size_gb": (plan["rows"] * WIDTH[store] * 2 + plan["sequences"] * WIDTH[store] * 4 + plan["tokens"]) * scale / 1e9, "pflop": total * scale / 1e15,
            "mfu": MFU[encoder[store]], "h100_minutes": seconds / 60,
        })  # fmt: skip
        rows[-1]["write_minutes"] = write_minutes(rows[-1])
    return rows


def write_minutes(build: dict) -> float:
    """Minutes a build's host side takes to write the store's per-token rows (fp16) at STORE_WRITE_BPS."""
    return build["rows"] * WIDTH[build["store"]] * 2 / STORE_WRITE_BPS / 60


STORE_SHORT = {"rna": "RNA", "protein": "protein", "dna_nt": "DNA (NT-v2)", "dna_enformer": "DNA (Enformer)"}
STORE_LABEL = {
    "rna": "RNA: NT-v2-250M, 6-mers, cropped on the left to 2,047 tokens (the 3' end kept)",
    "protein": "protein: ESM2-150M, the first 1,022 residues",
    "dna_nt": "DNA: NT-v2-250M, 12,282 bp around the TSS (2,047 tokens)",
    "dna_enformer": "DNA: Enformer, 196,608 bp; the central 128 of 896 bins kept per token",
}


def sizes_page(result: dict) -> str:
    """docs/sizes.md: the one place the project states how large its stores are at IsoFormer scale."""
    from fusion.train import TrainConfig

    recipe = tomllib.loads((HERE / "recipe.toml").read_text())
    builds = {r["store"]: r for r in result["builds"]}
    t = result["training"]
    gb = lambda x: f"{x:,.0f} GB"  # noqa: E731
    count = lambda x: f"{x / 1e9:,.2f}G" if x >= 1e9 else f"{x / 1e6:,.1f}M"  # noqa: E731
    for r in result["builds"]:  # figures kept in an older JSON follow the current write rate
        r["write_minutes"] = write_minutes(r)
    rows = [f"| store | records | tokens | per-token rows | width | disk | one H100, forward (projected) | writing at {STORE_WRITE_BPS / 1e6:.0f} MB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["builds"]:
        rows.append(f"| {STORE_LABEL[r['store']]} | {r['records']:,} | {count(r['tokens'])} {r['unit']} | {count(r['rows'])} | "
                    f"{WIDTH[r['store']]:,} | {gb(r['size_gb'])} | {r['h100_minutes']:.1f} min | {r['write_minutes']:.0f} min |")  # fmt: skip
    total = sum(r["size_gb"] for r in result["builds"])
    forward = sum(r["h100_minutes"] for r in result["builds"])
    writes = sum(r["write_minutes"] for r in result["builds"])
    rows.append(f"| **all four** | | | | | **{gb(total)}** | {forward:.0f} min | {writes:.0f} min |")
    with_nt = sum(builds[k]["size_gb"] for k in ("rna", "protein", "dna_nt") if k in builds)
    with_enformer = sum(builds[k]["size_gb"] for k in ("rna", "protein", "dna_enformer") if k in builds)
    pooled_gb = sum(r["sequences"] * WIDTH[r["store"]] * 4 for r in result["builds"]) / 1e9

    fusion, train = recipe["fusion"], TrainConfig()
    seeds = len(recipe["ablate"]["seeds"])
    runs = seeds * 7 + (len(recipe["enformer"]["seeds"]) if recipe["enformer"]["enabled"] else 0)
    epoch_s = t["train_samples"] / LOADER_SAMPLES_PER_S
    ram = ", ".join(f"{STORE_SHORT[k]} {gb(v)}" for k, v in t["ram_gb"].items())
    step = t["step_flops_per_sample"]
    compute = "\n".join(
        f"  - DNA from {'NT-v2' if k == 'nt' else 'Enformer'}: {f / 1e9:,.1f} GFLOP per training sample, {f * t['train_samples'] / 1e15:,.2f} PFLOP "
        f"per epoch, **{f * t['train_samples'] / (H100_PEAK_FLOPS * TRAIN_MFU):,.0f} s per epoch** on one H100."
        for k, f in step.items()
    )
    by_writes = [STORE_SHORT[r["store"]] for r in result["builds"] if r["write_minutes"] > r["h100_minutes"]]
    by_forward = [STORE_SHORT[r["store"]] for r in result["builds"] if r["write_minutes"] <= r["h100_minutes"]]
    bound = (f"- On one GPU fed by a 2-core host like the one measured, the builds of {', '.join(by_writes) or 'no store'} would\n"
             f"  be bound by the build's host side (writing the store), those of {', '.join(by_forward) or 'no store'} by the\n"
             f"  forward passes.")
    sample = result.get("sample", {})
    sample_text = f"{SAMPLE_GENES} genes" + (f" / {sample['transcripts']:,} transcripts" if "transcripts" in sample else "")
    streamed = [STORE_SHORT[k] for k in ("rna", "protein", "dna_nt", "dna_enformer") if k in builds and builds[k]["size_gb"] > fusion["memory_gb"]]
    return f"""# Sizes at IsoFormer scale

<!-- Written by examples/isoformer/estimate.py (do not edit by hand). To regenerate:
     python examples/isoformer/estimate.py --work /tmp/isoformer-estimate --json examples/isoformer/estimate.json --docs docs/sizes.md
     python examples/isoformer/estimate.py --from-json examples/isoformer/estimate.json --docs docs/sizes.md   (page only) -->

What the paper's recipe (`examples/isoformer/recipe.toml`) stores and computes at the size of the
IsoFormer data set: {PAPER_TRANSCRIPTS:,} transcripts of {PAPER_GENES:,} genes, {CODING_FRACTION * PAPER_TRANSCRIPTS:,.0f} of
them protein-coding. These figures are **projected**, not measured: the sequence lengths are
assumptions (below), and no GPU has timed these builds.

## Stores

Disk is one stored layer in fp16 (the `tokens` array, plus pooled vectors and residues). The
forward time assumes {MFU['esm2']:.0%} of an H100's bf16 peak for NT-v2 and ESM2 and {MFU['enformer']:.0%} for Enformer.
The write time uses the {STORE_WRITE_BPS / 1e6:.0f} MB/s of per-token rows that a build's host side writes on a
2-core VM with the model's forward taken out (`bench_build_host.py`, benchmarks/README.md).

{chr(10).join(rows)}

- The three stores of the paper's main table (RNA, protein, DNA from NT-v2) take **{gb(with_nt)}**;
  with Enformer as the DNA encoder, **{gb(with_enformer)}**.
- The pooled vectors of all four stores take {pooled_gb:.1f} GB (float32).
- Per-token bytes = per-token rows x width x 2 (fp16), for each stored layer: a store built with
  `--layer` naming k layers is k times as large. `--token-pool K` stores about 1/K of the rows,
  `--token-bins K` keeps K rows per record (Enformer), and `--no-tokens` stores pooled vectors only.
{bound}

## Training

- **RAM.** After averaging each record to at most {t['max_tokens']} rows (`max_tokens` in recipe.toml), the
  per-token inputs take: {ram}. `fusion` loads a modality into RAM when its store is under
  `memory_gb` ({fusion['memory_gb']:g} in recipe.toml) and streams it from disk otherwise: with the recipe's
  settings, {', '.join(streamed) or 'none'} {'streams' if len(streamed) == 1 else 'stream'}.
- **Compute.** The recipe's cross-attention model (d_model {fusion['d_model']}, {fusion['n_layers']} layers, {fusion['n_heads']} heads), forward and
  backward, all three modalities, an epoch of {t['train_samples']:,} training samples, at an assumed
  {TRAIN_MFU:.0%} of an H100's bf16 peak:
{compute}
- **Data loading.** Each store is averaged to 512 rows per record once, into an fp16 array that
  every epoch and run reuses. Streamed from disk, the reduced arrays delivered {LOADER_SAMPLES_PER_S:g} samples/s on a
  2-core VM (`bench_fusion_pace.py`, benchmarks/README.md): an epoch takes about {epoch_s / 60:.0f} minutes, so the
  loader, not the GPU, sets the pace, and the recipe's {runs} runs of up to {train.epochs} epochs (early stopping
  after {train.early_stopping_patience} without improvement) would take up to {runs * train.epochs * epoch_s / 86400:.0f} days at that rate. Held in memory, the
  same rows are gathered at {GATHER_SAMPLES_PER_S:,.0f} samples/s on that CPU, still below what one H100 or H200
  consumes at the assumed MFU; on the GPU itself (`--feature-device`: features up to half its memory) a
  gather is not the bound, but the reduced arrays above exceed one GPU's memory. Give the loader more
  cores (`workers = N` under `[fusion]` in your TOML) and a larger `memory_gb`, so that as much as
  fits is held in RAM.

## How the figures are made

`examples/isoformer/estimate.py` (about 2 minutes on a CPU, offline):

1. A sample of {sample_text} in the `GTEx_final.csv` schema, at the data set's proportions.
   **The lengths are assumptions**, not read from the real file: RNA lognormal with median
   {RNA_MEDIAN_NT:,} nt (mean {RNA_MEDIAN_NT * np.exp(RNA_SIGMA ** 2 / 2):,.0f}), protein lognormal with median {PROTEIN_MEDIAN_AA} aa (mean {PROTEIN_MEDIAN_AA * np.exp(PROTEIN_SIGMA ** 2 / 2):,.0f}), one
   distinct protein per coding transcript (an upper bound: isoforms often share a protein, and a
   store keeps each sequence once).
2. `recipe.py --plan` on it, with tiny models whose tokenizers and lengths are the released ones, so
   the token counts, windows and crops are those `embedcache build --dry-run` plans for the real
   encoders.
3. Counts scaled linearly to the data set's size; sizes at the released widths (NT-v2 768, ESM2-150M
   640, Enformer 3,072).
4. Forward FLOPs of the released architectures counted by `torch.utils.flop_counter` on the meta
   device (no weights), summed over the sample's sequences and scaled; time = FLOPs / 989 TFLOP/s
   (H100 SXM, dense bf16) / the assumed share above.

With the real `GTEx_final.csv`, `python examples/isoformer/recipe.py ... --plan` prints each build's
plan with the true lengths.
"""


def markdown(rows: list[dict]) -> str:
    lines = ["| store | records | unique sequences | tokens | model windows | cropped | per-token rows | size (fp16) | forward PFLOP | assumed MFU "
             f"| one H100 (forward) | store writes at {STORE_WRITE_BPS / 1e6:.0f} MB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        r["write_minutes"] = write_minutes(r)
        lines.append(f"| {r['store']} | {r['records']:,} | {r['sequences']:,} | {r['tokens']:,} {r['unit']} | {r['windows']:,} | {r['cropped']:,} | "
                     f"{r['rows']:,} | {r['size_gb']:,.0f} GB | {r['pflop']:,.0f} | {r['mfu']:.0%} | {r['h100_minutes']:.1f} min | {r['write_minutes']:.0f} min |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
