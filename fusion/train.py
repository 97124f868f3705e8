"""Train and evaluate a fusion model: one plain loop, readable top to bottom.

The model is any nn.Module whose `forward(features: dict[str, ModalityBatch])` returns
(b, n_targets) predictions. Data comes from a *batch source*: any callable

    make_batches(split: str, *, shuffle: bool, epoch: int) -> Iterable[Batch]

(the epoch lets it reshuffle deterministically). If it also has a method
`n_batches(split) -> int`, that is used for the learning-rate schedule and progress bar;
otherwise the train split is iterated once up front to count its batches.

A run directory receives (see `train` and `evaluate_run`):
    history.csv         one row per epoch: epoch, step, train_loss, val_loss (masked MSE in standardised target units), val_mean_r2, val_mean_spearman, lr, seconds, best
    log.txt             every line train() logged
    checkpoint.pt       best (lowest validation loss) model with its model and train configs and the resolved
                        device/amp/schedule (`extra["resolved"]`), see fusion.checkpoint
The configs themselves are written once, by the caller: `fusion.run` keeps them in the run manifest
(run.json), with `TrainResult.resolved`.
    metrics.json        per split: fusion.metrics.regression_metrics (evaluate_run)
    predictions.csv     sample_id, split, then per target `<name>`, `<name>_pred` (evaluate_run)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
import re
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from fusion.batch import Batch
from fusion.checkpoint import save_checkpoint
from fusion.metrics import METRIC_DEFINITIONS, Predictions, json_safe, masked_mse_np, regression_metrics
from fusion.models.fusion_model import TargetStandardizer

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EvalResult",
    "BatchSource",
    "Predictions",
    "train",
    "predict",
    "evaluate_run",
    "write_evaluation",
    "split_batches",
    "masked_mse",
    "lr_at_step",
    "seed_everything",
    "resolve_device",
    "resolve_amp",
]

AMP_MODES = ("auto", "off", "bf16", "fp16")


class BatchSource(Protocol):
    """What `train` and `evaluate_run` read batches from (the data layer provides one)."""

    def __call__(self, split: str, *, shuffle: bool, epoch: int) -> Iterable[Batch]: ...


def field_comments(cls: type) -> dict[str, str]:
    """The one-line `# comment` after each dataclass field in `cls`'s source, by field name."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments = {}
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines():
        m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.+?)\s*$", line)
        if m and m.group(1) in names:
            comments[m.group(1)] = m.group(2)
    return comments


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Optimisation settings of the fusion stage. Defaults are choices, not values from the paper: lr, epochs,
    patience and weight decay were picked by benchmarks/bench_fusion_sweep.py (table in benchmarks/README.md).
    Weight decay 3.0 looks large but is decoupled: each step shrinks weights by lr x 3.0 ~ 1e-3; at 0.1 it
    shrank them by 2% over a whole run, i.e. did not regularise at all."""

    epochs: int = 80  # maximum number of passes over the train split
    batch_size: int = 32  # samples per batch; the batch source uses it, train() records it
    lr: float = 3e-4  # peak learning rate of AdamW, reached at the end of warmup
    weight_decay: float = 3.0  # AdamW decoupled weight decay (per step: lr x this), only on >= 2-d weights (not biases, norms, embeddings)
    warmup_fraction: float = 0.05  # fraction of all optimiser steps spent in linear warmup from ~0 to lr
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio on the last step of the last epoch
    grad_clip: float = 1.0  # clip the global gradient L2 norm to this; 0 disables clipping
    early_stopping_patience: int = 12  # stop after this many epochs without a validation-loss improvement; 0 disables
    seed: int = 0  # seeds python, numpy and torch at the start of train()
    amp: str = "auto"  # autocast: auto (bf16 on CUDA if supported, else off), off, bf16, fp16 (CUDA, with GradScaler)
    device: str = "auto"  # auto (cuda if available, else cpu) or a torch device string like cuda:1
    grad_accum: int = 1  # batches whose gradients are summed into one optimiser step (loss / batches in the step)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0 (0 disables), got {self.early_stopping_patience}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from `to_dict()` output; unknown keys are an error, missing keys take defaults."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; valid fields: {valid}")
        return cls(**d)

    @classmethod
    def comments(cls) -> dict[str, str]:
        """field -> its one-line comment, written next to the values in every artifact."""
        return field_comments(cls)


@dataclass
class TrainResult:
    """What `train` returns; the model passed in holds the best weights afterwards."""

    best_epoch: int  # 0-based epoch with the lowest validation loss
    best_val_loss: float  # masked MSE over all valid validation (sample, target) pairs at best_epoch, in standardised target units
    best_val_metrics: dict[str, Any]  # regression_metrics of the validation split at best_epoch
    history: list[dict[str, Any]]  # one row per epoch run, the rows of history.csv
    epochs_run: int  # epochs actually run (< config.epochs when stopped early)
    stopped_early: bool  # True when early stopping ended the run
    run_dir: Path  # where the artifacts were written
    checkpoint_path: Path  # run_dir / checkpoint.pt, the best model
    target_names: list[str]  # output columns, in order
    device: str  # device trained on
    amp: str  # resolved autocast dtype: off, bf16 or fp16
    resolved: dict[str, Any]  # what the config resolved to here: device, amp, batches and steps per epoch, warmup steps, parameters


@dataclass
class EvalResult:
    """What `evaluate_run` returns."""

    metrics: dict[str, dict[str, Any]]  # split -> regression_metrics
    predictions: dict[str, Predictions]  # split -> predictions
    paths: list[Path]  # metrics.json, predictions.csv


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Call before building the model too."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`, or None for full precision."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device, got device {device}; use amp='bf16' or 'off'")
        return torch.float16
    raise ValueError(f"amp must be one of {list(AMP_MODES)}, got {amp!r}")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over entries where mask is True; pred, target, mask: (b, t).

    Masked-out targets are never read (they may hold garbage, even NaN/inf): `torch.where`
    replaces them before subtracting, so neither the value nor its gradient can leak.
    With no valid entry the result is 0 (with a zero gradient), not NaN.
    """
    if pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.bool()
    target = torch.where(mask, target, torch.zeros_like(target))
    sq = torch.where(mask, (pred - target) ** 2, torch.zeros_like(pred))  # (b, t)
    return sq.sum() / mask.sum().clamp(min=1)


def target_standardizer(model: nn.Module) -> TargetStandardizer | None:
    """The model's target standardisation (also inside a wrapper such as finetune's), or None."""
    return next((m for m in model.modules() if isinstance(m, TargetStandardizer)), None)


def standardized_loss(model: nn.Module, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_mse in the model's standardised target units (every target weighs the same), else in raw units."""
    norm = target_standardizer(model)
    if norm is None:
        return masked_mse(pred, target, mask)
    return masked_mse(norm.encode(pred), norm.encode(target), mask)


def standardized_loss_np(model: nn.Module, p: Predictions) -> float:
    """`standardized_loss` of numpy predictions (validation), NaN when no target is valid."""
    norm = target_standardizer(model)
    if norm is None:
        return masked_mse_np(p.pred, p.target, p.mask)
    mean, std = norm.mean.detach().cpu().numpy(), norm.std.detach().cpu().numpy()
    return masked_mse_np((p.pred - mean) / std, (p.target - mean) / std, p.mask)


def lr_at_step(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to config.lr over warmup_fraction of total_steps, then cosine to lr * min_lr_ratio."""
    warmup_steps = int(round(config.warmup_fraction * total_steps))
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `decay_groups(model, config)`."""
    return adamw(decay_groups(model, config), lr=config.lr)


def decay_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups: weight decay only on >= 2-d weights that are not
    embedding tables (biases and LayerNorm/other norm scales are 1-d); empty groups left out."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_params else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict[str, Any]], *, lr: float) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel where every parameter allows it (float tensors on CPU or CUDA).

    torch picks the per-parameter Python loop by default on the CPU; the fused kernel is the same
    update in one call per group (about 5% of a small fusion model's CPU training step).
    """
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    # None, not False, where fused cannot run: fused=False would also turn off torch's foreach default.
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def count_batches(batches: BatchSource, split: str) -> int:
    """Batches per epoch of `split`: `batches.n_batches(split)` if it has one, else count one pass."""
    n_batches = getattr(batches, "n_batches", None)
    if callable(n_batches):
        return int(n_batches(split))
    return sum(1 for _ in batches(split, shuffle=False, epoch=0))


def split_batches(batches: BatchSource, split: str, *, epoch: int = 0, progress: bool = False, desc: str = "") -> Iterable[Batch]:
    """`split` in order (unshuffled), under a tqdm bar when `progress` (a pass through live encoders takes minutes)."""
    it = batches(split, shuffle=False, epoch=epoch)
    if not progress:
        return it
    n_batches = getattr(batches, "n_batches", None)
    return tqdm(it, total=n_batches(split) if callable(n_batches) else None, desc=desc or split, unit="batch", leave=False, dynamic_ncols=True)


def _model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's own config as a dict (model.config.to_dict() or a dataclass), {} if it has none."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise TypeError(f"model.config of type {type(cfg).__name__} has no to_dict(); pass model_config= explicitly")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    target_names: list[str] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Predictions:
    """Run `model` over `batches` in eval mode without gradients, on the model's device.

    Predictions are returned as float32 numpy arrays in batch order; target_names default
    to target_0, target_1, ... The model's train/eval mode is restored afterwards.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    ids: list[str] = []
    preds, targets, masks = [], [], []
    try:
        for batch in batches:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                pred = model(batch.features)  # (b, t)
            if pred.shape != batch.targets.shape:
                raise ValueError(f"model returned predictions of shape {tuple(pred.shape)}, targets have shape {tuple(batch.targets.shape)}")
            ids.extend(batch.sample_ids)
            preds.append(pred.float().cpu().numpy())
            targets.append(batch.targets.float().cpu().numpy())
            masks.append(batch.target_mask.bool().cpu().numpy())
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError("predict() got no batches")
    t = preds[0].shape[1]
    names = list(target_names) if target_names is not None else [f"target_{j}" for j in range(t)]
    return Predictions(sample_ids=ids, pred=np.concatenate(preds), target=np.concatenate(targets), mask=np.concatenate(masks), target_names=names)


def train(
    model: nn.Module,
    batches: BatchSource,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    target_names: list[str] | None = None,
    fingerprints: dict[str, str] | None = None,
    model_config: dict[str, Any] | None = None,
    extra_checkpoint_info: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    train_split: str = "train",
    val_split: str = "validation",
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> TrainResult:
    """Train `model` on `batches(train_split)`, select on `batches(val_split)`, write the run's artifacts.

    target_names: output column names (default target_0, ...), stored in the checkpoint and metrics.
    fingerprints: modality -> feature-store fingerprint, stored in the checkpoint so a later
      consumer can refuse different features (fusion.checkpoint.check_fingerprints).
    model_config: stored in the checkpoint; default model.config.to_dict() if the model has one.
    extra_checkpoint_info: JSON-safe dict merged into the checkpoint's `extra`.
    optimizer: used instead of make_optimizer(model, config), e.g. parameter groups with their own
      learning rates: every step sets a group's lr to the schedule's lr times its "lr_scale" (default 1).
    log: called with every log line (also written to run_dir/log.txt).
    Returns a TrainResult; afterwards `model` holds the best (lowest validation loss) weights.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logfile = open(run_dir / "log.txt", "w")

    def say(msg: str) -> None:
        log(msg)
        logfile.write(msg + "\n")
        logfile.flush()

    try:
        # ---- setup
        seed_everything(config.seed)
        device = resolve_device(config.device)
        amp_dtype = resolve_amp(config.amp, device)
        amp_name = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        model.to(device)
        optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        model_config = dict(model_config) if model_config is not None else _model_config_dict(model)
        fingerprints = dict(fingerprints or {})
        batches_per_epoch = count_batches(batches, train_split)
        if batches_per_epoch == 0:
            raise ValueError(f"the batch source yields no batches for split {train_split!r}")
        steps_per_epoch = -(-batches_per_epoch // config.grad_accum)  # optimiser steps; a short last group still steps
        total_steps = steps_per_epoch * config.epochs
        resolved = {
            "device": str(device),
            "amp": amp_name,
            "batches_per_epoch": batches_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": int(round(config.warmup_fraction * total_steps)),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "train_split": train_split,
            "val_split": val_split,
        }
        say(f"training on {device} (amp {amp_name}): {resolved['n_trainable_parameters']:,} trainable parameters, "
            f"{steps_per_epoch} steps/epoch, up to {config.epochs} epochs, run_dir {run_dir}")
        if not fingerprints:
            say("warning: no feature fingerprints given; the checkpoint cannot check its features at load time")

        # ---- loop
        step = 0
        best_val_loss, best_epoch, best_state, best_val_metrics = math.inf, -1, None, {}
        epochs_without_improvement = 0
        stopped_early = False
        history: list[dict[str, Any]] = []
        checkpoint_path = run_dir / "checkpoint.pt"

        def apply_step() -> None:
            if scaler is not None:
                scaler.unscale_(optimizer)  # so clipping sees true gradient norms
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

        for epoch in range(config.epochs):
            t0 = time.perf_counter()

            # train one epoch
            model.train()
            sse, n_valid = 0.0, 0  # sum of squared errors and count of valid targets, for the epoch's train loss
            bar = tqdm(batches(train_split, shuffle=True, epoch=epoch), total=batches_per_epoch,
                       desc=f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
            pending = 0  # batches whose gradients are summed but not applied yet
            for i, batch in enumerate(bar):
                if target_names is None:
                    target_names = [f"target_{j}" for j in range(batch.targets.shape[1])]
                if len(target_names) != batch.targets.shape[1]:
                    raise ValueError(f"{len(target_names)} target_names {list(target_names)[:5]}... but batch targets have "
                                     f"{batch.targets.shape[1]} columns (epoch {epoch}, step {step})")
                if pending == 0:  # first batch of an optimiser step
                    lr = lr_at_step(step, total_steps, config)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    optimizer.zero_grad(set_to_none=True)
                    # The step's loss is the mean of its batches' losses, as if they were one batch.
                    in_step = max(1, min(config.grad_accum, batches_per_epoch - i))
                batch = batch.to(device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    pred = model(batch.features)  # (b, t)
                if pred.shape != batch.targets.shape:
                    raise ValueError(f"model returned predictions of shape {tuple(pred.shape)}, targets have shape "
                                     f"{tuple(batch.targets.shape)} (epoch {epoch}, step {step})")
                loss = standardized_loss(model, pred.float(), batch.targets.float(), batch.target_mask)  # fp32 even under autocast
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"non-finite training loss {loss_value} at epoch {epoch}, step {step}, lr {lr:.3g}; "
                                             f"first sample ids of the batch: {batch.sample_ids[:5]}")
                scaled = loss / in_step
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                pending += 1
                if pending == in_step:
                    apply_step()
                    step += 1
                    pending = 0
                n = int(batch.target_mask.sum())
                sse += loss_value * n
                n_valid += n
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)  # redraw at tqdm's own pace
            if pending:  # the source yielded fewer batches than it counted: apply what was summed
                apply_step()
                step += 1
            bar.close()
            train_loss = sse / n_valid if n_valid else math.nan

            # validate
            val = predict(model, split_batches(batches, val_split, epoch=epoch, progress=progress, desc=f"validate epoch {epoch}"),
                          target_names=target_names, autocast_dtype=amp_dtype)
            val_loss = standardized_loss_np(model, val)
            if math.isnan(val_loss):
                raise ValueError(f"validation split {val_split!r} has no valid (unmasked) target values")
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"non-finite validation loss {val_loss} at epoch {epoch}")
            val_metrics = regression_metrics(val.pred, val.target, val.mask, val.target_names)

            # keep the best
            improved = val_loss < best_val_loss
            if improved:
                best_val_loss, best_epoch, best_val_metrics = val_loss, epoch, val_metrics
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                epochs_without_improvement = 0
                save_checkpoint(
                    checkpoint_path, model, model_config, config.to_dict(), fingerprints, target_names,
                    extra=json_safe({"best_epoch": best_epoch, "best_val_loss": best_val_loss, "val_metrics": val_metrics,
                                     "resolved": resolved, **(extra_checkpoint_info or {})}),
                    train_config_comments=TrainConfig.comments(),
                )
            else:
                epochs_without_improvement += 1

            row = {
                "epoch": epoch,
                "step": step,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_mean_r2": val_metrics["mean_r2"],
                "val_mean_spearman": val_metrics["mean_spearman"],
                "lr": lr,
                "seconds": time.perf_counter() - t0,
                "best": improved,
            }
            history.append(row)
            pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
            say(f"epoch {epoch:3d} | train_loss {train_loss:.4f} | val_loss {val_loss:.4f} | val_mean_r2 {val_metrics['mean_r2']:.4f} "
                f"| val_mean_spearman {val_metrics['mean_spearman']:.4f} | lr {lr:.2e} | {row['seconds']:.1f}s" + (" | best" if improved else ""))

            if config.early_stopping_patience and epochs_without_improvement >= config.early_stopping_patience:
                stopped_early = True
                say(f"early stopping after epoch {epoch}: no validation-loss improvement for {epochs_without_improvement} epochs")
                break

        # ---- finish: the model leaves with its best weights
        model.load_state_dict(best_state)
        say(f"restored best epoch {best_epoch} (val_loss {best_val_loss:.4f}, val_mean_r2 {best_val_metrics['mean_r2']:.4f}); "
            f"checkpoint {checkpoint_path}")
        return TrainResult(
            best_epoch=best_epoch,
            best_val_loss=best_val_loss,
            best_val_metrics=best_val_metrics,
            history=history,
            epochs_run=len(history),
            stopped_early=stopped_early,
            run_dir=run_dir,
            checkpoint_path=checkpoint_path,
            target_names=list(target_names),
            device=str(device),
            amp=amp_name,
            resolved=resolved,
        )
    finally:
        logfile.close()


def write_predictions_csv(path: str | Path, predictions: dict[str, Predictions]) -> Path:
    """sample_id, split, then per target `<name>` (observed, empty where masked) and `<name>_pred`."""
    frames = []
    for split, p in predictions.items():
        columns: dict[str, Any] = {"sample_id": p.sample_ids, "split": [split] * len(p)}
        for j, name in enumerate(p.target_names):
            columns[name] = np.where(p.mask[:, j], p.target[:, j], np.nan)
            columns[f"{name}_pred"] = p.pred[:, j]
        if len(columns) != 2 + 2 * len(p.target_names):
            raise ValueError(f"target names {p.target_names} collide with each other or with sample_id/split in predictions.csv")
        frames.append(pd.DataFrame(columns))
    path = Path(path)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False, float_format="%.8g")
    return path


def evaluate_run(
    model: nn.Module,
    batches: BatchSource,
    run_dir: str | Path,
    *,
    target_names: list[str],
    splits: Iterable[str] = ("train", "validation", "test"),
    extra: dict[str, Any] | None = None,
    progress: bool = False,
    log: Callable[[str], Any] = print,
) -> EvalResult:
    """Predict every split (full precision, unshuffled) and write metrics.json and predictions.csv; `progress`: a bar per split.

    metrics.json: {"format": "fusion-metrics", "target_names": [...], "definitions": {...},
                   "splits": {split: regression_metrics}, "extra": {...}}; NaN is null.
    """
    predictions = {split: predict(model, split_batches(batches, split, progress=progress, desc=f"evaluate {split}"), target_names=target_names)
                   for split in splits}
    return write_evaluation(run_dir, predictions, extra=extra, log=log)


def write_evaluation(
    run_dir: str | Path, predictions: dict[str, Predictions], *, extra: dict[str, Any] | None = None, log: Callable[[str], Any] = print
) -> EvalResult:
    """metrics.json and predictions.csv of split -> predictions (from a model, a probe, ...); see `evaluate_run`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for split, p in predictions.items():
        metrics[split] = regression_metrics(p.pred, p.target, p.mask, p.target_names)
        log(f"{split}: n {len(p)} | mean_r2 {metrics[split]['mean_r2']:.4f} | mean_spearman {metrics[split]['mean_spearman']:.4f} "
            f"| all_pairs_r2 {metrics[split]['all_pairs_r2']:.4f}")
    target_names = next(iter(predictions.values())).target_names
    metrics_path = run_dir / "metrics.json"
    payload = {"format": "fusion-metrics", "target_names": list(target_names), "definitions": METRIC_DEFINITIONS,
               "splits": metrics, "extra": extra or {}}
    metrics_path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    csv_path = write_predictions_csv(run_dir / "predictions.csv", predictions)
    return EvalResult(metrics=metrics, predictions=predictions, paths=[metrics_path, csv_path])
