"""`fusion`: prepare IsoFormer data, train the fusion model on cached stores, evaluate, predict, ablate."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from embedcache.location import parse_storage_options
from cli.common import HelpFormatter, add_debug_flag, run_main
from fusion.data import FEATURE_DEVICES, FEATURES, LOADINGS, DataConfig
from fusion.errors import ConfigError, checked_config
from fusion.models import AGGREGATORS, FusionModelConfig
from fusion.models.config import HEADS
from fusion.probe import ProbeConfig
from fusion.train import TrainConfig

MODEL_OPTIONS = ("d_model", "n_layers", "n_heads", "n_latents", "dropout", "head_hidden", "head")
MODEL_DEFAULTS = {name: f.default for name, f in FusionModelConfig.__dataclass_fields__.items()}  # the config's own defaults
TRAIN_OPTIONS = ("epochs", "lr", "weight_decay", "warmup_fraction", "min_lr_ratio", "grad_clip", "early_stopping_patience", "amp", "device")


def parse_pairs(items: list[str] | dict[str, str] | None, flag: str, value: str, example: str) -> dict[str, str]:
    """MODALITY=VALUE flags (repeated), or a TOML table, as a dict; e.g. --store dna=stores/dna.zarr."""
    if isinstance(items, dict):
        return dict(items)
    pairs = {}
    for item in items or []:
        modality, sep, given = item.partition("=")
        if not sep or not modality or not given:
            raise ConfigError(f"{flag} {item!r}: expected MODALITY={value}, e.g. {example}")
        pairs[modality] = given
    return pairs


def parse_stores(items: list[str] | None) -> dict[str, str]:
    return parse_pairs(items, "--store", "PATH", "rna=stores/rna.zarr")


def parse_layers(items: list[str] | dict | None) -> dict[str, int]:
    """--layer MODALITY=I (repeated) as {modality: hidden-state index}."""
    pairs = parse_pairs(items, "--layer", "I", "protein=12")
    try:
        return {m: int(v) for m, v in pairs.items()}
    except ValueError:
        bad = next(f"{m}={v}" for m, v in pairs.items() if not str(v).lstrip("-").isdigit())
        raise ConfigError(f"--layer {bad!r}: a layer is an integer hidden-state index, e.g. protein=12 or protein=-1") from None


_LAYER_HELP = ("hidden state to read from a store built with several (embedcache build --layer 6 -1), e.g. protein=6; "
               "repeat per modality; negative counts from the last layer (recorded in run.json; default: the store's only layer)")


def _add_run_args(p: argparse.ArgumentParser, *, aggregator_help: str) -> None:
    """What `train` and `finetune` share: config file, run directory, aggregator, seed, data, model, training."""
    p.add_argument("--config", help="TOML file with any of these options (flags given on the command line win)")
    p.add_argument("--out", required=False, help="run directory")
    p.add_argument("--aggregator", choices=list(AGGREGATORS), default="cross-attention", help=aggregator_help)
    p.add_argument("--seed", type=int, default=0, help="seed for weights and shuffling")
    _add_data_args(p)
    _add_model_args(p)
    _add_train_args(p)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", help="prepared directory (with prepare.json) or a manifest table (CSV/TSV/Parquet with prepare.json beside it)")
    p.add_argument("--store", action="append", metavar="MODALITY=STORE", help="embedding store of one modality, a path or URL (s3://...); repeat per modality (e.g. --store dna=dna.zarr --store rna=rna.zarr)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", dest="storage_options", help="option for remote stores' filesystem (repeatable), e.g. endpoint_url=http://127.0.0.1:9000; recorded in run.json, so give credentials through the environment (AWS_ACCESS_KEY_ID, ...)")
    p.add_argument("--layer", action="append", metavar="MODALITY=I", dest="layers", help=_LAYER_HELP)
    p.add_argument("--modalities", help="comma-separated subset of the stores' modalities to feed the model (default: all)")
    p.add_argument("--features", choices=FEATURES, default="tokens", help="per-token rows with masks, or one pooled vector per modality")
    p.add_argument("--max-tokens", type=int, help="average longer per-token inputs in consecutive equal groups down to this many rows (recorded in run.json; default: all rows). "
                   "Each store is reduced once, on first use, into an array in the store's per-token dtype (fp16 unless built float32) in --reduced-dir that later runs and every epoch reuse")
    p.add_argument("--reduced-dir", help="directory of the --max-tokens reductions, named by store content, layer and max tokens "
                   "(default: $EMBEDCACHE_CACHE/reduced, else ~/.cache/embedcache/reduced); a store that changed gets a new one")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--loading", choices=LOADINGS, default="auto", help="per-token data: auto = RAM when under --memory-gb, else streamed from the store")
    p.add_argument("--memory-gb", type=float, default=8.0, help="per-token data above this is streamed under --loading auto")
    p.add_argument("--feature-device", choices=FEATURE_DEVICES, default="auto",
                   help="where batches are made. auto: pooled vectors and --max-tokens rows held in memory go to the training device once, "
                   "when they fit --device-memory-gb, and each batch is an index gather there (no host collation); otherwise (streamed or "
                   "unreduced rows, too large) batches are made on the host, in pinned memory for CUDA so the copy overlaps the step. "
                   "device: always the former (an error if some rows cannot be); host: always the latter. The log and run.json say which")
    p.add_argument("--device-memory-gb", type=float, help="features kept on a CUDA device up to this size (default: half its memory)")
    p.add_argument("--workers", type=int, default=0, help="torch DataLoader worker processes that read and assemble batches (forked: Linux); 0 = batches made in this process, by 2 background threads. For streamed per-token data: about one per core the training step leaves free (figures: benchmarks/README.md)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", type=int, default=128, help="width every modality is projected to")
    p.add_argument("--n-layers", type=int, default=2, help="attention layers / conv blocks of the aggregator")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads (must divide --d-model)")
    p.add_argument("--n-latents", type=int, default=16, help="perceiver latents / c-abstractor queries")
    p.add_argument("--dropout", type=float, default=MODEL_DEFAULTS["dropout"], help="dropout in the aggregator and head")
    p.add_argument("--head-hidden", type=int, default=MODEL_DEFAULTS["head_hidden"], help="hidden width of the MLP head")
    p.add_argument("--head", choices=HEADS, default=MODEL_DEFAULTS["head"], help="residual = MLP + a linear skip (contains a linear probe on the fused vector)")
    p.add_argument("--pooled-probe", choices=("auto", "on", "off"), default="auto",
                   help="add a linear map of each modality's mean row, standardised between samples, to the predictions; "
                        "auto: on for --features tokens, off for pooled vectors (docs/fusion.md)")  # fmt: skip


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (not on biases / norms)")
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction, help="share of steps with linear warmup")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine decays to lr x this")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0 = off)")
    p.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience, help="epochs without validation improvement before stopping (0 = off)")
    p.add_argument("--amp", default=d.amp, choices=("auto", "off", "bf16", "fp16"), help="autocast: auto = bf16 on CUDA, off on CPU")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description="Train and evaluate IsoFormer-style fusion models on cached embedding stores.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = HelpFormatter

    prep = sub.add_parser("prepare", help="make FASTAs + a manifest from the IsoFormer CSV, or synthetic data", description="Data preparation.")
    psub = prep.add_subparsers(dest="source", required=True)
    iso = psub.add_parser("isoformer", formatter_class=fmt, help="the IsoFormer CSV (GTEx_final.csv) + a genome FASTA",
                          description="Write dna.fa (one TSS-centred window per gene), rna.fa, protein.fa, manifest.csv and prepare.json.")
    iso.add_argument("--csv", required=True, help="GTEx_final.csv of InstaDeepAI/multi_omics_transcript_expression (or the same schema)")
    iso.add_argument("--genome", required=True, help="genome FASTA (hg38); chromosome names must match the CSV's chr column")
    iso.add_argument("--out", required=True, help="output directory")
    iso.add_argument("--dna-window", type=int, default=196_608, help="bp of DNA around each gene's TSS (Enformer: 196608)")
    iso.add_argument("--target-transform", default="log1p", choices=("log1p", "standardize", "log1p-standardize", "none"), help="target transform (standardisation fitted on train)")
    iso.add_argument("--protein-coding-only", action="store_true", help="keep coding transcripts only")
    iso.set_defaults(func=run_prepare_isoformer)
    syn = psub.add_parser("synthetic", formatter_class=fmt, help="synthetic data in the IsoFormer schema with planted signal per modality",
                          description="Write GTEx_final.csv + genome.fa + synthetic.json (known best R^2); then run `fusion prepare isoformer` on them.")
    syn.add_argument("--out", required=True, help="output directory")
    syn.add_argument("--n-genes", type=int, default=400, help="genes (1-8 isoforms each)")
    syn.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    syn.set_defaults(func=run_prepare_synthetic)
    man = psub.add_parser("manifest", formatter_class=fmt, help="describe your own manifest table (writes prepare.json beside it)",
                          description="Check a manifest table (CSV/TSV/Parquet: one row per sample) and write prepare.json beside it, "
                                      "naming its key, target and split columns, so that `--manifest TABLE` can be used. Nothing is written if a check fails.")
    man.add_argument("table", help="the manifest table")
    man.add_argument("--key", action="append", required=True, metavar="MODALITY=COLUMN",
                     help="column holding each sample's record id in a modality's store; repeat per modality (e.g. --key rna=rna_id)")
    man.add_argument("--targets", help="comma-separated target columns, in output order (default: every column that is not a sample id, key, split or group column)")
    man.add_argument("--sample-id-column", default="sample_id", help="column of unique sample ids")
    man.add_argument("--split-column", default="split", help="column of train / validation / test")
    man.add_argument("--group-column", help="without a split column: assign whole groups of this column (e.g. gene_id) to train/validation/test")
    man.add_argument("--split-fractions", default="0.8,0.1,0.1", help="with --group-column: shares of groups in train, validation, test")
    man.add_argument("--split-seed", type=int, default=0, help="with --group-column: seed of the group assignment")
    man.set_defaults(func=run_prepare_manifest)

    tr = sub.add_parser("train", formatter_class=fmt, help="train on cached stores", description="Train a fusion model on cached embeddings; writes a run directory with checkpoint, metrics, predictions and plots. A TOML --config may give any option (same names, with underscores).")
    _add_run_args(tr, aggregator_help="how modality tokens are fused")
    tr.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (default: progress bars are shown)")
    tr.set_defaults(func=run_train_cmd)

    ev = sub.add_parser("evaluate", formatter_class=fmt, help="metrics of a run (on its data or a new manifest / stores)", description="Evaluate a trained run; stores must have the fingerprints it was trained on.")
    ev.add_argument("run", help="run directory of `fusion train` or `fusion finetune`")
    ev.add_argument("--manifest", help="another manifest (default: the run's)")
    ev.add_argument("--store", action="append", metavar="MODALITY=STORE", help="replace a modality's store")
    ev.add_argument("--out", help="directory for metrics.json, predictions.csv and report.md (default: a new RUN/evaluate-<UTC time>; never the run's own files)")
    ev.add_argument("--trust-remote-code", action="store_true", help="finetune runs: allow the encoders' own code (never taken from the run or the stores)")
    ev.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar per split (default: shown)")
    ev.set_defaults(func=run_evaluate_cmd)

    pr = sub.add_parser("predict", formatter_class=fmt, help="predictions for a manifest", description="Predict every sample of a manifest with a trained run.")
    pr.add_argument("run", help="run directory of `fusion train` or `fusion finetune`")
    pr.add_argument("--out", required=True, help="predictions CSV to write")
    pr.add_argument("--manifest", help="manifest to predict (default: the run's)")
    pr.add_argument("--store", action="append", metavar="MODALITY=STORE", help="replace a modality's store")
    pr.add_argument("--trust-remote-code", action="store_true", help="finetune runs: allow the encoders' own code (never taken from the run or the stores)")
    pr.set_defaults(func=run_predict_cmd)

    ft = sub.add_parser("finetune", formatter_class=fmt, help="train with live encoders (frozen, full, LoRA or last-n blocks)",
                        description="The fusion model of `fusion train`, fed by the stores' encoders run live on the sequences kept in the stores "
                                    "(rebuilt from each store's provenance; other weights are refused). Writes the same run directory as `fusion train`. "
                                    "A TOML --config may give any option (same names, with underscores; encoder_mode as a table).")
    _add_run_args(ft, aggregator_help="how modality tokens are fused (ignored with --init-from: the run's model is used)")
    ft.add_argument("--encoder-mode", action="append", metavar="MODALITY=MODE",
                    help="how a modality's encoder trains: frozen, full, lora (adapters on the attention projections) or last-n (the last --last-n blocks); repeat per modality; unnamed modalities are frozen")
    ft.add_argument("--last-n", type=int, default=1, help="blocks that train under --encoder-mode M=last-n, counted back from the block whose output the store used")
    ft.add_argument("--encoder-lr", type=float, default=1e-5, help="peak learning rate of encoder parameters (--lr is the fusion model's); same warmup and cosine decay")
    ft.add_argument("--grad-accum", type=int, default=1, help="batches whose gradients are summed into one optimiser step")
    ft.add_argument("--gradient-checkpointing", action="store_true", help="recompute trained encoders' activations in backward (less memory, more compute)")
    ft.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters")
    ft.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling: the update is multiplied by alpha / rank")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA adapters' input")
    ft.add_argument("--trust-remote-code", action="store_true",
                    help="allow an encoder's own code (auto_map modules in its model directory) to run; a store's record never allows it")
    ft.add_argument("--init-from", metavar="RUN", help="start the fusion model (weights and feature standardisation) from a `fusion train` run on the same stores (fingerprints must match)")
    ft.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (default: progress bars are shown)")
    ft.set_defaults(func=run_finetune_cmd)

    ab = sub.add_parser("ablate", formatter_class=fmt, help="modality subsets x aggregators x seeds", description="Train every modality subset with each aggregator and seed on features loaded once; writes ablation.md, ablation.csv and ablation.png (mean +- std over seeds).")
    ab.add_argument("--config", help="TOML file with any of these options")
    ab.add_argument("--out", required=False, help="output directory")
    ab.add_argument("--aggregators", default="cross-attention,mean-concat", help=f"comma-separated, from: {', '.join(AGGREGATORS)}")
    ab.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ab.add_argument("--subsets", help="comma-separated modality subsets, modalities joined by '+', e.g. dna,rna,dna+rna+protein (default: every non-empty subset of the stores' modalities)")
    ab.add_argument("--no-probe", dest="probe", action="store_false", help="leave out the ridge-probe rows")
    ab.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (the k-of-N lines stay)")
    _add_data_args(ab)
    _add_model_args(ab)
    _add_train_args(ab)
    ab.set_defaults(func=run_ablate_cmd)

    pb = sub.add_parser("probe", formatter_class=fmt, help="ridge-regression baseline on pooled features",
                        description="Ridge regression per target on the stores' pooled vectors (scikit-learn: StandardScaler -> Ridge, alpha by "
                                    "GroupKFold cross-validation by gene on the training split); writes the same metrics.json, predictions.csv "
                                    "and report.md as `fusion train`, plus probe.json. A TOML --config may give any option.")
    pb.add_argument("--config", help="TOML file with any of these options (flags given on the command line win)")
    pb.add_argument("--out", required=False, help="run directory")
    pb.add_argument("--manifest", help="prepared directory (with prepare.json) or a manifest table")
    pb.add_argument("--store", action="append", metavar="MODALITY=STORE", help="embedding store of one modality; repeat per modality")
    pb.add_argument("--storage-option", action="append", metavar="KEY=VALUE", dest="storage_options", help="option for remote stores' filesystem (repeatable), e.g. endpoint_url=http://127.0.0.1:9000")
    pb.add_argument("--layer", action="append", metavar="MODALITY=I", dest="layers", help=_LAYER_HELP)
    pb.add_argument("--modalities", help="comma-separated subset of the stores' modalities (default: all)")
    pb.add_argument("--alphas", default=",".join(f"{a:g}" for a in ProbeConfig().alphas), help="comma-separated ridge penalties tried per target")
    pb.add_argument("--folds", type=int, default=ProbeConfig().folds, help="GroupKFold folds on the training split")
    pb.add_argument("--group-column", default=ProbeConfig().group_column, help="manifest column whose groups (genes) never straddle folds")
    pb.set_defaults(func=run_probe_cmd)
    add_debug_flag(parser)
    return parser


def apply_toml(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str] | None:
    """Use a --config TOML's values as defaults of the subcommand, so command-line flags still win.

    Every value is checked as its flag would be (type, choices); a problem names the file, key and value.
    """
    args, _ = parser.parse_known_args(argv)
    if not getattr(args, "config", None):
        return argv
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"--config {args.config!r}: " + ("is a directory" if path.is_dir() else "no such file"))
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{args.config}: not valid TOML: {e}") from e
    sub = parser._subparsers._group_actions[0].choices[args.command]
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "func", "config", "debug")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"{args.config}: unknown option(s) {unknown} for `fusion {args.command}`; valid: {sorted(actions)}")
    for key, value in values.items():
        check_toml_value(args.config, key, value, actions[key])
    for key in ("store", "encoder_mode", "layers"):  # [store] table: dna = "..."
        if isinstance(values.get(key), dict):
            values[key] = [f"{k}={v}" for k, v in values[key].items()]
    sub.set_defaults(**values)
    return argv


def check_toml_value(path: str, key: str, value: object, action: argparse.Action) -> None:
    """The TOML value of `key` as its flag would accept it, or a ConfigError naming file, key and value."""
    def fail(expected: str) -> None:
        shown = json.dumps(value) if isinstance(value, (bool, str, int, float)) else repr(value)  # as TOML writes it
        raise ConfigError(f"{path}: {key} = {shown}: expected {expected}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            fail("true or false")
    elif isinstance(action, argparse._AppendAction):  # --store / --encoder-mode / --layer: a table or a list of "MODALITY=VALUE"
        scalar = (str, int) if key == "layers" else (str,)  # [layers] protein = 6
        if not (isinstance(value, dict) and all(isinstance(v, scalar) and not isinstance(v, bool) for v in value.values())) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            fail('a table (dna = "...") or a list of "MODALITY=VALUE" strings')
    elif action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
    elif not isinstance(value, str):
        fail("a string")
    if action.choices is not None and not isinstance(action, argparse._AppendAction) and value not in action.choices:
        fail(f"one of {list(action.choices)}")


def data_config(args: argparse.Namespace, seed: int = 0) -> DataConfig:
    if not args.manifest or not args.store:
        raise ConfigError("--manifest and at least one --store MODALITY=STORE are required (on the command line or in --config)")
    return checked_config(
        DataConfig,
        "data options",
        manifest=args.manifest,
        stores=parse_stores(args.store),
        storage_options=parse_storage_options(getattr(args, "storage_options", None)),
        modalities=tuple(m for m in (args.modalities or "").split(",") if m),
        layers=parse_layers(args.layers),
        features=args.features,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        loading=args.loading,
        memory_gb=args.memory_gb,
        reduced_dir=args.reduced_dir,
        feature_device=args.feature_device,
        device_memory_gb=args.device_memory_gb,
        workers=args.workers,
        seed=seed,
    )


def model_options(args: argparse.Namespace) -> dict:
    options = {k: getattr(args, k) for k in MODEL_OPTIONS}
    if args.pooled_probe != "auto":  # else build_model decides from the features
        options["pooled_probe"] = args.pooled_probe == "on"
    return options


def train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return checked_config(TrainConfig, "training options", **{k: getattr(args, k) for k in TRAIN_OPTIONS}, batch_size=args.batch_size, seed=seed)


def _require_out(args: argparse.Namespace) -> str:
    if not args.out:
        raise ConfigError("--out is required (on the command line or in --config)")
    return args.out


def run_prepare_isoformer(args: argparse.Namespace) -> int:
    from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer

    config = IsoformerPrepareConfig(dna_window=args.dna_window, target_transform=args.target_transform, protein_coding_only=args.protein_coding_only)
    prepared = prepare_isoformer(args.csv, args.genome, args.out, config)
    print(f"wrote {prepared.out_dir}: {prepared.counts}")
    return 0


def run_prepare_synthetic(args: argparse.Namespace) -> int:
    from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic

    info = generate_synthetic(args.out, SyntheticConfig(n_genes=args.n_genes, seed=args.seed))
    print(f"wrote {info.csv_path} and {info.genome_path}: {info.n_genes} genes, {info.n_transcripts} transcripts; "
          f"best achievable mean R^2 {info.ceiling_r2:.3f}; prepare with --dna-window {info.dna_window}")
    return 0


def run_prepare_manifest(args: argparse.Namespace) -> int:
    from fusion.prepare.manifest import GroupSplit, write_prepare_json

    group = None
    if args.group_column:
        try:
            fractions = tuple(float(x) for x in args.split_fractions.split(","))
        except ValueError as e:
            raise ConfigError(f"--split-fractions {args.split_fractions!r}: expected three comma-separated numbers, e.g. 0.8,0.1,0.1") from e
        group = GroupSplit(column=args.group_column, fractions=fractions, seed=args.split_seed)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    path, manifest = write_prepare_json(
        args.table, key_columns=parse_pairs(args.key, "--key", "COLUMN", "rna=rna_id"), targets=targets,
        sample_id_column=args.sample_id_column, split_column=args.split_column, group_split=group,
    )  # fmt: skip
    counts = manifest.frame[manifest.split_column].value_counts().to_dict() if manifest.split_column else {}
    print(f"wrote {path}: {len(manifest)} samples {counts}, modalities {sorted(manifest.key_columns)}, "
          f"{len(manifest.target_columns)} targets ({', '.join(manifest.target_columns[:5])}{', ...' if len(manifest.target_columns) > 5 else ''})")
    return 0


def run_train_cmd(args: argparse.Namespace) -> int:
    from fusion.experiment import run_train

    result = run_train(data_config(args, args.seed), args.aggregator, model_options(args), train_config(args, args.seed), _require_out(args), progress=args.progress)
    test = result.metrics["test"]
    print(f"test: mean R^2 {test['mean_r2']:.4f}, mean Spearman {test['mean_spearman']:.4f}; report: {result.run_dir / 'report.md'}")
    return 0


def parse_encoder_modes(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    return parse_pairs(items, "--encoder-mode", "MODE", "rna=lora")


def run_finetune_cmd(args: argparse.Namespace) -> int:
    from fusion.finetune import FinetuneConfig, run_finetune

    finetune = checked_config(
        FinetuneConfig,
        "finetune options",
        encoder_modes=parse_encoder_modes(args.encoder_mode),
        last_n=args.last_n,
        encoder_lr=args.encoder_lr,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        init_from=args.init_from,
    )
    train = checked_config(TrainConfig, "training options", **{**train_config(args, args.seed).to_dict(), "grad_accum": args.grad_accum})
    result = run_finetune(
        data_config(args, args.seed), args.aggregator, model_options(args), train, finetune, _require_out(args),
        trust_remote_code=args.trust_remote_code, progress=args.progress,
    )
    test = result.metrics["test"]
    print(f"test: mean R^2 {test['mean_r2']:.4f}, mean Spearman {test['mean_spearman']:.4f}; report: {result.run_dir / 'report.md'}")
    return 0


def run_evaluate_cmd(args: argparse.Namespace) -> int:
    from fusion.experiment import run_evaluate

    out, metrics = run_evaluate(args.run, manifest=args.manifest, stores=parse_stores(args.store), out=args.out,
                                trust_remote_code=args.trust_remote_code, progress=args.progress)
    for split, m in metrics.items():
        print(f"{split}: mean R^2 {m['mean_r2']:.4f}, mean Spearman {m['mean_spearman']:.4f}, n {m['n_samples']}")
    print(f"written: {out}")
    return 0


def run_predict_cmd(args: argparse.Namespace) -> int:
    from fusion.experiment import run_predict

    print(run_predict(args.run, args.out, manifest=args.manifest, stores=parse_stores(args.store), trust_remote_code=args.trust_remote_code))
    return 0


def run_ablate_cmd(args: argparse.Namespace) -> int:
    from fusion.ablation import run_ablation

    seeds = parse_ints(args.seeds, "--seeds")
    aggregators = [a for a in args.aggregators.split(",") if a]
    unknown = [a for a in aggregators if a not in AGGREGATORS]
    if unknown or not aggregators:
        raise ConfigError(f"--aggregators {args.aggregators!r}: unknown {unknown}; choose from {list(AGGREGATORS)}")
    data = data_config(args)
    markdown, _ = run_ablation(data, aggregators, seeds, model_options(args), train_config(args, seeds[0]), _require_out(args),
                               subsets=parse_subsets(args.subsets, data.used_modalities),
                               probe=ProbeConfig() if args.probe else None, progress=args.progress)
    print(markdown)
    print(f"written: {Path(args.out) / 'ablation.md'}")
    return 0


def parse_subsets(text: str | None, modalities: tuple[str, ...]) -> list[tuple[str, ...]] | None:
    """--subsets dna,rna+protein as [("dna",), ("rna", "protein")], each checked against the stores given."""
    if not text:
        return None
    subsets = []
    for item in (t.strip() for t in text.split(",")):
        subset = tuple(m.strip() for m in item.split("+"))
        unknown = [m for m in subset if m not in modalities]
        if not item or unknown or len(set(subset)) != len(subset):
            raise ConfigError(f"--subsets {text!r}: subset {item!r} is not modalities of {list(modalities)} joined by '+' (each once)")
        subsets.append(subset)
    return list(dict.fromkeys(subsets))


def run_probe_cmd(args: argparse.Namespace) -> int:
    from fusion.probe import run_probe

    if not args.manifest or not args.store:
        raise ConfigError("--manifest and at least one --store MODALITY=STORE are required (on the command line or in --config)")
    data = checked_config(DataConfig, "data options", manifest=args.manifest, stores=parse_stores(args.store), features="pooled",
                          storage_options=parse_storage_options(getattr(args, "storage_options", None)),
                          modalities=tuple(m for m in (args.modalities or "").split(",") if m), layers=parse_layers(args.layers))
    config = ProbeConfig(alphas=tuple(float(a) for a in str(args.alphas).split(",") if a), folds=args.folds, group_column=args.group_column)
    result = run_probe(data, _require_out(args), config)
    test = result.metrics["test"]
    print(f"test: mean R^2 {test['mean_r2']:.4f}, mean Spearman {test['mean_spearman']:.4f}; report: {result.run_dir / 'report.md'}")
    return 0


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from e
    if not values:
        raise ConfigError(f"{flag} {text!r}: expected at least one integer")
    return values


# Fusion runs do not resume (fusion.run): say what an interrupted run leaves behind.
INTERRUPTED = (
    "fusion runs do not resume: an interrupted run directory keeps status 'training' in run.json and "
    "evaluate / predict refuse it; run the same command again to train from the start"
)


def main(argv: list[str] | None = None) -> int:
    return run_main(create_parser(), argv, interrupted=INTERRUPTED, load_config=apply_toml)


if __name__ == "__main__":
    sys.exit(main())
