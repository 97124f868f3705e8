"""fusion.train and fusion.checkpoint on a tiny synthetic task with a stand-in model.

The stand-in (masked mean over tokens per modality -> concat -> linear) has the same
forward signature as the real FusionModel, so these tests do not depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fusion.batch import Batch, ModalityBatch
from fusion.checkpoint import FingerprintMismatch, check_fingerprints, load_checkpoint
from fusion.metrics import masked_mse_np
from fusion.train import TrainConfig, evaluate_run, lr_at_step, masked_mse, predict, seed_everything, train

MODALITIES = {"rna": 8, "protein": 4}  # name -> feature width
N_TARGETS = 3
TARGET_NAMES = ["Liver", "Lung", "Brain"]


@dataclasses.dataclass(frozen=True)
class StandInConfig:
    widths: tuple[tuple[str, int], ...]  # (modality, feature width) in input order
    n_targets: int  # outputs

    def to_dict(self) -> dict:
        return {"widths": [list(w) for w in self.widths], "n_targets": self.n_targets}


class StandIn(nn.Module):
    """Masked mean over tokens per modality, concatenated, then linear -> (b, n_targets)."""

    def __init__(self, config: StandInConfig) -> None:
        super().__init__()
        self.config = config
        self.head = nn.Linear(sum(d for _, d in config.widths), config.n_targets)

    def forward(self, features: dict[str, ModalityBatch]) -> torch.Tensor:
        pooled = []
        for name, _ in self.config.widths:
            f = features[name]
            m = f.mask.unsqueeze(-1).to(f.x.dtype)  # (b, n, 1)
            pooled.append((f.x * m).sum(1) / m.sum(1).clamp(min=1))  # (b, d)
        return self.head(torch.cat(pooled, dim=-1))  # (b, t)


def make_model(seed: int = 0) -> StandIn:
    torch.manual_seed(seed)
    return StandIn(StandInConfig(widths=tuple(MODALITIES.items()), n_targets=N_TARGETS))


class SyntheticSource:
    """A batch source over in-memory tensors; shuffles with a generator seeded by the epoch."""

    def __init__(self, splits: dict[str, dict], batch_size: int) -> None:
        self.splits = splits
        self.batch_size = batch_size

    def __call__(self, split: str, *, shuffle: bool, epoch: int):
        s = self.splits[split]
        n = len(s["ids"])
        order = np.random.default_rng(epoch).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            idx = torch.as_tensor(order[start : start + self.batch_size])
            yield Batch(
                features={m: ModalityBatch(x=s[m][0][idx], mask=s[m][1][idx], present=s[m][1][idx].any(1)) for m in MODALITIES},
                targets=s["targets"][idx],
                target_mask=s["target_mask"][idx],
                sample_ids=[s["ids"][i] for i in idx.tolist()],
            )


def make_split(rng: np.random.Generator, n: int, weights: np.ndarray | None, prefix: str, masked_value: float = 0.0) -> dict:
    """Per-token features with ragged lengths; targets = linear(masked means) + noise, or pure noise if weights is None."""
    split: dict = {"ids": [f"{prefix}{i}" for i in range(n)]}
    pooled = []
    for m, d in MODALITIES.items():
        n_tok = 5
        lengths = rng.integers(1, n_tok + 1, size=n)
        mask = np.arange(n_tok)[None, :] < lengths[:, None]  # (n, n_tok)
        x = rng.normal(size=(n, n_tok, d)) * mask[..., None]
        split[m] = (torch.tensor(x, dtype=torch.float32), torch.tensor(mask))
        pooled.append((x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
    feats = np.concatenate(pooled, axis=1)  # (n, sum d)
    if weights is None:
        y = rng.normal(size=(n, N_TARGETS))
    else:
        y = feats @ weights + 0.1 * rng.normal(size=(n, N_TARGETS))
    target_mask = rng.random((n, N_TARGETS)) > 0.15
    y = np.where(target_mask, y, masked_value)
    split["targets"] = torch.tensor(y, dtype=torch.float32)
    split["target_mask"] = torch.tensor(target_mask)
    return split


def make_source(*, learnable: bool = True, n_train: int = 256, n_val: int = 64, masked_value: float = 0.0, batch_size: int = 32) -> SyntheticSource:
    rng = np.random.default_rng(123)
    weights = rng.normal(size=(sum(MODALITIES.values()), N_TARGETS)) if learnable else None
    splits = {
        "train": make_split(rng, n_train, weights, "tr", masked_value),
        "validation": make_split(rng, n_val, weights, "va", masked_value),
        "test": make_split(rng, n_val, weights, "te", masked_value),
    }
    return SyntheticSource(splits, batch_size)


QUIET = dict(progress=False, log=lambda s: None)
FAST = TrainConfig(epochs=25, batch_size=32, lr=3e-2, weight_decay=0.0, warmup_fraction=0.1, early_stopping_patience=0, seed=0)


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One learnable run shared by several tests."""
    run_dir = tmp_path_factory.mktemp("run")
    source = make_source()
    model = make_model()
    result = train(model, source, FAST, run_dir, target_names=TARGET_NAMES, fingerprints={"rna": "fp-rna-1", "protein": "fp-prot-1"},
                   extra_checkpoint_info={"data": "synthetic"}, **QUIET)
    return model, source, result, run_dir


def test_learns_a_learnable_signal(trained):
    _, _, result, _ = trained
    h = result.history
    assert h[-1]["train_loss"] < 0.2 * h[0]["train_loss"]
    assert result.best_val_metrics["mean_r2"] > 0.5
    assert result.target_names == TARGET_NAMES
    assert result.epochs_run == FAST.epochs and not result.stopped_early


def test_run_dir_contents(trained):
    _, _, result, run_dir = trained
    for name in ("history.csv", "log.txt", "checkpoint.pt"):
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "train_config.json").exists()  # configs are written once, by the caller's run manifest
    assert result.resolved["steps_per_epoch"] == 8 and result.resolved["amp"] == "off"
    assert set(TrainConfig.comments()) == {f.name for f in dataclasses.fields(TrainConfig)}
    hist = pd.read_csv(run_dir / "history.csv")
    assert list(hist.columns[:6]) == ["epoch", "step", "train_loss", "val_loss", "val_mean_r2", "val_mean_spearman"]
    assert {"lr", "seconds"} <= set(hist.columns)
    assert len(hist) == result.epochs_run
    log = (run_dir / "log.txt").read_text()
    assert "epoch   0 |" in log and "restored best epoch" in log


def test_checkpoint_round_trip_restores_identical_predictions(trained):
    model, source, result, run_dir = trained
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["target_names"] == TARGET_NAMES
    assert ckpt["fingerprints"] == {"rna": "fp-rna-1", "protein": "fp-prot-1"}
    assert TrainConfig.from_dict(ckpt["train_config"]) == FAST
    assert ckpt["model_config"] == model.config.to_dict()
    assert ckpt["extra"]["data"] == "synthetic" and ckpt["extra"]["best_epoch"] == result.best_epoch
    fresh = make_model(seed=99)
    fresh.load_state_dict(ckpt["model_state"])
    a = predict(model, source("validation", shuffle=False, epoch=0))
    b = predict(fresh, source("validation", shuffle=False, epoch=0))
    np.testing.assert_array_equal(a.pred, b.pred)
    assert masked_mse_np(b.pred, b.target, b.mask) == pytest.approx(result.best_val_loss, rel=1e-6)


def test_evaluate_run_writes_metrics_and_predictions(trained, tmp_path):
    model, source, _, _ = trained
    ev = evaluate_run(model, source, tmp_path, target_names=TARGET_NAMES, splits=("validation", "test"), log=lambda s: None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"validation", "test"}
    assert metrics["splits"]["test"]["mean_r2"] == pytest.approx(ev.metrics["test"]["mean_r2"])
    df = pd.read_csv(tmp_path / "predictions.csv")
    assert list(df.columns) == ["sample_id", "split"] + [c for n in TARGET_NAMES for c in (n, f"{n}_pred")]
    assert len(df) == 128
    val = ev.predictions["validation"]
    rows = df[df.split == "validation"]
    np.testing.assert_array_equal(rows["Liver"].isna().to_numpy(), ~val.mask[:, 0])  # observed empty where masked
    np.testing.assert_allclose(rows["Lung_pred"].to_numpy(), val.pred[:, 1], rtol=1e-6)


def test_same_seed_identical_history_and_masked_targets_do_not_matter(tmp_path):
    cfg = dataclasses.replace(FAST, epochs=4)
    runs = []
    for i, masked_value in enumerate([0.0, 0.0, 1e6]):
        seed_everything(0)
        runs.append(train(make_model(), make_source(masked_value=masked_value), cfg, tmp_path / f"r{i}", **QUIET))
    assert strip_time(runs[0].history) == strip_time(runs[1].history)
    assert strip_time(runs[0].history) == strip_time(runs[2].history)  # garbage under the mask changes nothing


def test_early_stopping_on_noise_restores_best(tmp_path):
    cfg = TrainConfig(epochs=100, lr=5e-2, weight_decay=0.0, warmup_fraction=0.0, early_stopping_patience=3, seed=0)
    source = make_source(learnable=False, n_train=24, n_val=64, batch_size=8)
    model = make_model()
    result = train(model, source, cfg, tmp_path, **QUIET)
    assert result.stopped_early and result.epochs_run < cfg.epochs
    val_losses = [row["val_loss"] for row in result.history]
    assert result.best_epoch == int(np.argmin(val_losses))
    assert result.epochs_run == result.best_epoch + 1 + cfg.early_stopping_patience
    p = predict(model, source("validation", shuffle=False, epoch=0))
    assert masked_mse_np(p.pred, p.target, p.mask) == pytest.approx(result.best_val_loss, rel=1e-6)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    cfg = dataclasses.replace(FAST, epochs=1, amp="bf16")
    result = train(make_model(), make_source(n_train=64), cfg, tmp_path, **QUIET)
    assert result.amp == "bf16" and math.isfinite(result.best_val_loss)


def test_masked_mse_ignores_masked_entries_and_handles_empty_mask():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan")], [3.0, float("inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    loss = masked_mse(pred, target, mask)
    assert loss.item() == pytest.approx(0.5)  # (1^2 + 0^2) / 2
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[:, 1].abs().sum() == 0
    pred.grad = None
    empty = masked_mse(pred, target, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    total = 100
    lrs = [lr_at_step(s, total, cfg) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warmup steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lr_at_step(total, total, cfg) == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_config_errors_name_values():
    with pytest.raises(ValueError, match="'fp8'"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_fingerprint_mismatch_names_both_values_and_paths():
    with pytest.raises(FingerprintMismatch) as e:
        check_fingerprints({"rna": "abc123", "dna": "d1"}, {"rna": "def456", "dna": "d1"}, "evaluating",
                           checkpoint_path="runs/x/checkpoint.pt", store_path="stores/rna.zarr")
    msg = str(e.value)
    for s in ("rna", "abc123", "def456", "runs/x/checkpoint.pt", "stores/rna.zarr"):
        assert s in msg
    assert "d1" not in msg and e.value.problems == [("rna", "abc123", "def456")]
    with pytest.raises(FingerprintMismatch, match="protein"):
        check_fingerprints({"rna": "a"}, {"rna": "a", "protein": "p"}, "")
    with pytest.raises(FingerprintMismatch, match="no 'dna' features"):
        check_fingerprints({"dna": "a"}, {}, "")
    check_fingerprints({"rna": "a"}, {"rna": "a"}, "")  # equal: no error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_amp_on_cuda(tmp_path, amp):
    cfg = dataclasses.replace(FAST, epochs=3, amp=amp, device="cuda")
    model = make_model()
    result = train(model, make_source(), cfg, tmp_path, **QUIET)
    assert result.amp == ("fp16" if amp == "fp16" else "bf16" if torch.cuda.is_bf16_supported() else "off")
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert next(model.parameters()).is_cuda
