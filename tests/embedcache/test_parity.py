"""Stored embeddings equal a direct, single-sequence forward pass of the same model, whatever the batching.

The reference side calls transformers / enformer-pytorch directly, never embedcache code.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, EsmModel

from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.embed import embed_sequences
from embedcache.encoders import load_encoder

from .conftest import requires_enformer, write_fasta

FP16 = dict(rtol=2e-3, atol=2e-3)  # per-token rows are stored in float16
FP32 = dict(rtol=1e-4, atol=1e-5)  # pooled vectors are float32; batched vs single matmuls differ slightly

AA = "ACDEFGHIKLMNPQRSTVWY"


def random_seqs(alphabet: str, lengths: list[int], seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    return {f"s{i}_{n}": "".join(rng.choice(alphabet) for _ in range(n)) for i, n in enumerate(lengths)}


def build_store(tmp_path, name, encoder, model, records, **config):
    fasta = write_fasta(tmp_path / f"{name}.fa", records)
    store = tmp_path / f"{name}.zarr"
    build(BuildConfig.create(encoder, str(model), **config), [fasta], store, progress=False, log=lambda s: None)
    return open_store(store)


def assert_store_matches(store, expected: dict[str, torch.Tensor], pooled_fn=lambda h: h.mean(0)) -> None:
    for rid, ref in expected.items():
        np.testing.assert_allclose(store.tokens(rid).astype(np.float32), ref.numpy(), **FP16, err_msg=rid)
        np.testing.assert_allclose(store.pooled([rid])[0], pooled_fn(ref).numpy(), **FP32, err_msg=rid)


@pytest.fixture(params=[64, 100_000], ids=["small-batches", "one-batch"])
def max_tokens(request) -> int:
    return request.param


@torch.inference_mode()
def test_esm2_matches_transformers(tmp_path, models, max_tokens):
    records = random_seqs(AA, [5, 17, 33, 33, 60, 8, 120])
    store = build_store(tmp_path, "p", "esm2", models["esm2"], records, max_tokens=max_tokens)
    tok = AutoTokenizer.from_pretrained(models["esm2"])
    model = EsmModel.from_pretrained(models["esm2"], add_pooling_layer=False).eval()
    expected = {
        rid: model(**tok(seq, return_tensors="pt")).last_hidden_state[0, 1:-1]  # strip <cls> ... <eos>
        for rid, seq in records.items()
    }
    assert_store_matches(store, expected)


@torch.inference_mode()
def test_esm2_layer_and_cls_pooling(tmp_path, models):
    records = random_seqs(AA, [12, 40])
    store = build_store(tmp_path, "p", "esm2", models["esm2"], records, layers=(1,), pooling="cls")
    tok = AutoTokenizer.from_pretrained(models["esm2"])
    model = EsmModel.from_pretrained(models["esm2"], add_pooling_layer=False).eval()
    for rid, seq in records.items():
        hidden = model(**tok(seq, return_tensors="pt"), output_hidden_states=True).hidden_states[1][0]
        np.testing.assert_allclose(store.tokens(rid).astype(np.float32), hidden[1:-1].numpy(), **FP16)
        np.testing.assert_allclose(store.pooled([rid])[0], hidden[0].numpy(), **FP32)
    assert store.attrs["provenance"]["layer"] == 1


@torch.inference_mode()
def test_nucleotide_transformer_matches_transformers(tmp_path, models, max_tokens):
    # Lengths not multiples of 6 and an N: the tokenizer's own 6-mer rules decide the tokens.
    records = random_seqs("ACGT", [6, 13, 100, 150, 222])
    records["with_n"] = "ACGTACNNACGTTTGACCA" * 3
    store = build_store(tmp_path, "d", "nucleotide-transformer", models["nucleotide-transformer"], records, max_tokens=max_tokens)
    tok = AutoTokenizer.from_pretrained(models["nucleotide-transformer"])
    model = EsmModel.from_pretrained(models["nucleotide-transformer"], add_pooling_layer=False).eval()
    expected = {}
    for rid, seq in records.items():
        enc = tok(seq, return_tensors="pt")
        assert enc["input_ids"].shape[1] <= 38, "test sequences must fit one window"
        expected[rid] = model(**enc).last_hidden_state[0, 1:]  # NT adds <cls> only
    assert_store_matches(store, expected)


@torch.inference_mode()
def test_long_sequence_windows_are_stitched(tmp_path, models):
    """300 bp = 50 six-mer tokens > the 37-token window: two windows, tokens 0-24 from the first, 25-49 from the second."""
    seq = random_seqs("ACGT", [300], seed=3)["s0_300"]
    store = build_store(tmp_path, "d", "nucleotide-transformer", models["nucleotide-transformer"], {"long": seq})
    tok = AutoTokenizer.from_pretrained(models["nucleotide-transformer"])
    model = EsmModel.from_pretrained(models["nucleotide-transformer"], add_pooling_layer=False).eval()
    ids = tok(seq, add_special_tokens=False)["input_ids"]
    assert len(ids) == 50
    cls = tok.cls_token_id

    def run(window_ids):
        return model(input_ids=torch.tensor([[cls, *window_ids]])).last_hidden_state[0, 1:]

    # window 37, overlap 37 // 4 = 9 -> starts 0 and 13 (last window aligned to the end); cut at (13 + 37) // 2
    first, second = run(ids[0:37]), run(ids[13:50])
    expected = torch.cat([first[:25], second[25 - 13 :]])
    assert_store_matches(store, {"long": expected})
    info = store.record_info("long")
    assert (info["n_windows"], info["n_input_tokens"], info["n_cropped"]) == (2, 50, 0)


@torch.inference_mode()
def test_crop_left_keeps_the_three_prime_end_and_is_recorded(tmp_path, models):
    seq = random_seqs("ACGT", [300], seed=4)["s0_300"]
    store = build_store(
        tmp_path, "d", "nucleotide-transformer", models["nucleotide-transformer"], {"rna": seq}, crop="left", max_length=10
    )
    tok = AutoTokenizer.from_pretrained(models["nucleotide-transformer"])
    model = EsmModel.from_pretrained(models["nucleotide-transformer"], add_pooling_layer=False).eval()
    ids = tok(seq, add_special_tokens=False)["input_ids"][-10:]
    expected = model(input_ids=torch.tensor([[tok.cls_token_id, *ids]])).last_hidden_state[0, 1:]
    assert_store_matches(store, {"rna": expected})
    assert store.record_info("rna")["n_cropped"] == 40
    assert store.attrs["windowing"]["crop"] == "left"


def reference_enformer(directory: Path):
    """enformer-pytorch's model with the checkpoint's weights, loaded without embedcache's loader."""
    from enformer_pytorch import Enformer, EnformerConfig

    model = Enformer(EnformerConfig.from_pretrained(directory))
    model.load_state_dict(torch.load(directory / "pytorch_model.bin", weights_only=True))
    return model.eval()


@requires_enformer
@torch.inference_mode()
def test_enformer_matches_enformer_pytorch(tmp_path, models, max_tokens):
    from enformer_pytorch import str_to_one_hot

    records = random_seqs("ACGTN", [1024, 700, 333, 1000])
    store = build_store(tmp_path, "g", "enformer", models["enformer"], records, window=1024, max_tokens=max_tokens // 4 + 8)
    model = reference_enformer(models["enformer"])
    expected = {}
    for rid, seq in records.items():
        left = (1024 - len(seq)) // 2
        padded = "N" * left + seq + "N" * (1024 - len(seq) - left)  # centred in the fixed window
        expected[rid] = model(str_to_one_hot(padded), return_only_embeddings=True)  # (target_length, 2 * dim)
    assert_store_matches(store, expected)
    assert store.tokens("s0_1024").shape == (8, 96)


@requires_enformer
@torch.inference_mode()
def test_enformer_central_bins(tmp_path, models):
    from enformer_pytorch import str_to_one_hot

    seq = random_seqs("ACGT", [1024], seed=5)["s0_1024"]
    store = build_store(tmp_path, "g", "enformer", models["enformer"], {"g": seq}, window=1024, token_bins=4, pooling="center", pool_bins=2)
    full = reference_enformer(models["enformer"])(str_to_one_hot(seq), return_only_embeddings=True)
    np.testing.assert_allclose(store.tokens("g").astype(np.float32), full[2:6].numpy(), **FP16)
    np.testing.assert_allclose(store.pooled(["g"])[0], full[3:5].mean(0).numpy(), **FP32)


@torch.inference_mode()
def test_hf_causal_model_with_left_padding_tokenizer(tmp_path, models, max_tokens):
    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    assert tok.padding_side == "left"
    records = random_seqs(AA, [3, 9, 30, 31, 100])
    store = build_store(tmp_path, "p", "hf", models["gpt2"], records, max_tokens=max_tokens)
    model = AutoModel.from_pretrained(models["gpt2"]).eval()
    expected = {rid: model(**tok(seq, return_tensors="pt")).last_hidden_state[0] for rid, seq in records.items()}
    assert_store_matches(store, expected)
    assert store.attrs["provenance"]["architecture"] == "GPT2Model"


@torch.inference_mode()
def test_hf_remote_code_model_without_attention_mask(tmp_path, models, max_tokens):
    tok = AutoTokenizer.from_pretrained(models["remote"])
    # Several lengths, some repeated: same-length sequences may share a batch, others never do.
    records = random_seqs(AA, [4, 4, 9, 20, 20, 20, 50])
    store = build_store(tmp_path, "p", "hf", models["remote"], records, trust_remote_code=True, max_tokens=max_tokens)
    model = AutoModel.from_pretrained(models["remote"], trust_remote_code=True).eval()
    expected = {rid: model(input_ids=tok(seq, return_tensors="pt")["input_ids"]).last_hidden_state[0] for rid, seq in records.items()}
    assert_store_matches(store, expected)


def test_batch_composition_does_not_change_results(tmp_path, models):
    records = random_seqs(AA, [7, 50, 51, 90, 200, 11, 11, 300], seed=9)
    a = build_store(tmp_path, "a", "esm2", models["esm2"], records, max_tokens=40)
    b = build_store(tmp_path, "b", "esm2", models["esm2"], records, max_tokens=1_000_000)
    for rid in records:
        np.testing.assert_allclose(a.tokens(rid).astype(np.float32), b.tokens(rid).astype(np.float32), **FP16)
        np.testing.assert_allclose(a.pooled([rid]), b.pooled([rid]), **FP32)
    assert a.fingerprint == b.fingerprint  # the batch budget is not part of the fingerprint


@torch.inference_mode()
@pytest.mark.parametrize("name,encoder,options", [("esm2", "esm2", {}), ("remote", "hf", {"trust_remote_code": True})])
def test_live_embedding_equals_the_store(tmp_path, models, name, encoder, options):
    """embed_sequences (the finetune path) batches windows as the build does: length-sorted calls under
    the token budget, unpadded for a model without an attention mask, the same rows as the store."""
    records = random_seqs(AA, [4, 4, 9, 20, 20, 33, 50], seed=3)
    store = build_store(tmp_path, name, encoder, models[name], records, max_tokens=48, **options)
    config = BuildConfig.create(encoder, str(models[name]), max_tokens=48, **options)
    live = embed_sequences(load_encoder(encoder, config.encoder_settings()), list(records.values()), config)
    assert_store_matches(store, {rid: tokens[:, 0] for rid, (tokens, _) in zip(records, live)})  # (L, k=1, d)
    for rid, (_, pooled) in zip(records, live):
        np.testing.assert_allclose(store.pooled([rid])[0], pooled[0].numpy(), **FP32, err_msg=rid)


def test_live_gradients_equal_one_sequence_at_a_time(models):
    """Finetune mode: gradients flow through every length-sorted call, and equal those of embedding each
    sequence alone (a model without an attention mask, whose calls must never be padded)."""
    config = BuildConfig.create("hf", str(models["remote"]), max_tokens=48, trust_remote_code=True)
    encoder = load_encoder("hf", config.encoder_settings())
    encoder.model.requires_grad_(True)
    calls, encode = [], encoder.encode_windows
    encoder.encode_windows = lambda windows: calls.append(len(windows)) or encode(windows)
    sequences = list(random_seqs(AA, [4, 9, 9, 20, 33, 50], seed=4).values())

    def grads(groups: list[list[str]]) -> list[torch.Tensor]:
        encoder.model.zero_grad(set_to_none=True)
        for group in groups:
            sum((tokens * 1.5).sum() + pooled.sum() for tokens, pooled in embed_sequences(encoder, group, config)).backward()
        return [p.grad.clone() for p in encoder.model.parameters()]

    together = grads([sequences])
    assert len(calls) > 1  # the budget split the batch
    alone = grads([[s] for s in sequences])
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in together)
