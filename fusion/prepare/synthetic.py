"""A small synthetic IsoFormer data set with planted, independent signal in each modality.

`generate_synthetic` writes, into one directory:
    GTEx_final.csv  the IsoFormer CSV schema (fixed columns + the 30 GTEx tissues), TPM values
    genome.fa       a few chromosomes of random background holding the genes' promoters
    synthetic.json  the config, the planted features and weights, the noise std and the R^2 ceilings
The real adapter (`fusion.prepare.isoformer.prepare_isoformer`, with `dna_window` from the config)
then turns these into the prepared files, exactly as for the real data.

The planted model (in log1p(TPM) space, per tissue t):
    y_t = offset_t + dna_t(gene) + rna_t(isoform) + protein_t(isoform; 0 if non-coding) + noise_t
Each term is a linear map (random loadings over the 30 tissues) of a few sequence features,
computed on the realised sequences, so a model that sees the sequences can recover it exactly;
noise is Gaussian with known std, so the best achievable R^2 is known.

The features are chosen to be READABLE by the demo's tiny random-initialised encoders after mean
pooling, i.e. each is a large-variance direction of what the encoder's input layer sees:
  - DNA (gene level; Enformer, one-hot convolutions over 128-bp bins): GC content, CpG density and
    A-T skew of the promoter = the upstream half of the adapter's window (which the RNA does not
    contain). Per gene GC ~ U(0.3, 0.7), A-T skew ~ U(-0.5, 0.5), CpG sites at rate U(0, 0.06).
  - RNA (isoform level; Nucleotide Transformer, non-overlapping 6-mer tokens): the shares of the
    transcript lying in poly-U and in poly-C tracts (runs of >= TRACT_MIN = 12 T / C), planted in
    the isoform's own 3'UTR (anywhere in a non-coding RNA) as tracts of 15-30 nt, a share
    ~ U(0, 0.2) of the whole transcript per base, drawn per isoform. Flavour: U-rich / AU-rich
    elements (HuR, TTP) and C-rich elements (poly(C)-binding proteins, as in the alpha-globin
    3'UTR) set mRNA stability. Why tracts and not base composition: a 6-mer tokenizer turns a
    composition shift into small changes of thousands of token counts, which a random 64-d
    embedding mixes into noise; a run of >= 11 letters holds a whole TTTTTT (CCCCCC) token in
    EVERY reading frame, so a tract share is the frequency of one token: one direction of the
    pooled embedding, with large variance. A share rather than a count because mean pooling
    divides by length. The UTRs around the tracts have a fixed background composition.
  - protein (coding isoforms; ESM2, one token per residue): His-vs-Gln and Asn-vs-Lys shares.
    These two contrasts are chosen so that the CDS does NOT show them in its mono- or
    dinucleotide composition: His/Gln (CAY/CAR), Asn/Lys (AAY/AAR) and Asp/Glu (GAY/GAR) differ
    only in the codon's third base (pyrimidine vs purine), the three boxes keep a fixed mass, and
    the shares are drawn with s_his + s_asn + s_asp = 1.5, so the expected count of every base
    and every dinucleotide is the same for every protein; codons are drawn uniformly among
    synonyms. Only in-frame codon (3-mer) counts carry them, diluted by the out-of-frame 3-mers
    and the UTRs, spread over thousands of 6-mer tokens: the RNA encoder cannot read them.
The features of different modalities come from independently drawn sequences (the RNA tracts
never enter the CDS or the promoter), so the three terms are statistically independent and their
variance shares add up.

The token term (opt-in: SyntheticConfig.share_token > 0; at the default 0 no draw is added and the
CSV and genome are byte-identical to those without it), a signal only per-token features can carry:
    y_t = ... + token_t(isoform; 0 if non-coding)
  - What: serine leaves the protein background and every coding protein gets exactly
    TOKEN_MARKERS = 18 serines back, as k ~ U{0..3} runs of TOKEN_RUN = 6 plus single serines, each
    piece in its own gap (no two touch). The feature `clustered_ser` is the share of the serines that
    have a serine neighbour, = 6k / 18. Flavour: a cluster of phosphosites or a low-complexity
    stretch acts where a scattered one does not.
  - Why pooling destroys it: every residue count, so the composition and the length, is the same
    whatever k; only the ORDER differs. A mean over a protein's residue tokens is permutation-invariant
    and sees none of it (the tiny random ESM2 mixes little context into each residue's output: the
    ridge probe on its pooled embeddings stays at the subset ceilings without the token term,
    benchmarks/bench_token_signal.py). Serine has six codons, so a run spreads over 36 in-frame codon
    pairs (6-mer tokens) of the RNA instead of repeating one token (tryptophan's TGGTGG) that the pooled
    RNA embedding could count. Not quite nothing is left in the RNA: a run's codon junctions shift a few
    out-of-frame 3-mers, and ridge on the RNA's 1-3-mer frequencies reads ~0.08 of the term's variance
    (none from 1-2-mers); the pooled tiny NT embedding shows none (the bench's token correlations).
  - What sees it: the per-token rows, group-averaged to DataConfig.max_tokens (consecutive groups of
    w = length / max_tokens residues; 5-19 at max_tokens 16): a row covering a run has a serine share
    of about 6 / w against about 1 / w for single serines, and a model with a per-row nonlinearity
    before pooling (cross-attention's feed-forward blocks) can read that. Group-averaging is what makes
    the window visible: the fusion model has no positions and attends only across modalities.
  It is centred and scaled like the other terms (over coding isoforms, 0 for non-coding ones), counts as
  protein in subset_ceiling_r2, and synthetic.json holds its definition and weights (planted["token"]),
  its own ceiling token_ceiling_r2 = mean over tissues of Var(token) / Var(y), and
  subset_ceiling_r2_without_token: each subset's ceiling for a model blind to it.

What a ridge probe on the demo's encoders' pooled embeddings reaches on this data, per modality
subset and seed, is in benchmarks/README.md (bench_fusion_sweep.py); `embedding_baseline` computes
such a table, and the slow test in tests/fusion/test_prepare_synthetic.py checks its ordering. The
test split holds only ~40 genes, so the DNA figure swings with which promoters land in it.

Sizes (defaults): 400 genes, ~1200 transcripts (1-8 isoforms per gene, ~25% non-coding), DNA
windows of 2 kb, RNA 300-1600 nt before the tracts (~350-2500 nt, mean ~1200, with them),
proteins 80-300 aa. Everything is seeded.

Caveat: synthetic transcripts are NOT spliced out of the synthetic genome; only each gene's TSS
and promoter live in it (the adapter needs nothing else).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fusion.prepare.fasta import reverse_complement, write_fasta
from fusion.prepare.manifest import GroupSplit, Manifest, PrepareError, assign_group_splits, load_prepared

# The 30 tissue columns of GTEx_final.csv, in the file's order (GTEx v8 SMTS tissue types without Bone Marrow).
GTEX_TISSUES = (
    "Adipose Tissue", "Adrenal Gland", "Bladder", "Blood", "Blood Vessel", "Brain", "Breast",
    "Cervix Uteri", "Colon", "Esophagus", "Fallopian Tube", "Heart", "Kidney", "Liver", "Lung",
    "Muscle", "Nerve", "Ovary", "Pancreas", "Pituitary", "Prostate", "Salivary Gland", "Skin",
    "Small Intestine", "Spleen", "Stomach", "Testis", "Thyroid", "Uterus", "Vagina",
)  # fmt: skip
CSV_COLUMNS = (
    "transcript_id_gtex", "gene_id_gtex", "split", "chr", "strand", "start", "end",
    "RNA", "5UTR", "CDS", "3UTR", "Protein",
)  # fmt: skip
# Split values as written in the CSV. [?] The real file's validation spelling is unverified
# ("valid" assumed); the adapter accepts train/valid/val/validation/eval/test alike.
CSV_SPLIT_NAMES = {"train": "train", "validation": "valid", "test": "test"}

DNA_FEATURES = ("promoter_gc", "promoter_cpg", "promoter_at_skew")
RNA_FEATURES = ("poly_u_tracts", "poly_c_tracts")
# RNA tracts: the base of each RNA feature (DNA alphabet, T = U) and the shortest run that counts.
# A run of >= 11 letters holds one whole 6-mer token of that base in every 6-mer reading frame.
TRACT_BASES = ("T", "C")
TRACT_MIN = 12
PROTEIN_FEATURES = ("his_minus_gln", "asn_minus_lys")
# The opt-in token term (SyntheticConfig.share_token): every coding protein holds exactly TOKEN_MARKERS copies
# of TOKEN_RESIDUE (none elsewhere), TOKEN_RUN-long runs or single residues; the feature is the share of the
# copies that touch another copy. Serine: six codons, so a run of them is spread over 36 in-frame codon
# pairs (6-mer tokens) of the RNA instead of repeating one token the RNA encoder could count.
TOKEN_FEATURES = ("clustered_ser",)
TOKEN_RESIDUE = "S"
TOKEN_MARKERS = 18
TOKEN_RUN = 6
TOKEN_DEFINITION = {  # written into synthetic.json's planted["token"] beside the features and weights
    "modality": "protein",
    "residue": TOKEN_RESIDUE,
    "markers_per_protein": TOKEN_MARKERS,
    "run_length": TOKEN_RUN,
    "definition": (
        f"clustered_ser = share of the protein's {TOKEN_MARKERS} {TOKEN_RESIDUE} residues that have an {TOKEN_RESIDUE} "
        f"neighbour; planted as k ~ U{{0..{TOKEN_MARKERS // TOKEN_RUN}}} runs of {TOKEN_RUN} plus single "
        f"{TOKEN_RESIDUE} residues (no two adjacent), so it is {TOKEN_RUN}k/{TOKEN_MARKERS}; every residue count "
        f"is independent of it"
    ),
}
MODALITIES = ("dna", "rna", "protein")
SPLIT_ORDER = ("train", "validation", "test")

_BASES = np.array(list("ACGT"))
_TRACT_RE = {b: re.compile(f"{b}{{{TRACT_MIN},}}") for b in TRACT_BASES}
_UTR_BACKGROUND = (0.27, 0.23, 0.23, 0.27)  # A, C, G, T of UTRs and non-coding RNA outside the tracts
_AMINO = "ACDEFGHIKLMNPQRSTVWY"
_CODONS = {
    "A": ["GCT", "GCC", "GCA", "GCG"], "C": ["TGT", "TGC"], "D": ["GAT", "GAC"], "E": ["GAA", "GAG"],
    "F": ["TTT", "TTC"], "G": ["GGT", "GGC", "GGA", "GGG"], "H": ["CAT", "CAC"], "I": ["ATT", "ATC", "ATA"],
    "K": ["AAA", "AAG"], "L": ["TTA", "TTG", "CTT", "CTC", "CTA", "CTG"], "M": ["ATG"], "N": ["AAT", "AAC"],
    "P": ["CCT", "CCC", "CCA", "CCG"], "Q": ["CAA", "CAG"], "R": ["CGT", "CGC", "CGA", "CGG", "AGA", "AGG"],
    "S": ["TCT", "TCC", "TCA", "TCG", "AGT", "AGC"], "T": ["ACT", "ACC", "ACA", "ACG"],
    "V": ["GTT", "GTC", "GTA", "GTG"], "W": ["TGG"], "Y": ["TAT", "TAC"],
}  # fmt: skip
_STOPS = ("TAA", "TAG", "TGA")
# Background amino-acid frequencies (roughly UniProt) for the residues outside the three planted boxes.
_BACKGROUND_AA = {
    "A": 8.3, "C": 1.4, "F": 3.9, "G": 7.1, "I": 5.9, "L": 9.7, "M": 2.4, "P": 4.7, "R": 5.5, "S": 6.6,
    "T": 5.3, "V": 6.9, "W": 1.1, "Y": 2.9,
}  # fmt: skip
_BOXES = (
    ("H", "Q"),
    ("N", "K"),
    ("D", "E"),
)  # (pyrimidine-ending, purine-ending) amino acid of each CA_/AA_/GA_ codon box


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    """Size, sequence lengths and variance shares of the synthetic data set (written into synthetic.json)."""

    n_genes: int = 400  # genes; with 1-8 isoforms each (fewer more likely) ~3.1 transcripts per gene, ~1200 in all
    n_chromosomes: int = 4  # chromosomes the genes are laid out on (chr1..chrN)
    max_isoforms: int = 8  # isoforms per gene are 1..max_isoforms with P(k) ~ 0.75^k
    noncoding_fraction: float = 0.25  # share of isoforms with no CDS/protein
    max_proteins_per_gene: int = 3  # distinct CDS per gene; each coding isoform uses one of them
    dna_window: int = 2048  # prepare with this dna_window; the planted promoter is its upstream half
    utr5_length: tuple[int, int] = (60, 200)  # 5'UTR length range (nt, inclusive)
    utr3_length: tuple[int, int] = (150, 500)  # 3'UTR length range
    protein_length: tuple[int, int] = (80, 300)  # protein length range (aa, including the initial Met)
    noncoding_length: tuple[int, int] = (300, 1200)  # non-coding transcript length range (before tracts)
    tract_length: tuple[int, int] = (15, 30)  # length range of one planted poly-U / poly-C tract (nt)
    tract_share_max: float = 0.2  # per isoform and tract base, the tracts' target share of the transcript ~ U(0, this)
    gene_body_length: tuple[int, int] = (500, 4000)  # genomic span (start..end) of a gene's transcripts
    share_dna: float = 0.25  # variance share of the promoter term in every tissue
    share_rna: float = 0.30  # variance share of the RNA (poly-U / poly-C tract) term
    share_protein: float = 0.20  # variance share of the protein term (over all transcripts; 0 for non-coding)
    share_noise: float = 0.25  # variance share of Gaussian noise; the five shares sum to 1
    share_token: float = 0.0  # variance share of the token term (serine clustering, protein; 0 for non-coding): off by default
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/validation/test shares of GENES
    missing_target_fraction: float = 0.01  # share of target cells left empty (NaN) to exercise masking
    seed: int = 0  # every random draw derives from this

    def __post_init__(self) -> None:
        shares = (self.share_dna, self.share_rna, self.share_protein, self.share_token, self.share_noise)
        total = sum(shares)
        if abs(total - 1.0) > 1e-6 or min(shares) < 0:
            raise PrepareError(
                f"variance shares dna={self.share_dna}, rna={self.share_rna}, protein={self.share_protein}, "
                f"token={self.share_token}, noise={self.share_noise} must be >= 0 and sum to 1 (they sum to {total})"
            )
        if self.share_noise <= 0:
            raise PrepareError("share_noise must be > 0 (the ceiling is defined against a noisy target)")
        if self.n_genes < 10 or self.n_chromosomes < 1 or self.n_genes < 2 * self.n_chromosomes:
            raise PrepareError(
                f"need n_genes >= 10 and >= 2 per chromosome, "
                f"got n_genes={self.n_genes}, n_chromosomes={self.n_chromosomes}"
            )
        if self.dna_window < 640:
            raise PrepareError(f"dna_window {self.dna_window} is too short for the genome layout (need >= 640)")
        if not 0 <= self.missing_target_fraction < 0.5:
            raise PrepareError(f"missing_target_fraction {self.missing_target_fraction} must be in [0, 0.5)")
        if not 0 <= self.noncoding_fraction < 1:
            raise PrepareError(f"noncoding_fraction {self.noncoding_fraction} must be in [0, 1)")
        lo, hi = self.tract_length
        if not TRACT_MIN <= lo <= hi:
            raise PrepareError(f"tract_length {self.tract_length} must satisfy {TRACT_MIN} (TRACT_MIN) <= low <= high")
        if self.share_token > 0 and self.protein_length[0] < 3 * TOKEN_MARKERS:
            raise PrepareError(
                f"protein_length {self.protein_length} is too short for the token term: its {TOKEN_MARKERS} "
                f"(TOKEN_MARKERS) serines need proteins of >= {3 * TOKEN_MARKERS} aa"
            )
        if not 0 < self.tract_share_max * len(TRACT_BASES) < 1:
            raise PrepareError(
                f"tract_share_max {self.tract_share_max} must be > 0 and < 1/{len(TRACT_BASES)} "
                f"(the {len(TRACT_BASES)} tract bases share one transcript)"
            )


@dataclass(frozen=True)
class SyntheticInfo:
    """What generate_synthetic wrote (all of it, and more, is in synthetic.json)."""

    out_dir: Path  # directory holding the three files
    csv_path: Path  # out_dir / GTEx_final.csv
    genome_path: Path  # out_dir / genome.fa
    json_path: Path  # out_dir / synthetic.json
    dna_window: int  # pass this as IsoformerPrepareConfig.dna_window
    n_genes: int
    n_transcripts: int
    ceiling_r2: float  # best achievable R^2 averaged over tissues (log1p target space)
    ceiling_r2_per_tissue: dict[str, float]
    subset_ceiling_r2: dict[str, float]  # best R^2 from the true signal of a subset of modalities, e.g. "dna+rna"
    token_ceiling_r2: float | None = None  # R^2 of the token term alone (None: not planted, share_token 0)
    subset_ceiling_r2_without_token: dict[str, float] | None = None  # subset ceilings of a model blind to the token term


# ---------------------------------------------------------------------------------------------
# Planted features: the same functions score the generator's sequences and the adapter's outputs.


def dna_features(window: str) -> np.ndarray:
    """(3,) promoter features of a strand-oriented DNA window: the promoter is its upstream half."""
    promoter = window[: len(window) // 2]
    n = max(len(promoter), 1)
    counts = {b: promoter.count(b) for b in "ACGT"}
    return np.array(
        [(counts["G"] + counts["C"]) / n, promoter.count("CG") / max(n - 1, 1), (counts["A"] - counts["T"]) / n]
    )


def rna_features(rna: str) -> np.ndarray:
    """(2,) shares of the transcript's letters that lie in poly-U and in poly-C tracts (runs >= TRACT_MIN)."""
    n = max(len(rna), 1)
    return np.array([sum(len(m) for m in _TRACT_RE[b].findall(rna)) / n for b in TRACT_BASES])


def protein_features(protein: str) -> np.ndarray:
    """(2,) residue-share contrasts His-Gln and Asn-Lys."""
    n = max(len(protein), 1)
    return np.array([(protein.count("H") - protein.count("Q")) / n, (protein.count("N") - protein.count("K")) / n])


def token_features(protein: str) -> np.ndarray:
    """(1,) share of the protein's TOKEN_RESIDUE copies that touch another copy (lie in a run of >= 2); 0 if none.

    A function of the residues' order only: any rearrangement keeps every residue count and can move it from 0 to 1.
    """
    runs = [len(r) for r in re.findall(f"{TOKEN_RESIDUE}+", protein)]
    return np.array([sum(r for r in runs if r >= 2) / max(sum(runs), 1)])


def true_signal(
    meta: dict,
    dna_by_gene: dict[str, str],
    rna_by_tx: dict[str, str],
    protein_by_tx: dict[str, str],
    genes: Sequence[str],
    transcripts: Sequence[str],
) -> dict[str, np.ndarray]:
    """Per modality, the (n, 30) planted term for each transcript, recomputed from sequences; with the
    token term planted (synthetic.json's planted holds "token"), that term too, under "token".

    `meta` is synthetic.json; `genes[i]` / `transcripts[i]` name transcript i's gene and id.
    A transcript missing from `protein_by_tx` is non-coding (protein and token terms 0).
    """
    feats = {
        "dna": np.stack([dna_features(dna_by_gene[g]) for g in genes]),
        "rna": np.stack([rna_features(rna_by_tx[t]) for t in transcripts]),
        "protein": np.stack([protein_features(protein_by_tx.get(t, "")) for t in transcripts]),
    }
    if "token" in meta["planted"]:
        feats["token"] = np.stack([token_features(protein_by_tx.get(t, "")) for t in transcripts])
    coding = np.array([t in protein_by_tx for t in transcripts])
    out = {}
    for m in feats:
        p = meta["planted"][m]
        z = (feats[m] - np.array(p["feature_mean"])) / np.array(p["feature_std"])
        if m in ("protein", "token"):
            z[~coding] = 0.0
        out[m] = z @ np.array(p["weights"])  # (n, k) @ (k, 30)
    return out


# ---------------------------------------------------------------------------------------------
# Generation


def generate_synthetic(out_dir: str | Path, config: SyntheticConfig = SyntheticConfig()) -> SyntheticInfo:
    """Write GTEx_final.csv, genome.fa and synthetic.json into `out_dir` (see module docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    genes = _draw_genes(rng, config)
    chromosomes = _layout_genome(rng, config, genes)
    transcripts = _draw_transcripts(rng, config, genes)

    # Splits by gene, as IsoFormer does.
    gene_ids = pd.Series([g["id"] for g in genes])
    split_of = dict(
        zip(gene_ids, assign_group_splits(gene_ids, GroupSplit("gene", config.split_fractions, config.seed)))
    )

    # Planted terms from the realised sequences.
    gene_index = {g["id"]: i for i, g in enumerate(genes)}
    feats = {
        "dna": np.stack([genes[gene_index[t["gene"]]]["dna_features"] for t in transcripts]),
        "rna": np.stack([rna_features(t["rna"]) for t in transcripts]),
        "protein": np.stack([protein_features(t["protein"] or "") for t in transcripts]),
    }
    coding = np.array([t["protein"] is not None for t in transcripts])
    n, n_t = len(transcripts), len(GTEX_TISSUES)
    components = [
        ("dna", DNA_FEATURES, config.share_dna),
        ("rna", RNA_FEATURES, config.share_rna),
        ("protein", PROTEIN_FEATURES, config.share_protein),
    ]
    if config.share_token > 0:  # only then: with it off no draw is added, and the data stay those it had before
        feats["token"] = np.stack([token_features(t["protein"] or "") for t in transcripts])
        components.append(("token", TOKEN_FEATURES, config.share_token))
    terms, planted = {}, {}
    for m, names, share in components:
        rows = coding if m in ("protein", "token") else np.ones(n, bool)  # protein features are centred over coding isoforms
        mean, std = feats[m][rows].mean(axis=0), feats[m][rows].std(axis=0)
        z = (feats[m] - mean) / std
        z[~rows] = 0.0
        loadings = rng.standard_normal((len(names), n_t))
        raw = z @ loadings  # (n, 30)
        scale = np.sqrt(share) / raw.std(axis=0)  # exact share of variance over all transcripts
        weights = loadings * scale
        terms[m] = z @ weights
        planted[m] = {
            "features": list(names),
            "feature_mean": mean.tolist(),
            "feature_std": std.tolist(),
            "weights": weights.tolist(),  # (k, 30): term = ((features - mean) / std) @ weights
            "variance_share": share,
        }
        if m == "token":
            planted[m].update(TOKEN_DEFINITION)
    noise_std = float(np.sqrt(config.share_noise))
    noise = rng.standard_normal((n, n_t)) * noise_std
    signal = terms["dna"] + terms["rna"] + terms["protein"]
    if "token" in terms:
        signal = signal + terms["token"]
    offset = rng.uniform(2.0, 4.0, n_t)
    offset = np.maximum(offset, -(signal + noise).min(axis=0) + 0.05)  # keep log1p(TPM) >= 0, i.e. TPM >= 0
    y = offset + signal + noise  # (n, 30) log1p(TPM)
    missing = rng.random((n, n_t)) < config.missing_target_fraction
    y_obs = np.where(missing, np.nan, y)

    # Files.
    write_fasta(out_dir / "genome.fa", ((name, seq) for name, seq in chromosomes), line_width=60)
    table = pd.DataFrame(
        {
            "transcript_id_gtex": [t["id"] for t in transcripts],
            "gene_id_gtex": [t["gene"] for t in transcripts],
            "split": [CSV_SPLIT_NAMES[split_of[t["gene"]]] for t in transcripts],
            "chr": [genes[gene_index[t["gene"]]]["chrom"] for t in transcripts],
            "strand": [genes[gene_index[t["gene"]]]["strand"] for t in transcripts],
            "start": [t["start"] for t in transcripts],
            "end": [t["end"] for t in transcripts],
            "RNA": [t["rna"] for t in transcripts],
            "5UTR": [t["utr5"] for t in transcripts],
            "CDS": [t["cds"] for t in transcripts],
            "3UTR": [t["utr3"] for t in transcripts],
            "Protein": [t["protein"] for t in transcripts],
        }
    )
    table = pd.concat([table, pd.DataFrame(np.expm1(y_obs), columns=list(GTEX_TISSUES))], axis=1)
    table.to_csv(out_dir / "GTEx_final.csv", index=False, na_rep="")

    splits = np.array([split_of[t["gene"]] for t in transcripts])
    ceilings = _ceilings(terms, noise_std, y_obs, offset, splits)
    meta = {
        "kind": "isoformer-synthetic",
        "config": asdict(config),
        "files": {"csv": "GTEx_final.csv", "genome": "genome.fa"},
        "prepare_with": {"dna_window": config.dna_window, "target_transform": "log1p"},
        "target_space": "log1p",
        "target_space_note": (
            "targets are log1p(TPM) = offset + dna + rna + protein + noise; the ceilings hold for the adapter's "
            "'log1p' transform and, R^2 being invariant to a per-tissue affine map, for 'log1p-standardize' too"
        ),
        "tissues": list(GTEX_TISSUES),
        "planted": planted,
        "offset": offset.tolist(),
        "noise_std": noise_std,
        **ceilings,
        "counts": {
            "genes": len(genes),
            "transcripts": n,
            "coding_transcripts": int(coding.sum()),
            "noncoding_transcripts": int((~coding).sum()),
            "by_split": {s: int((splits == s).sum()) for s in SPLIT_ORDER},
            "missing_target_values": int(missing.sum()),
        },
    }
    (out_dir / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    return SyntheticInfo(
        out_dir=out_dir,
        csv_path=out_dir / "GTEx_final.csv",
        genome_path=out_dir / "genome.fa",
        json_path=out_dir / "synthetic.json",
        dna_window=config.dna_window,
        n_genes=len(genes),
        n_transcripts=n,
        ceiling_r2=meta["ceiling_r2"],
        ceiling_r2_per_tissue=dict(zip(GTEX_TISSUES, meta["ceiling_r2_per_tissue"])),
        subset_ceiling_r2=meta["subset_ceiling_r2"],
        token_ceiling_r2=meta.get("token_ceiling_r2"),
        subset_ceiling_r2_without_token=meta.get("subset_ceiling_r2_without_token"),
    )


def _ceilings(
    terms: dict[str, np.ndarray], noise_std: float, y: np.ndarray, offset: np.ndarray, splits: np.ndarray
) -> dict:
    """Best achievable R^2 per tissue, Var(signal) / (Var(signal) + noise variance), for each modality subset.

    With the token term planted (terms["token"]), it belongs to the protein modality: a subset with protein
    includes it. Then also: its own ceiling, Var(token) / Var(y), and each subset's ceiling without it,
    i.e. for a model that cannot see it (pooled features: see the module docstring).

    Also measured: the R^2 of the oracle prediction offset + signal on the observed targets,
    over all transcripts and per split (a split's own value is the reference for a model scored on it).
    """
    total = terms["dna"] + terms["rna"] + terms["protein"]
    if "token" in terms:
        total = total + terms["token"]
    var_y = total.var(axis=0) + noise_std**2  # terms are independent of each other and of the noise

    def subset_ceilings(with_token: bool) -> dict[str, float]:
        out = {}
        for r in range(1, 4):
            for combo in itertools.combinations(MODALITIES, r):
                token = with_token and "token" in terms and "protein" in combo
                parts = [terms[m] for m in combo] + ([terms["token"]] if token else [])
                # Given only this subset, the other terms act like noise for the best predictor.
                out["+".join(combo)] = float(np.mean(sum(parts).var(axis=0) / var_y))
        return out

    per_tissue = total.var(axis=0) / var_y
    oracle = offset + total
    by_split = {s: mean_r2(y[splits == s], oracle[splits == s]) for s in SPLIT_ORDER}
    out = {
        "ceiling_r2": float(per_tissue.mean()),
        "ceiling_r2_per_tissue": per_tissue.tolist(),
        "ceiling_definition": (
            "Var(dna + rna + protein) / (Var(dna + rna + protein) + noise_std^2) per tissue, over all transcripts"
        ),
        "empirical_r2_of_true_signal": mean_r2(y, oracle),
        "empirical_r2_of_true_signal_by_split": by_split,
        "subset_ceiling_r2": subset_ceilings(with_token=True),
        "realised_variance_share": {m: float(np.mean(terms[m].var(axis=0) / var_y)) for m in terms},
    }
    if "token" in terms:
        out["ceiling_definition"] = (
            "Var(dna + rna + protein + token) / (Var(dna + rna + protein + token) + noise_std^2) per tissue, over all "
            "transcripts; the token term counts as protein in subset_ceiling_r2"
        )
        out["token_ceiling_r2"] = float(np.mean(terms["token"].var(axis=0) / var_y))
        out["token_ceiling_definition"] = "Var(token) / Var(y) per tissue, averaged over tissues: R^2 of the token term alone"
        out["subset_ceiling_r2_without_token"] = subset_ceilings(with_token=False)
    return out


def _letters(rng: np.random.Generator, n: int, p: Sequence[float]) -> str:
    return "".join(_BASES[rng.choice(4, size=n, p=np.asarray(p) / np.sum(p))])


def _draw_genes(rng: np.random.Generator, config: SyntheticConfig) -> list[dict]:
    """Gene ids, strands, promoters (oriented, with their features) and isoform counts."""
    k = np.arange(1, config.max_isoforms + 1)
    p_iso = 0.75 ** (k - 1)
    p_iso /= p_iso.sum()
    promoter_len = config.dna_window // 2
    genes = []
    for i in range(config.n_genes):
        gc = rng.uniform(0.3, 0.7)
        at_skew = rng.uniform(-0.5, 0.5)
        cpg_rate = rng.uniform(0.0, 0.06)
        p = [(1 - gc) / 2 * (1 + at_skew), gc / 2, gc / 2, (1 - gc) / 2 * (1 - at_skew)]
        promoter = np.array(list(_letters(rng, promoter_len, p)))
        sites = np.flatnonzero(rng.random(promoter_len - 1) < cpg_rate)
        promoter[sites], promoter[sites + 1] = "C", "G"
        promoter = "".join(promoter)
        genes.append(
            dict(
                id=f"ENSGSYN{i + 1:05d}",
                strand="+" if rng.random() < 0.5 else "-",
                promoter=promoter,
                dna_features=dna_features(promoter + "N" * promoter_len),
                n_isoforms=int(rng.choice(k, p=p_iso)),
                body=int(rng.integers(config.gene_body_length[0], config.gene_body_length[1] + 1)),
            )
        )
    return genes


def _layout_genome(rng: np.random.Generator, config: SyntheticConfig, genes: list[dict]) -> list[tuple[str, str]]:
    """Place genes on chromosomes (filling chrom/tss0 of each) and return (name, sequence) pairs.

    Each gene owns a footprint of its whole adapter window (promoter upstream, background
    downstream) plus its body, separated by background gaps, so no window sees another gene's
    promoter. The first gene of every chromosome is put on '-' and the last on '+', both with a
    short body close to the chromosome end, so their windows run off the end and get N padding
    (on the downstream side; the promoter always lies inside the chromosome).
    """
    half = config.dna_window // 2
    background = [0.295, 0.205, 0.205, 0.295]
    per_chrom = np.array_split(np.arange(len(genes)), config.n_chromosomes)
    chromosomes = []
    for c, members in enumerate(per_chrom):
        name = f"chr{c + 1}"
        parts: list[str] = []
        cursor = 0
        for j, gi in enumerate(members):
            g = genes[gi]
            g["chrom"] = name
            first, last = j == 0, j == len(members) - 1
            if first or last:
                g["strand"] = "-" if first else "+"
                g["body"] = int(rng.integers(200, half - 100))
            up = g["promoter"] if g["strand"] == "+" else reverse_complement(g["promoter"])
            if first:
                # '-' gene whose downstream half runs off the chromosome start.
                tss0 = g["body"] - 1 + int(rng.integers(0, 50))
                parts.append(_letters(rng, tss0 + 1, background) + up)
                cursor = tss0 + 1 + half
            else:
                gap = _letters(rng, int(rng.integers(300, 1200)), background)
                parts.append(gap)
                cursor += len(gap)
                down_len = max(half, g["body"]) if not last else g["body"] + int(rng.integers(0, 50))
                down = _letters(rng, down_len, background)
                if g["strand"] == "+":
                    tss0 = cursor + half
                    parts.append(up + down)
                else:
                    tss0 = cursor + down_len - 1
                    parts.append(down + up)
                cursor += half + down_len
            g["tss0"] = tss0
        chromosomes.append((name, "".join(parts)))
        assert cursor == len(chromosomes[-1][1])
    return chromosomes


def _draw_protein(rng: np.random.Generator, config: SyntheticConfig) -> tuple[str, str]:
    """A protein (starting with M, no stop) and its CDS (with a stop codon), codons uniform among synonyms.

    With the token term on, TOKEN_RESIDUE leaves the background and exactly TOKEN_MARKERS copies are put in
    afterwards (`_place_markers`), so its count is the same in every protein and only their order varies.
    """
    while True:  # box shares with s_his + s_asn + s_asp = 1.5 keep every base and dinucleotide count unchanged
        s = rng.uniform(0.1, 0.9, 2)
        s3 = 1.5 - s.sum()
        if 0.1 <= s3 <= 0.9:
            break
    box_mass = 0.1
    token = config.share_token > 0
    probs = {a: w for a, w in _BACKGROUND_AA.items() if not (token and a == TOKEN_RESIDUE)}
    norm = sum(probs.values()) / (1 - box_mass * len(_BOXES))
    probs = {a: w / norm for a, w in probs.items()}
    for (pyr, pur), share in zip(_BOXES, (s[0], s[1], s3)):
        probs[pyr], probs[pur] = box_mass * share, box_mass * (1 - share)
    letters = np.array(list(probs))
    p = np.array(list(probs.values()))
    length = int(rng.integers(config.protein_length[0], config.protein_length[1] + 1))
    body = "".join(letters[rng.choice(len(letters), size=length - 1 - (TOKEN_MARKERS if token else 0), p=p / p.sum())])
    protein = "M" + (_place_markers(rng, body) if token else body)
    cds = "".join(_CODONS[a][rng.integers(len(_CODONS[a]))] for a in protein) + _STOPS[rng.integers(3)]
    return protein, cds


def _place_markers(rng: np.random.Generator, body: str) -> str:
    """`body` with TOKEN_MARKERS copies of TOKEN_RESIDUE inserted: k ~ U{0..TOKEN_MARKERS // TOKEN_RUN} runs of
    TOKEN_RUN and the rest single, each piece in its own gap between body residues (so no two pieces touch)."""
    runs = int(rng.integers(0, TOKEN_MARKERS // TOKEN_RUN + 1))
    pieces = [TOKEN_RESIDUE * TOKEN_RUN] * runs + [TOKEN_RESIDUE] * (TOKEN_MARKERS - runs * TOKEN_RUN)
    pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    gaps = np.sort(rng.choice(len(body) + 1, size=len(pieces), replace=False))  # gap g: before body[g]
    out, prev = [], 0
    for gap, piece in zip(gaps, pieces):
        out += [body[prev:gap], piece]
        prev = gap
    return "".join(out) + body[prev:]


def _draw_transcripts(rng: np.random.Generator, config: SyntheticConfig, genes: list[dict]) -> list[dict]:
    """Isoforms per gene: shared TSS, own UTRs with own poly-U/poly-C tracts, one of the gene's CDS or non-coding."""
    transcripts = []
    for g in genes:
        n_prot = int(rng.integers(1, config.max_proteins_per_gene + 1))
        proteins = [_draw_protein(rng, config) for _ in range(n_prot)]
        for _ in range(g["n_isoforms"]):
            shares = rng.uniform(0.0, config.tract_share_max, len(TRACT_BASES))
            if rng.random() < config.noncoding_fraction:
                rna = _letters(rng, int(rng.integers(*config.noncoding_length, endpoint=True)), _UTR_BACKGROUND)
                rna = _insert_tracts(rng, config, rna, shares, len(rna))
                utr5 = cds = utr3 = protein = None
            else:
                protein, cds = proteins[int(rng.integers(n_prot))]
                utr5 = _letters(rng, int(rng.integers(*config.utr5_length, endpoint=True)), _UTR_BACKGROUND)
                utr3 = _letters(rng, int(rng.integers(*config.utr3_length, endpoint=True)), _UTR_BACKGROUND)
                # The tracts go into the 3'UTR (where AREs and C-rich elements sit) but their share is of the
                # whole transcript: mean pooling over tokens reads a share, not a count.
                utr3 = _insert_tracts(rng, config, utr3, shares, len(utr5) + len(cds) + len(utr3))
                rna = utr5 + cds + utr3
            # Every isoform starts at the gene's TSS; its other end lies within the gene body.
            span = int(rng.integers(min(200, g["body"]), g["body"] + 1))
            if g["strand"] == "+":
                start, end = g["tss0"] + 1, g["tss0"] + span
            else:
                start, end = g["tss0"] + 2 - span, g["tss0"] + 1
            transcripts.append(
                dict(id=f"ENSTSYN{len(transcripts) + 1:06d}", gene=g["id"], start=start, end=end,
                     rna=rna, utr5=utr5, cds=cds, utr3=utr3, protein=protein)
            )  # fmt: skip
    return transcripts


def _insert_tracts(
    rng: np.random.Generator, config: SyntheticConfig, region: str, shares: np.ndarray, n_rest: int
) -> str:
    """`region` with homopolymer tracts of each TRACT_BASES letter inserted at random places.

    Tract lengths are drawn until base b's tracts make up about shares[b] of the final transcript,
    whose other letters number `n_rest` (the region included): x_b / (n_rest + sum(x)) = shares[b].
    """
    lo, hi = config.tract_length
    wanted = shares * n_rest / (1.0 - float(np.sum(shares)))  # tract letters per base
    tracts = []
    for base, n_letters in zip(TRACT_BASES, wanted):
        placed = 0
        while n_letters - placed > (lo + hi) / 4:  # stop nearest to the wanted amount, on average
            k = int(rng.integers(lo, hi + 1))
            tracts.append(base * k)
            placed += k
    if not tracts:
        return region
    tracts = [tracts[i] for i in rng.permutation(len(tracts))]
    cuts = np.sort(rng.integers(0, len(region) + 1, len(tracts)))
    pieces, prev = [], 0
    for cut, tract in zip(cuts, tracts):
        pieces += [region[prev:cut], tract]
        prev = cut
    return "".join(pieces) + region[prev:]


# ---------------------------------------------------------------------------------------------
# A composition baseline: ridge regression on k-mer frequencies, per modality subset.


def kmer_frequencies(seqs: Sequence[str], ks: Sequence[int], alphabet: str = "ACGT") -> np.ndarray:
    """(n, sum(len(alphabet)**k)) overlapping k-mer frequencies; k-mers with a letter outside `alphabet` are skipped."""
    lut = np.full(256, -1, dtype=np.int64)
    for i, a in enumerate(alphabet):
        lut[ord(a)] = i
    a = len(alphabet)
    out = np.zeros((len(seqs), sum(a**k for k in ks)))
    for row, s in enumerate(seqs):
        codes = lut[np.frombuffer(s.encode(), dtype=np.uint8)]
        col = 0
        for k in ks:
            if len(codes) >= k:
                windows = np.lib.stride_tricks.sliding_window_view(codes, k)
                ok = (windows >= 0).all(axis=1)
                idx = (windows[ok] * (a ** np.arange(k - 1, -1, -1))).sum(axis=1)
                counts = np.bincount(idx, minlength=a**k)
                out[row, col : col + a**k] = counts / max(counts.sum(), 1)
            col += a**k
    return out


def ridge_fit_predict(
    x_tr: np.ndarray, y_tr: np.ndarray, groups_tr: np.ndarray, x_ev: np.ndarray, *, alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
) -> np.ndarray:
    """(n_ev, t) predictions of the ridge probe (fusion.probe: scikit-learn StandardScaler -> Ridge per target,
    alpha by 5-fold CV grouped by `groups_tr`, a target's missing training values left out of its fit)."""
    from fusion.probe import ProbeConfig, fit_probe

    names = [f"target_{j}" for j in range(y_tr.shape[1])]
    probe, _ = fit_probe(x_tr, y_tr, groups_tr, ProbeConfig(alphas=tuple(alphas)), names)
    return probe.predict(x_ev)


def mean_r2(y: np.ndarray, pred: np.ndarray) -> float:
    """fusion.metrics' mean per-target R^2 of `pred` against `y` (NaN = missing value)."""
    from fusion.metrics import regression_metrics

    ok = ~np.isnan(y)
    return float(regression_metrics(pred, np.nan_to_num(y), ok, [f"target_{j}" for j in range(y.shape[1])])["mean_r2"])


def composition_baseline(
    prepared_dir: str | Path, *, alphas: Sequence[float] = (1.0, 10.0, 100.0, 1000.0), evaluate_on: str = "test"
) -> dict[str, float]:
    """R^2 (mean over targets) of ridge on composition features for each of the 7 modality subsets.

    Features: DNA window 1-2-mer frequencies; RNA 1-3-mer frequencies; protein amino-acid
    frequencies plus a has-protein flag (all zero for non-coding). The ridge probe is fitted on train
    (alpha by gene-grouped CV there) and scored on `evaluate_on`.
    """
    from fusion.prepare.fasta import read_fasta

    manifest = load_prepared(prepared_dir)
    files = manifest.sequence_files
    frame = manifest.frame
    dna = read_fasta(files["dna"])
    rna = read_fasta(files["rna"])
    prot = read_fasta(files["protein"])
    has_prot = frame["protein_id"].notna().to_numpy()
    feats = {
        "dna": kmer_frequencies([dna[k] for k in frame["dna_id"]], (1, 2)),
        "rna": kmer_frequencies([rna[k] for k in frame["rna_id"]], (1, 2, 3)),
        "protein": np.hstack(
            [
                kmer_frequencies([prot[k] if ok else "" for k, ok in zip(frame["protein_id"], has_prot)], (1,), _AMINO),
                has_prot[:, None].astype(float),
            ]
        ),
    }
    return _subset_ridge(manifest, feats, alphas, evaluate_on)


def embedding_baseline(
    prepared_dir: str | Path,
    stores: dict[str, str | Path],
    *,
    alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
    evaluate_on: str = "test",
) -> dict[str, float]:
    """R^2 (mean over targets) of ridge on stored POOLED embeddings for each of the 7 modality subsets.

    `stores` maps each of MODALITIES to an embedcache store holding that modality's records.
    A sample without a record of a modality (a non-coding isoform's protein) gets zeros plus a
    presence flag. The ridge probe is fitted on train (alpha by gene-grouped CV there) and scored on `evaluate_on`.
    """
    from embedcache import open_store

    manifest = load_prepared(prepared_dir)
    feats = {}
    for m in MODALITIES:
        store = open_store(stores[m])
        present = manifest.present(m)
        x = np.zeros((len(manifest), store.embed_dim))  # (n, d)
        x[present] = store.pooled(manifest.keys(m))
        feats[m] = x if present.all() else np.hstack([x, present[:, None].astype(float)])
    return _subset_ridge(manifest, feats, alphas, evaluate_on)


def _subset_ridge(
    manifest: Manifest, feats: dict[str, np.ndarray], alphas: Sequence[float], evaluate_on: str
) -> dict[str, float]:
    """Per modality subset ("dna+rna", ...), mean R^2 on `evaluate_on` of the ridge probe on the concatenated (n, d_m) features."""
    y = manifest.targets().astype(np.float64)
    split = manifest.frame[manifest.split_column].to_numpy()
    genes = manifest.frame["gene_id"].astype(str).to_numpy()
    tr, ev = split == "train", split == evaluate_on
    out = {}
    for r in range(1, 4):
        for combo in itertools.combinations(MODALITIES, r):
            x = np.hstack([feats[m] for m in combo])
            out["+".join(combo)] = mean_r2(y[ev], ridge_fit_predict(x[tr], y[tr], genes[tr], x[ev], alphas=alphas))
    return out
