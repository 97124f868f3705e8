"""End-to-end mode (fusion.finetune) on tiny real encoders: parity with cached mode, each encoder mode, bad input.

The fixture is test_pipeline's at a smaller size: synthetic data -> IsoFormer adapter -> stores of
tiny ESM2 / Nucleotide Transformer / Enformer models (hidden 16) built by embedcache. It needs the
`enformer` extra; each encoder family's fine-tuning capabilities
without it are in tests/embedcache/test_encoder_capabilities.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import fusion.finetune
from cli.fusion_cli import main as fusion_main
from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.tiny_models import make_tiny_enformer, make_tiny_esm2, make_tiny_nucleotide_transformer
from fusion.batch import Batch, ModalityBatch
from fusion.checkpoint import FingerprintMismatch, load_checkpoint
from fusion.data import DataConfig, open_batches
from fusion.experiment import load_run, read_manifest, run_train
from fusion.finetune import (
    ENCODER_MODES,
    EndToEndModel,
    FinetuneConfig,
    FinetuneError,
    load_finetune_run,
    load_live_encoders,
    load_store_encoder,
    make_finetune_optimizer,
    open_sequence_batches,
    run_finetune,
    set_encoder_mode_,
    warm_start_fusion,
)
from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic
from fusion.train import TrainConfig, predict, train

from embedcache.encoders.enformer import EXTRA, enformer_available

if not enformer_available():
    pytest.skip(f"the fixture's DNA encoder is Enformer: needs pip install 'embedcache[{EXTRA}]'", allow_module_level=True)

CPU = torch.device("cpu")
QUIET = lambda s: None  # noqa: E731
MODEL = {"d_model": 16, "head_hidden": 16}
SPLITS = ("train", "validation", "test")
RUN_FILES = ("run.json", "checkpoint.pt", "metrics.json", "predictions.csv", "history.csv", "log.txt",
             "report.md", "pred_vs_observed.png", "per_target_r2.png", "learning_curves.png")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: thread hand-offs cost more than the work (a conv of the tiny Enformer
    takes ~20 ms with 2 busy threads, under 1 ms with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_enformer(directory: Path, window: int) -> Path:
    """A tiny Enformer whose attention output projections are not zero, so q/k/v (LoRA's targets) get gradients."""
    return make_tiny_enformer(directory, dim=24, depth=2, target_length=window // 128, attention_out_std=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    syn = SyntheticConfig(n_genes=16, seed=3, dna_window=1024, utr3_length=(100, 300), noncoding_length=(150, 400), protein_length=(50, 150))
    info = generate_synthetic(root / "syn", syn)
    prepared = prepare_isoformer(info.csv_path, info.genome_path, root / "prep", IsoformerPrepareConfig(dna_window=info.dna_window))
    models = {
        "protein": ("esm2", make_tiny_esm2(root / "m" / "esm", hidden=16), {}),
        "rna": ("nucleotide-transformer", make_tiny_nucleotide_transformer(root / "m" / "nt", hidden=16), {}),
        "dna": ("enformer", tiny_enformer(root / "m" / "enf", info.dna_window), {"window": info.dna_window}),
    }
    stores = {}
    for modality, (encoder, model_dir, extra) in models.items():
        stores[modality] = str(root / f"{modality}.zarr")
        build(BuildConfig.create(encoder, str(model_dir), **extra), [prepared.out_dir / f"{modality}.fa"], stores[modality], progress=False, log=QUIET)
    return {"root": root, "prep": str(prepared.out_dir), "stores": stores, "models": models}


def data_config(data: dict, **kw) -> DataConfig:
    return DataConfig(manifest=data["prep"], stores=data["stores"], batch_size=8, **kw)


@pytest.fixture(scope="module")
def cached_run(data) -> Path:
    """A fusion model trained on the caches (2 epochs), as `fusion train` does it."""
    run = data["root"] / "cached_run"
    run_train(data_config(data), "cross-attention", MODEL, TrainConfig(epochs=2, batch_size=8), run, progress=False, log=QUIET)
    return run


def frozen_model(data: dict, config: DataConfig, fusion_model) -> EndToEndModel:
    batches = open_sequence_batches(config, read_manifest(config.manifest), log=QUIET)
    live = load_live_encoders(batches, device=CPU, precision="fp32", log=QUIET)
    model = EndToEndModel(live, fusion_model, features=config.features, max_tokens=config.max_tokens)
    model.configure_(FinetuneConfig(), log=QUIET)
    return model.eval()


# -- parity with cached mode -----------------------------------------------------------------------------


def test_sequences_are_those_kept_in_the_stores(data):
    batches = open_sequence_batches(data_config(data), read_manifest(data["prep"]), log=QUIET)
    for m, store in batches.stores.items():
        residues = batches.features[m].residues
        assert residues and all(store.sequence(k) == s for k, s in list(residues.items())[:10])


@pytest.mark.parametrize("features,max_tokens", [("tokens", None), ("tokens", 5), ("pooled", None)])
def test_frozen_live_features_equal_cached_features(data, features, max_tokens):
    config = data_config(data, features=features, max_tokens=max_tokens)
    cached = open_batches(config, read_manifest(config.manifest), log=QUIET)
    live_batches = open_sequence_batches(config, read_manifest(config.manifest), log=QUIET)
    model = frozen_model(data, config, build_model_for(live_batches))
    seen_absent_protein, n_samples = False, 0
    for split in SPLITS:
        for c, s in zip(cached(split), live_batches(split), strict=True):
            assert c.sample_ids == s.sample_ids and torch.equal(c.targets, s.targets) and torch.equal(c.target_mask, s.target_mask)
            with torch.no_grad():
                live = model.embed(s.features)
            for m, want in c.features.items():
                got = live[m]
                assert got.x.shape == want.x.shape, (split, m)
                assert torch.equal(got.mask, want.mask) and torch.equal(got.present, want.present), (split, m)
                # Per-token rows are float16 in the store: equal up to one fp16 step where compute noise
                # crosses a rounding boundary. Pooled vectors are float32: equal up to float32 noise.
                tol = (1e-3 if features == "tokens" else 1e-5) * float(want.x.abs().max())
                assert float((got.x - want.x).abs().max()) <= tol, (split, m)
            absent = ~c.features["protein"].present
            seen_absent_protein |= bool(absent.any())
            assert not live["protein"].mask[absent].any() and (live["protein"].x[absent] == 0).all()
            n_samples += len(c)
    assert seen_absent_protein, "the fixture has non-coding transcripts"
    assert n_samples == len(read_manifest(config.manifest))


def build_model_for(batches):
    from fusion.experiment import build_model

    return build_model(batches, "cross-attention", MODEL)


# Features agree to one float16 step (above), but the fusion model standardises each feature by its
# train-split std, and some dims of the tiny Enformer are nearly constant across genes (std ~8e-5,
# below the float16 step of ~1.2e-4 at their values): one rounding that flips between build and live
# (different batch shapes, different float32 noise) moves a prediction by up to ~3e-3. Most predictions
# agree to float32 noise.
PRED_ATOL = 1e-2


def assert_predictions_close(got: np.ndarray, want: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=PRED_ATOL * scale)
    assert float(np.median(np.abs(got - want))) <= 1e-5 * scale


def test_cached_checkpoint_predicts_the_same_through_frozen_live_encoders(data, cached_run):
    config = data_config(data)
    _, cached_model, _ = load_run(cached_run)
    cached = open_batches(config, read_manifest(config.manifest), log=QUIET)
    live_batches = open_sequence_batches(config, read_manifest(config.manifest), log=QUIET)
    model = frozen_model(data, config, warm_start_fusion(cached_run, live_batches, config))
    fusion_state, cached_state = model.fusion.state_dict(), cached_model.state_dict()
    assert set(fusion_state) == set(cached_state) and any(k.startswith("standardize.") for k in fusion_state)
    assert all(torch.equal(fusion_state[k], cached_state[k]) for k in cached_state)  # weights and standardisation
    for split in SPLITS:
        want = predict(cached_model, cached(split))
        got = predict(model, live_batches(split))
        assert got.sample_ids == want.sample_ids
        assert_predictions_close(got.pred, want.pred)


def test_frozen_finetune_trains_like_cached_mode(data, cached_run, tmp_path, capsys):
    """Same seed, frozen encoders, no warm start: standardisation fitted on live train features, then the same training."""
    result = run_finetune(data_config(data), "cross-attention", MODEL, TrainConfig(epochs=2, batch_size=8), FinetuneConfig(),
                          tmp_path / "run", progress=True, log=QUIET)  # fmt: skip
    bars = capsys.readouterr().err  # passes through the live encoders show progress: statistics, validation, the final evaluation
    assert "feature statistics (live encoders)" in bars and "validate epoch 1" in bars
    assert all(f"evaluate {split}" in bars for split in SPLITS)
    assert result.model.modes == {"dna": "frozen", "rna": "frozen", "protein": "frozen"}
    _, cached_model, _ = load_run(cached_run)
    for m, cached_stats in cached_model.standardize.items():  # equal up to half a float16 step at the features' scale
        live_stats = result.model.fusion.standardize[m]
        step = 2.0**-11 * float(cached_stats.mean.abs().max() + cached_stats.std.max())
        torch.testing.assert_close(live_stats.mean, cached_stats.mean, rtol=0, atol=step)
        torch.testing.assert_close(live_stats.std, cached_stats.std, rtol=0, atol=step)
    want = pd.read_csv(cached_run / "predictions.csv")
    got = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert list(got["sample_id"]) == list(want["sample_id"])
    pred = [c for c in want.columns if c.endswith("_pred")]
    # Two epochs spread the few flipped float16 roundings over every prediction: only the bound holds.
    np.testing.assert_allclose(got[pred].to_numpy(), want[pred].to_numpy(), rtol=0, atol=PRED_ATOL * max(1.0, float(want[pred].abs().max().max())))
    history = [pd.read_csv(r / "history.csv") for r in (cached_run, tmp_path / "run")]
    np.testing.assert_allclose(history[1]["train_loss"], history[0]["train_loss"], rtol=1e-3)


# -- training modes --------------------------------------------------------------------------------------


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each tensor once (Enformer registers its blocks twice); LoRA's
    `base_layer` wrapping removed from names so they match the original model's."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {k.replace(".base_layer", ""): v.detach() for k, v in named.items()}


def changed(data: dict, result) -> dict[str, set[str]]:
    """Per modality, the names of encoder tensors that differ from the encoder the store was built with."""
    out = {}
    for m, path in data["stores"].items():
        before = tensors(load_store_encoder(open_store(path), m, device="cpu", precision="fp32").encoder.model)
        after = {k: v for k, v in tensors(result.model.encoders[m]).items() if ".lora_" not in k}
        assert set(after) == set(before), m
        out[m] = {k for k in before if not torch.equal(before[k], after[k])}
    return out


def finetune_args(data: dict, run: Path, *extra: str) -> list[str]:
    stores = [a for m, p in data["stores"].items() for a in ("--store", f"{m}={p}")]
    return ["finetune", "--manifest", data["prep"], *stores, "--batch-size", "8", "--d-model", "16", "--head-hidden", "16",
            "--epochs", "1", "--encoder-lr", "1e-3", "--no-progress", "--out", str(run), *extra]  # fmt: skip


def run_cli(monkeypatch, args: list[str]):
    """Run `fusion finetune` and return the library result it got (the trained model included)."""
    seen = {}
    real = fusion.finetune.run_finetune

    def spy(*a, **kw):
        seen["result"] = real(*a, **kw)
        return seen["result"]

    monkeypatch.setattr(fusion.finetune, "run_finetune", spy)
    assert fusion_main(args) == 0
    return seen["result"]


def check_run_dir(run: Path, modes: dict[str, str]) -> dict:
    for name in RUN_FILES:
        assert (run / name).stat().st_size > 0, name
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["mode"] == "finetune" and run_json["encoder_modes"] == modes
    assert run_json["model"]["input_dims"] == {"dna": 48, "rna": 16, "protein": 16}  # from the stores' attrs
    metrics = json.loads((run / "metrics.json").read_text())["splits"]
    assert set(metrics) == set(SPLITS) and np.isfinite(metrics["test"]["mean_r2"])
    return load_checkpoint(run / "checkpoint.pt")


@pytest.mark.parametrize("mode", ENCODER_MODES)
def test_each_encoder_mode_trains_what_it_should(data, tmp_path, monkeypatch, mode):
    run = tmp_path / "run"
    modes = {m: mode for m in ("dna", "rna", "protein")}
    result = run_cli(monkeypatch, finetune_args(data, run, *[a for m in modes for a in ("--encoder-mode", f"{m}={mode}")]))
    checkpoint = check_run_dir(run, modes)
    state = checkpoint["model_state"]
    assert any(k.startswith("fusion.standardize.") for k in state)
    diff = changed(data, result)
    for m in modes:
        saved = [k for k in state if k.startswith(f"encoders.{m}.")]
        if mode == "frozen":
            assert diff[m] == set() and saved == [], m
        elif mode == "full":
            first = {"dna": "stem.", "rna": "encoder.layer.0.", "protein": "encoder.layer.0."}[m]
            last = {"dna": "transformer.1.", "rna": "encoder.layer.1.", "protein": "encoder.layer.1."}[m]
            assert any(k.startswith(first) for k in diff[m]) and any(k.startswith(last) for k in diff[m]), m
            assert len(saved) == len(result.model.encoders[m].state_dict()), m
        elif mode == "lora":
            assert diff[m] == set(), f"{m}: base weights changed: {sorted(diff[m])[:5]}"
            lora_b = {k: v for k, v in tensors(result.model.encoders[m]).items() if ".lora_B." in k}
            assert lora_b and all(bool(v.abs().sum() > 0) for v in lora_b.values()), m  # LoRA B starts at zero
            assert saved and all(".lora_" in k for k in saved), m
        else:  # last-n, N = 1: the last block and the modules after it
            trained = {"dna": ("transformer.1.", "final_pointwise."), "rna": ("encoder.layer.1.", "encoder.emb_layer_norm_after."),
                       "protein": ("encoder.layer.1.", "encoder.emb_layer_norm_after.")}[m]  # fmt: skip
            assert diff[m] and all(k.startswith(trained) for k in diff[m]), f"{m}: changed outside the last block: {sorted(diff[m])}"
            assert any(k.startswith(trained[0]) for k in diff[m]), m
            assert saved and all(k.split(".", 2)[2].startswith(trained) for k in saved), m


def test_cli_mixed_modes_with_warm_start_accumulation_and_checkpointing(data, cached_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    modes = {"dna": "lora", "rna": "last-n", "protein": "full"}
    extra = [a for m, mode in modes.items() for a in ("--encoder-mode", f"{m}={mode}")]
    result = run_cli(monkeypatch, finetune_args(data, run, *extra, "--grad-accum", "2", "--gradient-checkpointing", "--init-from", str(cached_run)))
    check_run_dir(run, modes)
    resolved = json.loads((run / "run.json").read_text())["resolved"]
    assert resolved["batches_per_epoch"] == 5 and resolved["steps_per_epoch"] == 3  # 34 train samples, batches of 8, 2 per step
    assert json.loads((run / "run.json").read_text())["finetune"]["init_from"] == str(cached_run)
    # Gradients reach what trains through checkpointed blocks: Enformer's first block (reentrant
    # checkpoint, frozen input), the first ESM block (HF non-reentrant checkpoint).
    diff = changed(data, result)
    assert diff["dna"] == set()
    lora_b = {k: v for k, v in tensors(result.model.encoders["dna"]).items() if ".lora_B." in k}
    assert any(k.startswith("transformer.0.") for k in lora_b) and all(bool(v.abs().sum() > 0) for v in lora_b.values())
    assert diff["rna"] and all(k.startswith(("encoder.layer.1.", "encoder.emb_layer_norm_after.")) for k in diff["rna"])
    assert any(k.startswith("encoder.layer.0.") for k in diff["protein"])
    # The checkpoint alone (with the stores) rebuilds the trained model: same predictions as written.
    _, model, batches = load_finetune_run(run, log=QUIET)
    got = predict(model, batches("test"), target_names=batches.target_names)
    want = pd.read_csv(run / "predictions.csv").query("split == 'test'")
    np.testing.assert_allclose(got.pred, want[[f"{t}_pred" for t in got.target_names]].to_numpy(), rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_sums_batches_into_one_step(tmp_path):
    """grad_accum=2 over two batches of 4 takes the step one batch of 8 takes (equal valid counts, no clipping)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 3), torch.randn(8, 2)

    class Source:
        def __init__(self, batch_size: int):
            self.batch_size = batch_size

        def __call__(self, split, *, shuffle=False, epoch=0):
            for s in range(0, 8, self.batch_size):
                sl = slice(s, s + self.batch_size)
                n = len(x[sl])
                yield Batch({"a": ModalityBatch(x[sl], torch.ones(n, 1, dtype=torch.bool), torch.ones(n, dtype=torch.bool))},
                            y[sl], torch.ones(n, 2, dtype=torch.bool), [str(i) for i in range(s, s + n)])  # fmt: skip

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, features):
            return self.lin(features["a"].x[:, 0])

    weights = []
    for batch_size, accum in ((8, 1), (4, 2)):
        torch.manual_seed(1)
        model = Linear()
        config = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=accum, grad_clip=0, warmup_fraction=0, device="cpu")
        train(model, Source(batch_size), config, tmp_path / f"r{accum}", progress=False, log=QUIET)
        weights.append(model.lin.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])


# -- bad input -------------------------------------------------------------------------------------------


def store_copy_with_model(src: str, dst: Path, model: str) -> str:
    """A copy of a store whose recorded model location is `model` (as if the directory had moved)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "zarr.json").read_text())
    meta["attributes"]["embedcache"]["config"]["model"] = model
    (dst / "zarr.json").write_text(json.dumps(meta))
    return str(dst)


def test_store_whose_model_moved_or_changed_is_refused(data, tmp_path, capsys):
    moved = store_copy_with_model(data["stores"]["protein"], tmp_path / "moved.zarr", str(tmp_path / "gone" / "esm"))
    config = DataConfig(manifest=data["prep"], stores={**data["stores"], "protein": moved}, batch_size=8)
    batches = open_sequence_batches(config, read_manifest(data["prep"]), log=QUIET)
    with pytest.raises(FinetuneError, match=r"protein: store .*moved\.zarr.* esm2 model .*gone/esm.*does not exist"):
        load_live_encoders(batches, device=CPU, precision="fp32", log=QUIET)

    other = make_tiny_esm2(tmp_path / "esm_seed1", hidden=16, seed=1)  # same architecture, other weights
    changed_store = store_copy_with_model(data["stores"]["protein"], tmp_path / "changed.zarr", str(other))
    with pytest.raises(FinetuneError, match=r"changed\.zarr.*esm_seed1.*weights there now differ.*weights_sha256"):
        load_store_encoder(open_store(changed_store), "protein", device="cpu", precision="fp32")

    # Through the CLI: one line, exit code 2.
    args = finetune_args(data, tmp_path / "run")
    args[args.index(f"protein={data['stores']['protein']}")] = f"protein={moved}"
    assert fusion_main(args) == 2
    err = capsys.readouterr().err
    assert "moved.zarr" in err and str(tmp_path / "gone" / "esm") in err


def test_unknown_encoder_mode_lists_the_valid_ones(data, tmp_path, capsys):
    with pytest.raises(FinetuneError, match="valid modes are: frozen, full, lora, last-n"):
        FinetuneConfig(encoder_modes={"rna": "partial"})
    assert fusion_main(finetune_args(data, tmp_path / "run", "--encoder-mode", "rna=partial")) == 2
    err = capsys.readouterr().err
    assert "'partial'" in err and "frozen, full, lora, last-n" in err
    assert fusion_main(finetune_args(data, tmp_path / "run", "--encoder-mode", "rna")) == 2
    assert "MODALITY=MODE" in capsys.readouterr().err


def test_other_refusals(data, cached_run, tmp_path):
    config = data_config(data)
    batches = open_sequence_batches(config, read_manifest(data["prep"]), log=QUIET)
    live = load_live_encoders(batches, device=CPU, precision="fp32", log=QUIET)
    model = EndToEndModel(live, build_model_for(batches), features="tokens", max_tokens=None)
    with pytest.raises(FinetuneError, match=r"--last-n 3.*1\.\.2 blocks"):
        model.configure_(FinetuneConfig(encoder_modes={"protein": "last-n"}, last_n=3), log=QUIET)
    with pytest.raises(FinetuneError, match=r"modalities \['atac'\] that this run does not use"):
        frozen_model(data, config, build_model_for(batches)).configure_(FinetuneConfig(encoder_modes={"atac": "full"}), log=QUIET)
    with pytest.raises(FinetuneError, match="trained with features='tokens', this run has features='pooled'"):
        warm_start_fusion(cached_run, batches, data_config(data, features="pooled"))
    # A warm start needs the stores the cached run was trained on.
    rna_layer1 = tmp_path / "rna_layer1.zarr"
    encoder, model_dir, _ = data["models"]["rna"]
    build(BuildConfig.create(encoder, str(model_dir), layers=(1,)), [Path(data["prep"]) / "rna.fa"], rna_layer1, progress=False, log=QUIET)
    other = DataConfig(manifest=data["prep"], stores={**data["stores"], "rna": str(rna_layer1)}, batch_size=8)
    with pytest.raises(FingerprintMismatch, match="rna"):
        warm_start_fusion(cached_run, open_sequence_batches(other, read_manifest(data["prep"]), log=QUIET), other)


def test_optimizer_gives_encoders_their_own_learning_rate(data):
    config = data_config(data)
    batches = open_sequence_batches(config, read_manifest(data["prep"]), log=QUIET)
    live = load_live_encoders(batches, device=CPU, precision="fp32", log=QUIET)
    model = EndToEndModel(live, build_model_for(batches), features="tokens", max_tokens=None)
    model.configure_(FinetuneConfig(encoder_modes={"protein": "full"}), log=QUIET)
    optimizer = make_finetune_optimizer(model, TrainConfig(lr=1e-3), FinetuneConfig(encoder_lr=1e-5))
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert len(scale) == sum(len(g["params"]) for g in optimizer.param_groups)  # each parameter once
    assert all(scale[id(p)] == 1.0 for p in model.fusion.parameters())
    assert all(scale[id(p)] == pytest.approx(1e-2) for p in model.encoders["protein"].parameters())
    assert not any(id(p) in scale for m in ("dna", "rna") for p in model.encoders[m].parameters())
