"""One fusion run, whatever feeds it: prepare -> fit -> evaluate -> report, and its manifest `run.json`.

`fusion train` (cached features) and `fusion finetune` (live encoders) are the same pipeline; they
differ only in their `Feed`, i.e. where features come from:

    CachedFeed  features read from the stores (fusion.data.open_batches); the model is the FusionModel
    LiveFeed    (fusion.finetune) the stores' encoders run live; the model is an EndToEndModel

A run directory describes itself:

    run.json        the run manifest (`RunManifest`): mode, status, run_id, and the one copy of the
                    data, model, train (and finetune) configs, the stores' fingerprints and loading.
                    Paths in it are absolute (relative ones are read relative to the run directory),
                    so `fusion evaluate RUN` works from any directory.
    checkpoint.pt   best weights (fusion.checkpoint); `extra["run"]` = {"manifest": "run.json",
                    "run_id": ...} ties it to the manifest it belongs to.
    report.md, metrics.json, predictions.csv, plots, history.csv, log.txt
                    (written by fusion.train / fusion.report; the report's inputs and configuration
                    sections are read from run.json, the only place the configs are written)

`status` is "training" from the moment run.json is written and "complete" once the report is: a
run that was interrupted or failed stays "training", and `open_run` (evaluate, predict,
--init-from) refuses it instead of reading a half-written directory as a finished one. Runs do
not resume: an interrupted run is trained again from the start.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fusion.batch import Batch
from fusion.checkpoint import check_fingerprints, load_checkpoint
from fusion.data import DataConfig, StoreBatches, open_batches
from fusion.errors import ConfigError, RunError, checked_config
from fusion.models import FusionModel, FusionModelConfig, input_dims_from_dict
from fusion.models.fusion_model import fit_feature_stats_
from fusion.prepare.manifest import Manifest, load_manifest, load_prepared
from fusion.report import write_report
from embedcache.encoders.base import transformers_progress
from embedcache.location import is_url
from fusion.train import TrainConfig, TrainResult, evaluate_run, resolve_amp, resolve_device, seed_everything, train

Log = Callable[[str], None]
RUN_FILE = "run.json"
RUN_FORMAT = "fusion-run"
RUN_FORMAT_VERSION = 2
MODES = ("cached", "finetune")
RUN_FIELDS = (
    "format", "format_version", "mode", "status", "run_id", "created_utc", "data", "model", "train",
    "finetune", "encoder_modes", "encoders", "feature_stats", "fingerprints", "loading", "resolved",
)  # fmt: skip
STATUSES = ("training", "complete")
SPLITS = ("train", "validation", "test")


def read_manifest(path: str | Path) -> Manifest:
    """A prepared directory (prepare.json inside) or a manifest table with prepare.json beside it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"manifest {str(path)!r} does not exist: give a prepared directory (prepare.json inside) or a manifest "
            f"table (CSV, TSV or Parquet) with prepare.json beside it"
        )
    return load_prepared(path) if path.is_dir() else load_manifest(path)


def build_model(batches: StoreBatches, aggregator: str, model_options: dict) -> FusionModel:
    """A fusion model whose input dimensions come from the stores, never from flags. Per-token rows (from stores
    or live encoders) get the pooled probe (`FusionModelConfig.pooled_probe`) unless `model_options` says otherwise;
    pooled vectors (one token, standardised between samples already) do not."""
    pooled_probe = batches.config.features == "tokens"
    config = checked_config(
        FusionModelConfig,
        "model options",
        modalities=batches.modalities,
        input_dims=input_dims_from_dict(batches.input_dims, batches.modalities),
        n_targets=len(batches.target_names),
        target_names=tuple(batches.target_names),
        aggregator=aggregator,
        **{"pooled_probe": pooled_probe, **model_options},
    )
    return FusionModel(config)


# -- the run manifest --------------------------------------------------------------------------------


def portable_data(data: DataConfig) -> DataConfig:
    """The data config with absolute paths, as run.json keeps it (the run may be used from anywhere)."""
    return DataConfig.from_dict(
        {**data.to_dict(), "manifest": _absolute(data.manifest), "stores": {m: _absolute(p) for m, p in data.stores.items()}}
    )


def _absolute(path: str) -> str:
    return path if is_url(path) else os.path.abspath(path)


def _resolve(path: str, run_dir: Path) -> str:
    return path if is_url(path) or os.path.isabs(path) else str(run_dir / path)


@dataclass(frozen=True)
class RunManifest:
    """What a run was trained on and how: the content of run.json."""

    mode: str  # cached (`fusion train`) | finetune (`fusion finetune`)
    data: DataConfig  # manifest and stores (absolute paths), features, batch size, loading
    model: FusionModelConfig  # the fusion model, with input dims read from the stores
    train: TrainConfig  # optimisation
    fingerprints: dict[str, str]  # modality -> fingerprint of the store the run was trained on
    loading: dict[str, str]  # modality -> memory | stream | pooled | live
    finetune: dict | None = None  # finetune: FinetuneConfig.to_dict(); cached: None
    encoder_modes: dict[str, str] = field(default_factory=dict)  # finetune: modality -> frozen | full | lora | last-n
    encoders: dict = field(default_factory=dict)  # finetune: per modality, mode and provenance of the live encoder
    feature_stats: str = ""  # where the feature standardisation came from
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the checkpoint names it: checkpoint and manifest belong together
    status: str = "training"  # training (also: interrupted or failed) | complete (report written)
    resolved: dict = field(default_factory=dict)  # complete runs: what train() resolved (device, amp, steps, parameters); {} in runs before it was kept here
    created_utc: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "mode": self.mode,
            "status": self.status,
            "run_id": self.run_id,
            "created_utc": self.created_utc,
            "data": self.data.to_dict(),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "finetune": self.finetune,
            "encoder_modes": self.encoder_modes,
            "encoders": self.encoders,
            "feature_stats": self.feature_stats,
            "fingerprints": self.fingerprints,
            "loading": self.loading,
            "resolved": self.resolved,
        }

    def write(self, run_dir: Path) -> Path:
        """run.json, atomically: a reader never sees half a manifest."""
        path = run_dir / RUN_FILE
        tmp = path.with_name(f".{RUN_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunManifest":
        """run.json of `run_dir`; every problem names the file and the field."""
        run_dir = Path(run_dir)
        path = run_dir / RUN_FILE
        if not run_dir.is_dir():
            raise RunError(f"run directory {str(run_dir)!r} " + ("is a file" if run_dir.exists() else "does not exist"))
        if not path.is_file():
            raise RunError(f"{run_dir} is not a fusion run directory: no {RUN_FILE}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
            raise RunError(f"{path}: format is {d.get('format') if isinstance(d, dict) else type(d).__name__!r}, expected {RUN_FORMAT!r}")
        if d.get("format_version") != RUN_FORMAT_VERSION:
            raise RunError(f"{path}: run format_version {d.get('format_version')!r}; this code reads version {RUN_FORMAT_VERSION} (train the run again)")
        known = set(RUN_FIELDS)
        unknown, missing = sorted(set(d) - known), sorted({"mode", "status", "run_id", "data", "model", "train"} - set(d))
        if unknown or missing:
            raise RunError(f"{path}: unknown field(s) {unknown}, missing field(s) {missing}; fields of a run manifest: {sorted(known)}")
        if d["mode"] not in MODES or d["status"] not in STATUSES:
            raise RunError(f"{path}: mode {d['mode']!r} / status {d['status']!r}; expected a mode in {list(MODES)} and a status in {list(STATUSES)}")
        try:
            data = DataConfig.from_dict(d["data"])
            data = DataConfig.from_dict(
                {**data.to_dict(), "manifest": _resolve(data.manifest, run_dir), "stores": {m: _resolve(p, run_dir) for m, p in data.stores.items()}}
            )
            model = FusionModelConfig.from_dict(d["model"])
            train_config = TrainConfig.from_dict(d["train"])
        except (TypeError, ValueError) as e:  # the configs' own checks, on a hand-edited or foreign file
            raise RunError(f"{path}: {e}") from e
        rest = {k: d[k] for k in ("fingerprints", "loading", "finetune", "encoder_modes", "encoders", "feature_stats", "run_id", "status", "created_utc", "resolved") if k in d}
        return cls(mode=d["mode"], data=data, model=model, train=train_config, **rest)


# -- feeds: where features come from ---------------------------------------------------------------


class Feed(Protocol):
    """What differs between cached and live features; everything else is the shared pipeline below."""

    mode: str

    def open_batches(self, data: DataConfig, manifest: Manifest, log: Log, progress: bool = False) -> StoreBatches: ...

    def place(self, batches: StoreBatches, device: torch.device, log: Log) -> None:
        """Where batches are made for training on `device` (cached: StoreBatches.place)."""

    def prepare(self, batches: StoreBatches, train_config: TrainConfig, log: Log) -> None:
        """Before the fusion model exists (finetune: check modes, load the encoders)."""

    def initial_fusion(self, batches: StoreBatches, data: DataConfig, log: Log) -> FusionModel | None:
        """A fusion model to start from (finetune --init-from), or None to build one from the options."""

    def wrap(self, fusion: FusionModel, data: DataConfig) -> nn.Module:
        """The model train() trains: the fusion model itself, or live encoders + the fusion model."""

    def fit_stats(self, model: nn.Module, batches: StoreBatches, progress: bool) -> str:
        """Fit the feature standardisation on the train split (`stats_pass`); say where it came from."""

    def configure(self, model: nn.Module, log: Log) -> dict:
        """Set what trains; return what run.json records about it (`encoders`)."""

    def optimizer(self, model: nn.Module, train_config: TrainConfig) -> torch.optim.Optimizer | None: ...

    def config_dict(self) -> dict | None: ...

    def reopen(self, run: RunManifest, batches: StoreBatches, checkpoint: dict, device: str | None, log: Log) -> nn.Module:
        """The trained model of a finished run, best weights loaded, in eval mode."""


def stats_pass(batches: StoreBatches, desc: str, progress: bool) -> Iterator[Batch]:
    """The train split once, in order, behind a progress bar: a full pass over the training data
    (through live encoders, as long as an epoch) before the first step."""
    return tqdm(batches("train", shuffle=False, epoch=0), total=batches.n_batches("train"), desc=desc,
                disable=not progress, leave=False, dynamic_ncols=True)  # fmt: skip


class CachedFeed:
    """`fusion train`: per-token rows or pooled vectors read from the stores."""

    mode = "cached"

    def open_batches(self, data: DataConfig, manifest: Manifest, log: Log, progress: bool = False) -> StoreBatches:
        return open_batches(data, manifest, log=log, progress=progress)

    def place(self, batches: StoreBatches, device: torch.device, log: Log) -> None:
        batches.place(device, log=log)

    def prepare(self, batches: StoreBatches, train_config: TrainConfig, log: Log) -> None:
        pass

    def initial_fusion(self, batches: StoreBatches, data: DataConfig, log: Log) -> FusionModel | None:
        return None

    def wrap(self, fusion: FusionModel, data: DataConfig) -> nn.Module:
        return fusion

    def fit_stats(self, model: nn.Module, batches: StoreBatches, progress: bool) -> str:
        counts = fit_feature_stats_(model, stats_pass(batches, "feature statistics", progress))
        return f"fitted on the train split's stored features ({counts} rows)"

    def configure(self, model: nn.Module, log: Log) -> dict:
        return {}

    def optimizer(self, model: nn.Module, train_config: TrainConfig) -> torch.optim.Optimizer | None:
        return None

    def config_dict(self) -> dict | None:
        return None

    def reopen(self, run: RunManifest, batches: StoreBatches, checkpoint: dict, device: str | None, log: Log) -> nn.Module:
        model = FusionModel(FusionModelConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model_state"])
        return model.eval()


def feed_for(run: RunManifest, *, trust_remote_code: bool = False) -> Feed:
    """The feed that reopens `run`; finetune's lives in fusion.finetune (imported only when used).

    `trust_remote_code` is the flag of the command running now: what a run recorded never enables it.
    """
    if run.mode == "cached":
        return CachedFeed()
    from fusion.finetune import FinetuneConfig, LiveFeed

    return LiveFeed(FinetuneConfig.from_dict(run.finetune or {}), trust_remote_code=trust_remote_code)


# -- the pipeline -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    train: TrainResult
    metrics: dict  # split -> regression metrics
    model: nn.Module  # with the best weights
    manifest: RunManifest


def check_device(train_config: TrainConfig) -> None:
    """The device and autocast asked for exist here: said before any data is read, as the user's option."""
    try:
        device = resolve_device(train_config.device)
        resolve_amp(train_config.amp, device)
    except (RuntimeError, ValueError) as e:  # torch's "Invalid device string", amp=fp16 on the CPU
        raise ConfigError(f"training options: device {train_config.device!r} with amp {train_config.amp!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training options: device {train_config.device!r}, but torch sees no CUDA device here; use --device cpu or auto")


def train_run(
    data: DataConfig,
    aggregator: str,
    model_options: dict,
    train_config: TrainConfig,
    run_dir: str | Path,
    *,
    feed: Feed | None = None,
    batches: StoreBatches | None = None,
    progress: bool = True,
    log: Log = print,
) -> RunResult:
    """Prepare, fit, evaluate every split and write the report: one run directory (see the module docstring).

    `feed`: where features come from, cached stores by default (`fusion train`); `fusion finetune`
    passes a `fusion.finetune.LiveFeed`. `batches` lets an ablation reuse features already loaded
    (a view with the run's modalities).
    """
    feed = feed or CachedFeed()
    run_dir = Path(run_dir)
    check_device(train_config)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run directory {str(run_dir)!r} is a file")
    # Live encoders load transformers' weights: their bars follow `progress` too (cached runs load none).
    with run_directory(run_dir), transformers_progress(progress or feed.mode == "cached"):
        return _train_in(feed, data, aggregator, model_options, train_config, run_dir, batches, progress, log)


@contextmanager
def run_directory(path: Path) -> Iterator[Path]:
    """Create `path` (and missing parents) for a run; if the run fails, remove those of them still empty.

    A failed run leaves no empty directory behind it, but whatever it wrote (run.json of a run that
    diverged, say) stays, and so does every directory that existed before.
    """
    created = []  # deepest first
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:  # Ctrl-C too
        for d in created:
            try:
                d.rmdir()  # only an empty directory
            except OSError:
                break
        raise


def _train_in(feed: Feed, data: DataConfig, aggregator: str, model_options: dict, train_config: TrainConfig, run_dir: Path,
              batches: StoreBatches | None, progress: bool, log: Log) -> RunResult:  # fmt: skip
    batches = batches or feed.open_batches(data, read_manifest(data.manifest), log, progress)
    for split in SPLITS:  # an empty split, or one without a single target value, is an error now, not after an epoch
        part = batches.split_manifest(split)
        if np.isnan(part.targets()).all():
            raise RunError(f"manifest {part.path}: every target of the {split!r} split is missing ({len(part)} samples); nothing to fit or select on")
    feed.place(batches, resolve_device(train_config.device), log)
    feed.prepare(batches, train_config, log)
    seed_everything(train_config.seed)  # the model's initial weights depend on the seed too
    fusion = feed.initial_fusion(batches, data, log) or build_model(batches, aggregator, model_options)
    model = feed.wrap(fusion, data)
    stats = feed.fit_stats(model, batches, progress)
    encoders = feed.configure(model, log)
    manifest = RunManifest(
        mode=feed.mode,
        data=portable_data(data),
        model=fusion.config,
        train=train_config,
        fingerprints=batches.fingerprints,
        loading=batches.loading,
        finetune=feed.config_dict(),
        encoder_modes={m: e["mode"] for m, e in encoders.items()},
        encoders=encoders,
        feature_stats=stats,
    )
    manifest.write(run_dir)
    try:
        result = train(
            model,
            batches,
            train_config,
            run_dir,
            target_names=batches.target_names,
            fingerprints=batches.fingerprints,
            model_config=fusion.config.to_dict(),
            extra_checkpoint_info={"run": {"manifest": RUN_FILE, "run_id": manifest.run_id, "mode": feed.mode}},
            optimizer=feed.optimizer(model, train_config),
            progress=progress,
            log=log,
        )
    except FloatingPointError as e:  # train() names epoch, step and lr; the run stays "training"
        raise RunError(f"{run_dir}: training diverged: {e}") from e
    complete = replace(manifest, status="complete", resolved=result.resolved)
    metrics = evaluate_and_report(model, batches, run_dir, SPLITS, history=run_dir / "history.csv", run=complete.to_dict(), progress=progress, log=log)
    complete.write(run_dir)
    return RunResult(run_dir=run_dir, train=result, metrics=metrics, model=model, manifest=complete)


def evaluate_and_report(
    model: nn.Module,
    batches: StoreBatches,
    out_dir: Path,
    splits: tuple[str, ...] | list[str],
    *,
    history: Path | None,
    run: dict,
    progress: bool = True,
    log: Log,
) -> dict:
    """Metrics of `splits`, predictions.csv, and the report with plots (of the test split if evaluated); returns split -> metrics.

    `run`: the run manifest's content (RunManifest.to_dict()), whose inputs and configs the report shows.
    `progress`: a bar per split (through live encoders, evaluation takes as long as an epoch).
    """
    evaluation = evaluate_run(model, batches, out_dir, target_names=batches.target_names, splits=splits, progress=progress, log=log)
    last = "test" if "test" in splits else list(splits)[-1]
    write_report(out_dir, evaluation.metrics, evaluation.predictions[last], history if history and history.exists() else None, run=run)
    return evaluation.metrics


def evaluation_run_info(opened: "OpenedRun") -> dict:
    """The run manifest's content with the data actually evaluated (another manifest or stores may have been given)."""
    return {**opened.manifest.to_dict(), "data": portable_data(opened.batches.config).to_dict(),
            "fingerprints": opened.batches.fingerprints, "loading": opened.batches.loading}


# -- reopening a finished run ------------------------------------------------------------------------


@dataclass
class OpenedRun:
    run_dir: Path
    manifest: RunManifest
    checkpoint: dict
    batches: StoreBatches
    model: nn.Module  # best weights, eval mode


def read_finished_run(run_dir: Path) -> tuple[RunManifest, dict]:
    """run.json and checkpoint.pt of a run that finished, and that belong to each other."""
    run = RunManifest.read(run_dir)
    if run.status != "complete":
        raise RunError(
            f"{run_dir}: the run did not finish (run.json status {run.status!r}: interrupted or failed); "
            f"runs do not resume: train it again"
        )
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    ref = checkpoint["extra"].get("run", {})
    if ref.get("run_id") != run.run_id:
        raise RunError(
            f"{run_dir}: checkpoint.pt belongs to run {ref.get('run_id')!r}, run.json is run {run.run_id!r}; "
            f"the directory mixes two runs"
        )
    return run, checkpoint


def check_run_data(checkpoint: dict, batches: StoreBatches, *, source: str) -> None:
    """Refuse data whose targets or store fingerprints differ from those the checkpoint was trained on."""
    model_targets = list(checkpoint["target_names"])
    if batches.target_names != model_targets:
        raise RunError(
            f"{source}: targets of manifest {batches.manifest.path} {batches.target_names[:3]}... ({len(batches.target_names)}) "
            f"differ from those of checkpoint {checkpoint['path']} {model_targets[:3]}... ({len(model_targets)})"
        )
    check_fingerprints(
        checkpoint["fingerprints"],
        batches.fingerprints,
        source=source,
        checkpoint_path=checkpoint["path"],
        store_path=", ".join(f"{m}={s.path}" for m, s in batches.stores.items()),
    )


def open_run(
    run_dir: str | Path,
    *,
    manifest: str | None = None,
    stores: dict[str, str] | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    log: Log = print,
) -> OpenedRun:
    """A finished run of either mode with its data (or a new manifest / stores), checked against the checkpoint.

    `progress=False`: no transformers bars while a finetune run's encoders load.
    """
    run_dir = Path(run_dir)
    run, checkpoint = read_finished_run(run_dir)
    data = run.data
    unknown = sorted(set(stores or {}) - set(data.stores))
    if unknown:
        raise ConfigError(f"--store for modalities {unknown} that run {run_dir} does not use; its modalities: {sorted(data.stores)}")
    overrides = {"stores": {**data.stores, **(stores or {})}}
    if manifest:
        overrides["manifest"] = manifest
    data = DataConfig.from_dict({**data.to_dict(), **overrides})
    feed = feed_for(run, trust_remote_code=trust_remote_code)
    with transformers_progress(progress or run.mode == "cached"):
        batches = feed.open_batches(data, read_manifest(data.manifest), log, progress)
        check_run_data(checkpoint, batches, source="evaluation data")
        model = feed.reopen(run, batches, checkpoint, device, log)
    return OpenedRun(run_dir=run_dir, manifest=run, checkpoint=checkpoint, batches=batches, model=model)


def load_run(run_dir: str | Path, *, trust_remote_code: bool = False, log: Log = print) -> tuple[RunManifest, nn.Module, dict]:
    """(run manifest, model with the best weights in eval mode, checkpoint) of a finished run of either mode.

    A cached run's model needs no data; a finetune run's encoders are rebuilt from its stores.
    """
    run_dir = Path(run_dir)
    run, checkpoint = read_finished_run(run_dir)
    if run.mode == "cached":
        return run, CachedFeed().reopen(run, None, checkpoint, None, log), checkpoint
    opened = open_run(run_dir, trust_remote_code=trust_remote_code, log=log)
    return opened.manifest, opened.model, opened.checkpoint


__all__ = [
    "CachedFeed",
    "Feed",
    "MODES",
    "OpenedRun",
    "RUN_FILE",
    "RunManifest",
    "RunResult",
    "SPLITS",
    "build_model",
    "check_run_data",
    "evaluate_and_report",
    "evaluation_run_info",
    "feed_for",
    "load_run",
    "open_run",
    "read_finished_run",
    "portable_data",
    "read_manifest",
    "run_directory",
    "train_run",
]
