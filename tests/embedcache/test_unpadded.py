"""The unpadded ESM path computes what transformers' padded EsmModel computes, window by window.

CPU tests compare every hidden state of `UnpaddedEsm` with `EsmModel` on a padded batch (rotary
ESM2 with token dropout, and NT v1's learned positions). The `gpu` tests compare the encoder's
unpadded path (varlen flash attention, and the padded-attention fallback) with its padded one on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, EsmModel

from embedcache.config import BuildConfig
from embedcache.encoders import load_encoder
from embedcache.encoders.unpadded import UnpaddedEsm, unsupported_reason, use_unpadded
from embedcache.tiny_models import make_tiny_esm2, make_tiny_gpt2, make_tiny_nucleotide_transformer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Only the models these tests need (the session's `models` also makes Enformer, an optional extra)."""
    root = tmp_path_factory.mktemp("unpadded_models")
    return {
        "esm2": make_tiny_esm2(root / "esm2"),
        "nucleotide-transformer": make_tiny_nucleotide_transformer(root / "nt", max_positions=40),
        "gpt2": make_tiny_gpt2(root / "gpt2"),
    }


def _padded_reference(model, windows: list[torch.Tensor], pad_id: int) -> list[torch.Tensor]:
    """Every hidden state of each window from one padded, masked batch: (L + 1) x (b, n, d) -> per window."""
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w)], mask[i, : len(w)] = w, 1
    states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return [torch.stack([s[i, : len(w)] for s in states]) for i, w in enumerate(windows)]  # (L + 1, n, d) each


def _single_reference(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every hidden state of each window run alone (no padding): (L + 1, n, d) each."""
    return [torch.stack(model(input_ids=w[None], output_hidden_states=True).hidden_states)[:, 0] for w in windows]


@torch.inference_mode()
@pytest.mark.parametrize("name", ["esm2", "nucleotide-transformer"])
@pytest.mark.parametrize("with_mask_token", [False, True], ids=["residues", "mask-token"])
def test_unpadded_equals_padded_in_every_layer(models, name, with_mask_token):
    model = EsmModel.from_pretrained(models[name], add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(0)
    vocab, mask_id = model.config.vocab_size, model.config.mask_token_id
    windows = [torch.randint(4, vocab - 4, (n,), generator=gen) for n in (3, 19, 7, 30, 30)]
    if with_mask_token:
        # ESM2's token dropout rescales by the window's share of <mask>. transformers divides by the
        # PADDED width (its embeddings get no attention mask), so only a lone window is a reference;
        # the unpadded path uses each window's own length, as ESM's own code does.
        windows[1][5] = mask_id
        ref = _single_reference(model, windows)
    else:
        ref = _padded_reference(model, windows, model.config.pad_token_id)
    lengths = torch.tensor([len(w) for w in windows])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    last, states = UnpaddedEsm(model)(torch.cat(windows), cu_seqlens, int(lengths.max()), output_hidden_states=True)
    packed = torch.stack(states)  # (L + 1, T, d)
    assert packed.shape == (model.config.num_hidden_layers + 1, int(lengths.sum()), model.config.hidden_size)
    torch.testing.assert_close(last, packed[-1])
    for (s, e), r in zip(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()), ref):
        torch.testing.assert_close(packed[:, s:e], r, rtol=1e-4, atol=1e-5)


def test_only_transformers_esm_models_run_unpadded(models):
    gpt2 = AutoModel.from_pretrained(models["gpt2"])
    assert "GPT2Model is not transformers' EsmModel" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="cannot run GPT2Model unpadded"):
        UnpaddedEsm(gpt2)
    esm = EsmModel.from_pretrained(models["esm2"], add_pooling_layer=False)
    assert unsupported_reason(esm) is None
    assert use_unpadded(esm, torch.device("cpu"), None)
    assert not use_unpadded(esm, torch.device("cuda"), None)  # fp32 on CUDA keeps the padded SDPA path
    assert not use_unpadded(gpt2, torch.device("cpu"), None)


def test_encoder_uses_the_padded_path_when_gradients_flow(models):
    """Finetuning trains through the padded model (peft, gradient checkpointing); only inference is unpadded."""
    encoder = load_encoder("esm2", BuildConfig.create("esm2", str(models["esm2"]), device="cpu").encoder_settings())
    assert encoder.unpadded is not None
    windows = [np.array([5, 6, 7, 8]), np.array([9, 10])]
    calls = []
    handle = encoder.model.register_forward_hook(lambda m, a, kw_out=None: calls.append("padded"))
    try:
        with torch.no_grad():
            unpadded = encoder.encode_windows(windows)
        assert calls == []  # the unpadded path calls the model's layers, never EsmModel.forward
        padded = encoder.encode_windows(windows)
        assert calls == ["padded"]
    finally:
        handle.remove()
    assert len(unpadded) == len(padded) == 2 and unpadded[-1].hidden.shape == unpadded[1].hidden.shape == (2, 1, encoder.embed_dim)
    for u, p in zip(unpadded, padded):  # each window's output, sliced out of the packed rows when read
        torch.testing.assert_close(u.hidden, p.hidden.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(u.cls, p.cls.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("attention", ["varlen", "padded-attention"])
def test_cuda_unpadded_matches_padded(models, precision, attention):
    config = BuildConfig.create("esm2", str(models["esm2"]), device="cuda", precision=precision)
    encoder = load_encoder("esm2", config.encoder_settings())
    assert encoder.unpadded is not None, "CUDA in half precision runs unpadded"
    if attention == "varlen" and encoder.unpadded.varlen is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if attention == "padded-attention":
        encoder.unpadded.varlen = None  # the fallback for torch without varlen_attn
    rng = np.random.default_rng(0)
    windows = [rng.integers(4, 24, n) for n in (1, 17, 300, 64, 1000, 5)]
    with torch.inference_mode():
        unpadded = encoder.encode_windows(windows)
        unpadded_rows = torch.cat([o.hidden.float() for o in unpadded])
        kept, encoder.unpadded = encoder.unpadded, None
        padded_rows = torch.cat([o.hidden.float() for o in encoder.encode_windows(windows)])
        encoder.unpadded = kept
    assert unpadded_rows.shape == (sum(map(len, windows)), encoder.embed_dim)
    assert torch.isfinite(unpadded_rows).all()
    relative = (unpadded_rows - padded_rows).norm() / padded_rows.norm()
    assert relative < 2e-2, f"{attention} {precision}: relative L2 difference {relative:.2e} vs the padded path"


def test_a_build_packs_each_batch_when_it_prepares_the_unit(models, tmp_path, monkeypatch):
    """partition.prepare_unit packs every batch (`Encoder.pack`) beside the previous unit's forward: each forward
    is handed the inputs made there, in order, and packs nothing itself."""
    import threading

    import embedcache.executors
    import embedcache.partition
    from embedcache import open_store
    from embedcache.build import build
    from embedcache.encoders.hf import HFTokenEncoder

    from .conftest import write_fasta
    from .test_parity import random_seqs

    made, used, forwarding = [], [], threading.local()
    real_pack, real_encode, real_forward = HFTokenEncoder.pack, HFTokenEncoder.encode_packed, embedcache.partition.forward_unit

    def pack(self, windows):
        assert not getattr(forwarding, "on", False), "a forward packed a batch"
        made.append(real_pack(self, windows))
        return made[-1]

    def encode_packed(self, packed):
        used.append(packed)
        return real_encode(self, packed)

    def forward_unit(*args, **kwargs):
        forwarding.on = True
        try:
            return real_forward(*args, **kwargs)
        finally:
            forwarding.on = False

    monkeypatch.setattr(HFTokenEncoder, "pack", pack)
    monkeypatch.setattr(HFTokenEncoder, "encode_packed", encode_packed)
    monkeypatch.setattr(embedcache.executors, "forward_unit", forward_unit)
    seqs = random_seqs("ACDEFGHIKLMNPQRSTVWY", [20 + 3 * i for i in range(24)], seed=8)
    config = BuildConfig.create("esm2", str(models["esm2"]), max_tokens=120, shard_mb=0.01, unit_mb=0.01)
    report = build(config, [write_fasta(tmp_path / "a.fa", seqs)], tmp_path / "s.zarr", progress=False, log=lambda s: None)
    assert len(report.plan.units) > 2 and len(used) > len(report.plan.units)  # several units of several batches
    assert [id(p) for p in used] == [id(p) for p in made]
    assert open_store(tmp_path / "s.zarr").verify() == []
