"""Tiny-config tests of the fusion models: one suite that every aggregator must pass."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from fusion.batch import Batch, ModalityBatch
from fusion.models import (
    AGGREGATORS,
    FusionModel,
    FusionModelConfig,
    MeanConcat,
    get_aggregator,
    input_dims_from_dict,
    masked_mean,
)
from fusion.models.c_abstractor import masked_adaptive_avg_pool
from fusion.models.fusion_model import ResidualHead, fit_feature_stats_
from fusion.models.cross_attention import CrossAttentionAggregator, MaskedAttention

ALL = ("dna", "rna", "protein")
DIMS = {"dna": 12, "rna": 8, "protein": 6}
MAX_LEN = {"dna": 5, "rna": 7, "protein": 4}
AGGS = sorted(AGGREGATORS)
SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations(ALL, k)]
# Aggregators whose h_multi is one d_model slice per modality, in config order.
PER_MODALITY = ["c-abstractor", "cross-attention", "linear", "mean-concat"]


def make_config(aggregator: str, modalities: tuple[str, ...] = ALL, **overrides) -> FusionModelConfig:
    # pooled_probe on: every test below (masks, garbage, absent modalities, gradients) covers its path too
    kwargs = dict(d_model=16, n_layers=2, n_heads=2, n_latents=3, dropout=0.0, head_hidden=16, pooled_probe=True)
    kwargs.update(overrides)
    return FusionModelConfig(
        modalities=modalities,
        input_dims=input_dims_from_dict(DIMS, modalities),
        n_targets=3,
        target_names=("t0", "t1", "t2"),
        aggregator=aggregator,
        **kwargs,
    )


def make_model(aggregator: str, modalities: tuple[str, ...] = ALL, **overrides) -> FusionModel:
    """A model in eval mode whose every parameter is nudged off its init: zero-initialised
    biases (LayerNorm, Linear) would otherwise keep padded positions at zero and hide a leak."""
    torch.manual_seed(0)
    model = FusionModel(make_config(aggregator, modalities, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_features(modalities: tuple[str, ...] = ALL, b: int = 4, pooled: bool = False, seed: int = 1) -> dict[str, ModalityBatch]:
    """Random features with random lengths >= 1 (padding at the end, zero there), all present."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modalities:
        n = 1 if pooled else MAX_LEN[m]
        lengths = torch.randint(1, n + 1, (b,), generator=g)
        mask = torch.arange(n)[None, :] < lengths[:, None]  # (b, n)
        x = torch.randn(b, n, DIMS[m], generator=g) * mask[..., None]
        out[m] = ModalityBatch(x=x, mask=mask, present=torch.ones(b, dtype=torch.bool))
    return out


def with_garbage_padding(features: dict[str, ModalityBatch], extra: int = 3) -> dict[str, ModalityBatch]:
    """Append `extra` padded positions holding garbage (large values, NaN, inf) under a False mask."""
    g = torch.Generator().manual_seed(99)
    out = {}
    for m, f in features.items():
        b, _, d = f.x.shape
        junk = torch.randn(b, extra, d, generator=g) * 1e3
        junk[:, 0, 0] = float("nan")
        junk[:, -1, -1] = float("inf")
        x = torch.cat([f.x, junk], dim=1)
        mask = torch.cat([f.mask, torch.zeros(b, extra, dtype=torch.bool)], dim=1)
        out[m] = ModalityBatch(x=x, mask=mask, present=f.present)
    return out


def make_absent(features: dict[str, ModalityBatch], modality: str, sample: int, fill: float) -> dict[str, ModalityBatch]:
    """Mark `modality` absent for `sample` (present False, mask all False) with x filled by `fill` there."""
    out = dict(features)
    f = features[modality]
    x, mask, present = f.x.clone(), f.mask.clone(), f.present.clone()
    x[sample] = fill
    mask[sample] = False
    present[sample] = False
    out[modality] = ModalityBatch(x=x, mask=mask, present=present)
    return out


def select(features: dict[str, ModalityBatch], i: int, trim: bool) -> dict[str, ModalityBatch]:
    """Sample i alone; with `trim`, cut to its own longest real token (at least one position)."""
    out = {}
    for m, f in features.items():
        n = max(int(f.mask[i].sum()), 1) if trim else f.x.shape[1]
        out[m] = ModalityBatch(x=f.x[i : i + 1, :n], mask=f.mask[i : i + 1, :n], present=f.present[i : i + 1])
    return out


def capture_h_multi(model: FusionModel, features: dict[str, ModalityBatch]) -> torch.Tensor:
    captured = []
    handle = model.aggregator.register_forward_hook(lambda _mod, _inp, out: captured.append(out))
    with torch.no_grad():
        model(features)
    handle.remove()
    return captured[0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine thread
    contention made the overfit test 10x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- shape, subsets, pooled inputs, gradients -------------------------------------------


@pytest.mark.parametrize("pooled", [False, True], ids=["per-token", "pooled"])
@pytest.mark.parametrize("aggregator", AGGS)
def test_output_shape(aggregator: str, pooled: bool) -> None:
    model = make_model(aggregator)
    out = model(make_features(b=5, pooled=pooled))
    assert out.shape == (5, 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("modalities", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("aggregator", AGGS)
def test_any_subset_of_modalities(aggregator: str, modalities: tuple[str, ...]) -> None:
    model = make_model(aggregator, modalities)
    for pooled in (False, True):
        out = model(make_features(modalities, b=3, pooled=pooled))
        assert out.shape == (3, 3)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("modalities", [ALL, ("rna",)], ids=["all", "rna-only"])
@pytest.mark.parametrize("aggregator", AGGS)
def test_gradient_reaches_every_parameter(aggregator: str, modalities: tuple[str, ...]) -> None:
    model = make_model(aggregator, modalities).train()
    # Garbage (NaN, inf) under the masks must not reach the gradients either.
    features = make_absent(with_garbage_padding(make_features(modalities)), modalities[-1], sample=0, fill=float("nan"))
    model(features).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# --- masking --------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", [False, True], ids=["per-token", "pooled"])
@pytest.mark.parametrize("aggregator", AGGS)
def test_padding_invariance(aggregator: str, pooled: bool) -> None:
    model = make_model(aggregator)
    features = make_features(pooled=pooled)
    with torch.no_grad():
        ref = model(features)
        padded = model(with_garbage_padding(features))
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregator", AGGS)
def test_absent_modality_is_masked_not_read(aggregator: str) -> None:
    model = make_model(aggregator)
    features = make_features()
    features = make_absent(features, "protein", sample=0, fill=0.0)
    # Sample 1 has only DNA: its cross-attention keys (RNA + protein) are all masked.
    features = make_absent(make_absent(features, "protein", sample=1, fill=0.0), "rna", sample=1, fill=0.0)
    with torch.no_grad():
        ref = model(features)
        garbage = make_absent(make_absent(features, "protein", 0, float("nan")), "rna", 1, 1e6)
        garbage = make_absent(garbage, "protein", 1, -float("inf"))
        out = model(garbage)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("aggregator", PER_MODALITY)
def test_absent_modality_contributes_zeros_to_h_multi(aggregator: str) -> None:
    model = make_model(aggregator)
    features = make_absent(make_features(), "rna", sample=2, fill=3.0)
    h_multi = capture_h_multi(model, features)  # (b, 3 * d)
    d = model.config.d_model
    rna = ALL.index("rna")
    assert torch.equal(h_multi[2, rna * d : (rna + 1) * d], torch.zeros(d))
    assert h_multi[2].abs().sum() > 0 and h_multi[0, rna * d : (rna + 1) * d].abs().sum() > 0


@pytest.mark.parametrize("aggregator", AGGS)
def test_every_modality_absent_is_finite(aggregator: str) -> None:
    model = make_model(aggregator)
    features = make_features(b=2)
    for m in ALL:
        features = make_absent(features, m, sample=0, fill=float("nan"))
    with torch.no_grad():
        assert torch.isfinite(model(features)).all()


@pytest.mark.parametrize("aggregator", AGGS)
def test_batch_independence(aggregator: str) -> None:
    model = make_model(aggregator)
    features = make_absent(make_features(b=5), "protein", sample=3, fill=0.0)
    with torch.no_grad():
        batched = model(features)
        for i in range(5):
            for trim in (False, True):
                alone = model(select(features, i, trim))
                torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)


def test_attention_update_is_zero_without_keys_and_ignores_masked_keys() -> None:
    torch.manual_seed(0)
    attn = MaskedAttention(d_model=8, n_heads=2).eval()
    queries = torch.randn(2, 3, 8)
    context = torch.randn(2, 5, 8) * 100
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = attn(queries, context, mask)  # (2, 3, 8)
    assert torch.equal(out[1], torch.zeros(3, 8))  # no real key: zero update, not NaN
    torch.testing.assert_close(out[0], attn(queries[:1], context[:1, :2], mask[:1, :2])[0])


def test_cross_attention_with_one_modality_keeps_a_per_row_nonlinearity() -> None:
    """One modality: feed-forward layers only (nothing to attend to). They start as the identity (mean pooling),
    and once trained they read what the mean of the rows cannot: two samples with the same mean row differ."""
    torch.manual_seed(0)
    aggregator = CrossAttentionAggregator(modalities=("rna",), d_model=4, n_layers=2, n_heads=2, dropout=0.0)
    assert len(aggregator.layers) == 2 and not hasattr(aggregator.layers[0]["rna"], "attn")
    tokens = {"rna": torch.randn(3, 5, 4)}
    masks = {"rna": torch.rand(3, 5) > 0.5}
    masks["rna"][:, 0] = True
    tokens = {"rna": torch.where(masks["rna"][..., None], tokens["rna"], 0.0)}
    torch.testing.assert_close(aggregator(tokens, masks), masked_mean(tokens["rna"], masks["rna"]))
    with torch.no_grad():
        for p in aggregator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    spread = torch.tensor([[[1.0, -2.0, 0.5, 3.0], [-1.0, 2.0, -0.5, -3.0]]])  # (1, 2, 4): mean row 0
    flat = torch.zeros(1, 2, 4)  # the same mean row, no spread
    both = torch.ones(1, 2, dtype=torch.bool)
    assert not torch.allclose(aggregator({"rna": spread}, {"rna": both}), aggregator({"rna": flat}, {"rna": both}))


def test_single_modality_cross_attention_checkpoint_without_layers_loads_as_mean_pooling() -> None:
    """A checkpoint saved when one-modality cross-attention had no layers loads, and predicts as it did then."""
    model = make_model("cross-attention", ("rna",))
    old_state = {k: v for k, v in model.state_dict().items() if not k.startswith("aggregator.layers.")}
    old = make_model("mean-concat", ("rna",))
    old.load_state_dict(old_state)  # the layerless model had exactly mean-concat's entries
    model.load_state_dict(old_state)
    features = make_features(("rna",))
    with torch.no_grad():
        torch.testing.assert_close(model(features), old(features))
    with pytest.raises(RuntimeError, match="Missing key"):  # a multi-modality checkpoint still needs its layers
        two = make_model("cross-attention", ("dna", "rna"))
        two.load_state_dict({k: v for k, v in two.state_dict().items() if not k.startswith("aggregator.layers.")})


def test_cross_attention_starts_as_mean_concat_and_learns_to_mix() -> None:
    """Zero-initialised residual branches: a new cross-attention aggregator is mean-concat pooling; once its
    branches are off zero (as after training), a modality's output depends on the other modalities' tokens."""
    torch.manual_seed(0)
    modalities = ("dna", "rna", "protein")
    aggregator = CrossAttentionAggregator(modalities=modalities, d_model=8, n_layers=2, n_heads=2, dropout=0.0)
    tokens = {m: torch.randn(3, 5, 8) for m in modalities}
    masks = {m: torch.rand(3, 5) > 0.3 for m in modalities}
    tokens = {m: torch.where(masks[m][..., None], x, 0.0) for m, x in tokens.items()}
    concat = MeanConcat(modalities=modalities, d_model=8)
    torch.testing.assert_close(aggregator(tokens, masks), concat(tokens, masks))
    with torch.no_grad():
        for p in aggregator.parameters():
            p.add_(0.1 * torch.randn_like(p))
    changed = {**tokens, "protein": torch.where(masks["protein"][..., None], torch.randn(3, 5, 8), 0.0)}
    dna = slice(0, 8)  # h_multi's dna part
    assert not torch.allclose(aggregator(tokens, masks)[:, dna], aggregator(changed, masks)[:, dna])


def test_masked_mean_ignores_masked_values_and_gives_zeros_when_empty() -> None:
    x = torch.tensor([[[1.0], [3.0], [float("nan")]], [[5.0], [7.0], [9.0]]])  # (2, 3, 1)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0], [0.0]]))


@pytest.mark.parametrize("n_out", [1, 3, 4, 7])
def test_masked_adaptive_pool_matches_torch_on_real_tokens(n_out: int) -> None:
    torch.manual_seed(0)
    n, d = 9, 2
    lengths = [9, 5, 3, 1, 0]
    x = torch.randn(len(lengths), n, d)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x[~mask] = float("nan")  # padding must not leak
    pooled, out_mask = masked_adaptive_avg_pool(x, mask, n_out)
    for i, length in enumerate(lengths):
        if length == 0:
            assert not out_mask[i].any() and torch.equal(pooled[i], torch.zeros(n_out, d))
            continue
        expected = F.adaptive_avg_pool1d(x[i, :length].T[None], n_out)[0].T  # (n_out, d)
        assert out_mask[i].all()
        torch.testing.assert_close(pooled[i], expected)


# --- errors, registry, config -----------------------------------------------------------


def test_unknown_aggregator_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'transformer'") as e:
        make_config("transformer")
    for name in AGGREGATORS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="valid names"):
        get_aggregator("nope")


def test_features_must_match_configured_modalities() -> None:
    model = make_model("mean-concat", ("dna", "rna"))
    with pytest.raises(ValueError, match=r"\['protein'\]"):
        model(make_features(ALL))
    with pytest.raises(ValueError, match=r"missing modalities \['rna'\]"):
        model(make_features(("dna",)))
    bad = make_features(("dna", "rna"))
    bad["rna"] = ModalityBatch(x=torch.zeros(4, 2, 5), mask=torch.ones(4, 2, dtype=torch.bool), present=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="width 5 .* input dim 8"):
        model(bad)


def test_config_round_trip_through_json() -> None:
    config = make_config("perceiver", ("rna", "dna"), n_latents=5)
    d = json.loads(json.dumps(config.to_dict()))
    assert d["input_dims"] == {"rna": 8, "dna": 12}
    restored = FusionModelConfig.from_dict(d)
    assert restored == config
    assert restored.input_dim("dna") == 12
    FusionModel(restored)  # rebuilds


def test_config_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match="unknown FusionModelConfig keys \\['colour'\\]"):
        FusionModelConfig.from_dict({**make_config("linear").to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="input_dims are for \\['dna'\\] but modalities are \\['dna', 'rna'\\]"):
        FusionModelConfig(modalities=("dna", "rna"), input_dims=(("dna", 4),), n_targets=1, target_names=("a",), aggregator="linear")
    with pytest.raises(ValueError, match="no input dim for modalities \\['protein'\\]"):
        input_dims_from_dict({"dna": 4}, ("dna", "protein"))
    with pytest.raises(ValueError, match="d_model \\(10\\) is not a multiple of n_heads \\(4\\)"):
        make_config("cross-attention", d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="target_names has 3 names but n_targets is 2"):
        FusionModelConfig(modalities=("dna",), input_dims=(("dna", 4),), n_targets=2, target_names=("a", "b", "c"), aggregator="linear")


def test_linear_head_is_a_single_linear() -> None:
    assert isinstance(make_model("linear").head, torch.nn.Linear)
    assert isinstance(make_model("mean-concat").head, ResidualHead)  # the default head: MLP + linear skip
    assert isinstance(make_model("mean-concat", head="mlp").head, torch.nn.Sequential)


# --- learning ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregator", ["cross-attention", "mean-concat"])
def test_overfits_a_small_learnable_target(aggregator: str) -> None:
    torch.manual_seed(0)
    features = make_features(b=16, seed=3)
    features = make_absent(features, "protein", sample=5, fill=0.0)
    # A learnable target: a fixed random function of the per-modality mean features.
    pooled = torch.cat([masked_mean(f.x, f.mask) for f in features.values()], dim=-1)  # (16, 26)
    target = torch.tanh(pooled @ torch.randn(pooled.shape[-1], 3))  # (16, 3)
    model = FusionModel(make_config(aggregator)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = F.mse_loss(model(features), target).item()
    for _ in range(100):
        opt.zero_grad()
        loss = F.mse_loss(model(features), target)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = F.mse_loss(model(features), target).item()
    assert end < 0.1 * start, f"MSE went from {start:.4f} to {end:.4f}"


def test_targets_are_standardised_inside_the_model_and_predicted_in_their_units() -> None:
    """fit_feature_stats_ fits the target statistics on valid values only; forward() answers in target units;
    the statistics travel in the state dict; the training loss weighs every target the same."""
    from fusion.batch import Batch
    from fusion.models.fusion_model import fit_feature_stats_
    from fusion.train import standardized_loss

    torch.manual_seed(0)
    config = FusionModelConfig(modalities=("rna",), input_dims=input_dims_from_dict(DIMS, ("rna",)), n_targets=2,
                               target_names=("a", "b"), aggregator="mean-concat", d_model=16, head_hidden=16, dropout=0.0)
    model = FusionModel(config)
    features = make_features(("rna",), b=64, pooled=True)
    targets = torch.stack([100 + 10 * torch.randn(64), -3 + 0.1 * torch.randn(64)], dim=1)  # (64, 2): far apart in level and spread
    mask = torch.ones(64, 2, dtype=torch.bool)
    mask[:5, 0] = False
    garbage = targets.clone()
    garbage[:5, 0] = 1e9  # masked: must not enter the statistics
    fit_feature_stats_(model, [Batch(features=features, targets=garbage, target_mask=mask, sample_ids=[str(i) for i in range(64)])])
    norm = model.target_norm
    assert norm.mean[0] == pytest.approx(float(targets[5:, 0].mean()), rel=1e-5)
    assert norm.std[1] == pytest.approx(float(targets[:, 1].std(unbiased=False)), rel=1e-4)
    model.eval()
    with torch.no_grad():
        pred = model(features)  # (64, 2): an untrained head predicts near the training mean, in target units
    assert (pred[:, 0] - 100).abs().max() < 30 and (pred[:, 1] + 3).abs().max() < 0.5
    assert {"target_norm.mean", "target_norm.std"} <= set(model.state_dict())
    # Standardised loss: the wide target does not drown the narrow one.
    off = targets + torch.stack([norm.std[0].expand(64), norm.std[1].expand(64)], dim=1)  # one std off on both
    assert float(standardized_loss(model, off, targets, torch.ones_like(mask))) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("head", ["mlp", "residual", "linear"])
def test_heads_build_and_run(head: str) -> None:
    model = make_model("mean-concat", head=head)
    assert model(make_features(pooled=True)).shape == (4, model.config.n_targets)
    with pytest.raises(ValueError, match="unknown head 'big'"):
        make_config("mean-concat", head="big")


def test_the_pooled_probe_starts_at_zero_and_reads_means_standardised_between_samples() -> None:
    """At initialisation the model predicts what it does without the probe; fitted, the probe reads each
    modality's mean token, standardised by the mean and spread of those means over samples (not over tokens)."""
    features = make_features(b=6)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = FusionModel(make_config("cross-attention", pooled_probe=False)).eval()
        torch.manual_seed(0)
        probed = FusionModel(make_config("cross-attention")).eval()
        torch.testing.assert_close(probed(features), plain(features), atol=0, rtol=0)

    batch = Batch(sample_ids=[str(i) for i in range(6)], features=features, targets=torch.randn(6, 3),
                  target_mask=torch.ones(6, 3, dtype=torch.bool))
    fit_feature_stats_(probed, [batch])
    for m, f in features.items():
        means = (f.x * f.mask[..., None]).sum(1) / f.mask.sum(1, keepdim=True)  # (b, d): each sample's mean token
        torch.testing.assert_close(probed.standardize_mean[m].mean, means.mean(0))
        torch.testing.assert_close(probed.standardize_mean[m].std, means.std(0).clamp_min(1e-2 * float(means.std(0).median())))
        assert not torch.allclose(probed.standardize_mean[m].std, probed.standardize[m].std)  # not the spread over tokens


def test_the_pooled_probe_reads_only_real_tokens_of_present_samples() -> None:
    """forward = the model without the probe + W @ clip((mean - mu) / sigma) + b, the mean over real tokens of
    present samples only: zero for an absent one even with True mask positions and garbage (NaN, 1e6) under it."""
    torch.manual_seed(0)
    model = make_model("cross-attention")  # every parameter off its init, the probe's too
    with torch.no_grad():
        for m, d in DIMS.items():
            model.standardize_mean[m].mean.copy_(torch.randn(d))
            model.standardize_mean[m].std.copy_(torch.rand(d) + 0.05)
    features = with_garbage_padding(make_features(b=5))
    f = features["rna"]  # sample 3: rna absent, its mask left True and its values garbage
    x = f.x.clone()
    x[3] = 1e6
    x[3, 0, 0] = float("nan")
    features["rna"] = ModalityBatch(x=x, mask=f.mask, present=torch.tensor([True, True, True, False, True]))
    with torch.no_grad():
        got = model(features)
        parts = []
        for m in ALL:
            keep = features[m].mask & features[m].present[:, None]  # (b, n)
            mean = torch.where(keep[..., None], features[m].x, 0.0).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
            z = ((mean - model.standardize_mean[m].mean) / model.standardize_mean[m].std).clamp(-10, 10)
            parts.append(torch.where(keep.any(1, keepdim=True), z, 0.0))
        probe = model.pooled_probe(torch.cat(parts, dim=-1))
        model.pooled_probe.weight.zero_()
        model.pooled_probe.bias.zero_()
        without = model(features)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, model.target_norm.decode(model.target_norm.encode(without) + probe))


def test_the_pooled_probe_is_fitted_on_present_samples_and_floored_by_the_token_spread() -> None:
    torch.manual_seed(0)
    model = FusionModel(make_config("mean-concat", ("dna",)))
    b, n, d = 8, 5, DIMS["dna"]
    x = torch.randn(b, n, d)
    x[:, :, 0] = torch.arange(b)[:, None] * 1e-6 + torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0])  # feature 0: rows differ, means barely
    present = torch.tensor([True] * 6 + [False] * 2)
    x[~present] = float("nan")  # absent samples: never read
    batch = Batch(sample_ids=list(map(str, range(b))), features={"dna": ModalityBatch(x=x, mask=torch.ones(b, n, dtype=torch.bool), present=present)},
                  targets=torch.randn(b, 3), target_mask=torch.ones(b, 3, dtype=torch.bool))  # fmt: skip
    fit_feature_stats_(model, [batch])
    norm, means = model.standardize_mean["dna"], x[present].double().mean(1)  # (6, d)
    torch.testing.assert_close(norm.mean, means.mean(0).float())
    assert torch.isfinite(norm.std).all() and (norm.std >= model.standardize["dna"].std / 100 - 1e-7).all()
    assert norm.std[0] >= model.standardize["dna"].std[0] / 100 - 1e-7 > 1e-2 * float(norm.std.median())  # this floor binds
