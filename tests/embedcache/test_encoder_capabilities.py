"""What fine-tuning asks of an encoder (`Encoder` interface: blocks for last-n, LoRA targets, gradient
checkpointing, device, precision), for each family, through fusion.finetune's encoder modes.

No Enformer here: tests/fusion/test_finetune.py covers it, with the `enformer` extra.
"""

from __future__ import annotations

import pytest
import torch

from embedcache.config import BuildConfig
from embedcache.embed import embed_sequences
from embedcache.encoders import load_encoder
from embedcache.errors import EncoderError
from fusion.finetune import FinetuneConfig, FinetuneError, LiveEncoder, set_encoder_mode_

from .test_hf_families import FAMILIES
from .test_parity import random_seqs

# name -> (encoder, options, modules trained by lora (prefixes of the adapted modules), by last-n 1)
CASES = {
    "esm2": ("esm2", {}, ("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value"),
             ["encoder.layer.1", "encoder.emb_layer_norm_after"]),
    "esm2-layer1": ("esm2", {"layers": (1,)}, None, ["encoder.layer.0"]),
    "gpt2": ("hf", {}, ("h.0.attn.c_attn", "h.1.attn.c_attn"), ["h.1", "ln_f"]),
    "bert": ("hf", {}, ("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value"), ["encoder.layer.1"]),
    "hyena": ("hf", {"trust_remote_code": True}, ("layers.0.in_proj", "layers.2.mlp.2"), ["layers.2", "ln_f"]),
    "nodepth": ("hf", {"trust_remote_code": True}, None, ["convs.3"]),
}  # fmt: skip


def live(models, case: str) -> LiveEncoder:
    encoder_name, options, _, _ = CASES[case]
    name = case.split("-")[0]
    build = BuildConfig.create(encoder_name, str(models[name]), max_tokens=64, **options)
    encoder = load_encoder(encoder_name, build.encoder_settings())
    return LiveEncoder(encoder=encoder, build=build, store_path="(test)", token_dtype=torch.float16)


def backward(live: LiveEncoder, letters: str) -> None:
    sequences = list(random_seqs(letters, [5, 12, 12], seed=1).values())
    sum(tokens.sum() + pooled.sum() for tokens, pooled in embed_sequences(live.encoder, sequences, live.build)).backward()


def letters_of(case: str) -> str:
    name = case.split("-")[0]
    return "ACDEFGHIKLMNPQRSTVWY" if name == "esm2" else FAMILIES[name][0]


@pytest.mark.parametrize("case", list(CASES))
def test_last_n_trains_the_blocks_that_feed_the_stored_layer(models, case):
    enc = live(models, case)
    set_encoder_mode_(enc, "m", "last-n", FinetuneConfig(last_n=1))
    assert enc.trained == CASES[case][3]
    trained = [n for n, p in enc.encoder.model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith(tuple(t + "." for t in enc.trained)) for n in trained)
    backward(enc, letters_of(case))
    grads = {n for n, p in enc.encoder.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith(CASES[case][3][0] + ".") for n in grads)  # the block itself gets gradient
    assert grads <= set(trained)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]])
def test_lora_adapts_the_modules_the_encoder_names(models, case):
    enc = live(models, case)
    set_encoder_mode_(enc, "m", "lora", FinetuneConfig(lora_rank=2))
    assert all(any(t.startswith(p) for t in enc.trained) for p in CASES[case][2]), enc.trained
    assert all(".lora_" in n for n, p in enc.encoder.model.named_parameters() if p.requires_grad)
    backward(enc, letters_of(case))
    lora_a = [p.grad for n, p in enc.encoder.model.named_parameters() if ".lora_A." in n]
    assert lora_a and all(g is not None for g in lora_a)


def test_lora_without_linear_layers_is_refused(models):
    enc = live(models, "nodepth")
    with pytest.raises(FinetuneError, match=r"m: LoRA found none of the modules all-linear in NoDepthModel"):
        set_encoder_mode_(enc, "m", "lora", FinetuneConfig())


@pytest.mark.parametrize("case", ["esm2", "gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(models, case):
    grads = []
    for checkpointing in (False, True):
        enc = live(models, case)
        set_encoder_mode_(enc, "m", "full", FinetuneConfig())
        enc.encoder.model.train()
        enc.encoder.set_gradient_checkpointing_(checkpointing)
        model = enc.encoder.model  # transformers 5 renamed the flag (the old name warns)
        flag = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing
        assert flag == checkpointing
        torch.manual_seed(0)  # the same dropout masks (the checkpoint replays the RNG state in recomputation)
        backward(enc, letters_of(case))
        grads.append([p.grad for p in enc.encoder.model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # recomputation reorders float32 sums


def test_gradient_checkpointing_unsupported_is_an_encoder_error(models):
    with pytest.raises(EncoderError, match="supports no gradient checkpointing"):
        live(models, "hyena").encoder.set_gradient_checkpointing_(True)


def test_device_follows_the_module_and_precision_is_checked_there(models):
    enc = live(models, "gpt2").encoder
    assert enc.device == torch.device("cpu") and enc.precision == "fp32"
    assert enc.to_("cpu").device == torch.device("cpu")
    with pytest.raises(EncoderError, match="precision 'bf16' needs a CUDA device; running on cpu"):
        enc.set_precision_("bf16")
