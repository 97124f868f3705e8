"""Fusion-model checkpoints that describe themselves, and the fingerprint check.

A checkpoint is one `torch.save`d dict, loadable with `torch.load(weights_only=True)`:
everything except the tensors of `model_state` is plain JSON-safe data.

    format            "fusion-checkpoint"
    format_version    CHECKPOINT_FORMAT_VERSION
    model_state       the model's state_dict (CPU tensors)
    model_config      dict: what the model was built from (FusionModel(config) with config.to_dict())
    train_config      dict: TrainConfig.to_dict()
    train_config_comments  dict: field -> one-line comment of TrainConfig
    fingerprints      dict: modality -> fingerprint of the feature store/namespace it was trained on
    target_names      list[str]: output columns, in order
    extra             dict: anything else (best epoch, validation metrics, data provenance)
    torch_version     str
    created_utc       str, ISO 8601

A consumer reads dimensions and provenance from here and refuses features whose
fingerprints differ (`check_fingerprints`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion.errors import FusionError, RunError

CHECKPOINT_FORMAT = "fusion-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "model_state", "model_config", "train_config", "fingerprints", "target_names", "extra")


class FingerprintMismatch(FusionError):
    """The features offered to a model are not the ones it was trained on."""

    def __init__(self, message: str, problems: list[tuple[str, str | None, str | None]]) -> None:
        super().__init__(message)
        self.problems = problems  # (modality, expected fingerprint or None if absent, actual fingerprint or None if absent)


def _check_json_safe(value: Any, what: str) -> None:
    """weights_only loading accepts only plain containers and scalars: make sure that's all we store."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint field {what!r} must be JSON-safe (dicts, lists, str, numbers, bool, None): {e}") from e


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    fingerprints: dict[str, str],
    target_names: list[str],
    extra: dict[str, Any] | None = None,
    *,
    train_config_comments: dict[str, str] | None = None,
) -> Path:
    """Write `model`'s weights with everything needed to rebuild and check it. Atomic (temp file + rename)."""
    path = Path(path)
    extra = dict(extra or {})
    for what, value in (
        ("model_config", model_config),
        ("train_config", train_config),
        ("fingerprints", fingerprints),
        ("target_names", list(target_names)),
        ("extra", extra),
        ("train_config_comments", train_config_comments or {}),
    ):
        _check_json_safe(value, what)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_state": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "model_config": dict(model_config),
        "train_config": dict(train_config),
        "train_config_comments": dict(train_config_comments or {}),
        "fingerprints": {str(k): str(v) for k, v in fingerprints.items()},
        "target_names": [str(n) for n in target_names],
        "extra": extra,
        "torch_version": str(torch.__version__),  # a TorchVersion object would not load with weights_only
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` onto the CPU (weights_only: no code is unpickled).

    Returns the stored dict (see the module docstring) plus "path": where it was read from.
    Rebuild a model with e.g. `FusionModel(FusionConfig.from_dict(ckpt["model_config"]))`
    then `model.load_state_dict(ckpt["model_state"])`.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # torch's own ways of saying "not a checkpoint"
        raise RunError(f"{path}: cannot read the checkpoint (truncated or not a torch file?): {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunError(f"{path} is not a fusion checkpoint: format is {found!r}, expected {CHECKPOINT_FORMAT!r}")
    if ckpt.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise RunError(
            f"{path} has checkpoint format_version {ckpt['format_version']}, this code reads up to {CHECKPOINT_FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise RunError(f"{path} lacks checkpoint fields {missing}")
    ckpt["path"] = str(path)
    return ckpt


def check_fingerprints(
    expected: dict[str, str],
    actual: dict[str, str],
    source: str = "",
    *,
    checkpoint_path: str | Path | None = None,
    store_path: str | Path | None = None,
) -> None:
    """Refuse features whose fingerprints differ from those a checkpoint was trained on.

    expected: modality -> fingerprint recorded in the checkpoint; actual: modality ->
    fingerprint of the features offered now (pass the modalities the model uses).
    A modality missing on either side is an error too. Every problem is listed at once.
    """
    problems: list[tuple[str, str | None, str | None]] = []
    for modality in sorted(set(expected) | set(actual)):
        e, a = expected.get(modality), actual.get(modality)
        if e != a:
            problems.append((modality, e, a))
    if not problems:
        return
    where = []
    if source:
        where.append(source)
    if checkpoint_path is not None:
        where.append(f"checkpoint {checkpoint_path}")
    if store_path is not None:
        where.append(f"store {store_path}")
    lines = []
    for modality, e, a in problems:
        if e is None:
            lines.append(f"  {modality}: offered features (fingerprint {a}) but the checkpoint has no {modality!r} modality")
        elif a is None:
            lines.append(f"  {modality}: checkpoint expects fingerprint {e} but no {modality!r} features were offered")
        else:
            lines.append(f"  {modality}: checkpoint expects fingerprint {e}, features have fingerprint {a}")
    header = "feature fingerprints do not match the checkpoint" + (f" ({'; '.join(where)})" if where else "")
    raise FingerprintMismatch(header + ":\n" + "\n".join(lines), problems)
