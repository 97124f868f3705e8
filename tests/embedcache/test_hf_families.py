"""The generic `hf` encoder on tiny random models of real families, loaded as a user would
(`embedcache build --encoder hf --model DIR --trust-remote-code`): parity with a direct
single-sequence forward of transformers, whatever the config calls its depth.

Families: HyenaDNA-like (remote code, causal, left-padding tokenizer with a trailing [SEP], no
attention mask, `n_layer` / `d_model`), GPT-2 (causal, no special tokens), BERT (token type ids,
[CLS] ... [SEP]) and a remote-code model whose config has no layer count at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from cli.embedcache_cli import main
from embedcache import open_store
from embedcache.config import BuildConfig
from embedcache.encoders import load_encoder

from .conftest import write_fasta
from .test_parity import FP16, FP32, random_seqs

# name in the `models` fixture -> (alphabet of test sequences, special tokens before / after content,
# remote code, hidden states the model returns)
FAMILIES = {
    "hyena": ("ACGTN", (0, 1), True, 4),
    "gpt2": ("ACDEFGHIKLMNPQRSTVWY", (0, 0), False, 3),
    "bert": ("ACDEFGHIKLMNPQRSTVWY", (1, 1), False, 3),
    "nodepth": ("ACDEFGHIKLMNPQRSTVWY", (1, 0), True, 5),
}


def cli_build(tmp_path, models, name, records, *extra) -> object:
    fasta = write_fasta(tmp_path / f"{name}.fa", records)
    store = tmp_path / f"{name}.zarr"
    remote = ["--trust-remote-code"] if FAMILIES[name][2] else []
    args = ["build", fasta, "-o", store, "--encoder", "hf", "--model", models[name], *remote, "--no-progress", *extra]
    assert main(list(map(str, args))) == 0
    return open_store(store)


def reference(models, name, seq: str, layer: int | None) -> torch.Tensor:
    """A direct transformers forward of one sequence, as a user would write it: (n_content, d)."""
    remote = FAMILIES[name][2]
    tok = AutoTokenizer.from_pretrained(models[name], trust_remote_code=remote)
    model = AutoModel.from_pretrained(models[name], trust_remote_code=remote).eval()
    enc = tok(seq, return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if name == "hyena":
        inputs = {"input_ids": enc["input_ids"]}  # its forward takes no attention mask
    out = model(**inputs, output_hidden_states=True)
    hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
    before, after = FAMILIES[name][1]
    return hidden[0, before : hidden.shape[1] - after]


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("max_tokens", [40, 100_000], ids=["small-batches", "one-batch"])
@torch.inference_mode()
def test_hf_family_matches_a_direct_forward(tmp_path, models, name, max_tokens):
    letters = FAMILIES[name][0]
    records = random_seqs(letters, [3, 9, 9, 20, 30, 30, 41], seed=7)
    store = cli_build(tmp_path, models, name, records, "--max-tokens", max_tokens)
    for rid, seq in records.items():
        ref = reference(models, name, seq, None)
        assert store.tokens(rid).shape == tuple(ref.shape), rid
        np.testing.assert_allclose(store.tokens(rid).astype(np.float32), ref.numpy(), **FP16, err_msg=rid)
        np.testing.assert_allclose(store.pooled([rid])[0], ref.mean(0).numpy(), **FP32, err_msg=rid)
    provenance = store.attrs["provenance"]
    assert provenance["n_layers"] == FAMILIES[name][3] - 1 and provenance["layer"] == FAMILIES[name][3] - 1
    assert provenance["special_tokens"] == dict(zip(("prefix", "suffix"), FAMILIES[name][1]))


@pytest.mark.parametrize("name", ["hyena", "nodepth"])
@torch.inference_mode()
def test_inner_layer_of_a_model_without_num_hidden_layers(tmp_path, models, name):
    records = random_seqs(FAMILIES[name][0], [5, 17, 30], seed=2)
    store = cli_build(tmp_path, models, name, records, "--layer", "1")
    for rid, seq in records.items():
        np.testing.assert_allclose(store.tokens(rid).astype(np.float32), reference(models, name, seq, 1).numpy(), **FP16)
    assert store.attrs["provenance"]["layer"] == 1


@pytest.mark.parametrize("name", list(FAMILIES))
def test_layer_out_of_range_names_the_valid_range(tmp_path, models, name, capsys):
    n = FAMILIES[name][3] - 1
    fasta = write_fasta(tmp_path / "in.fa", {"a": FAMILIES[name][0][:4]})
    remote = ["--trust-remote-code"] if FAMILIES[name][2] else []
    args = ["build", fasta, "-o", tmp_path / "s.zarr", "--encoder", "hf", "--model", models[name], *remote, "--layer", n + 1]
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert f"--layer {n + 1} is out of range" in err and f"has {n} layers: use 0..{n}" in err and f"-1..-{n + 1}" in err
    assert not (tmp_path / "s.zarr").exists()


def test_hyena_like_batches_never_pad(models):
    """No attention mask in its forward: the encoder batches only windows of one length."""
    config = BuildConfig.create("hf", str(models["hyena"]), trust_remote_code=True)
    encoder = load_encoder("hf", config.encoder_settings())
    assert encoder.equal_length_batches and encoder.tokenizer.padding_side == "left"
    with pytest.raises(AssertionError, match="without attention mask got a padded batch"):
        encoder.forward([encoder.tokenize("ACGT"), encoder.tokenize("ACG")])


def test_loading_is_quiet_about_an_unused_head_and_names_missing_weights(tmp_path, capfd):
    """A checkpoint's MLM head is not used (transformers lists it as UNEXPECTED on every load); a weight
    the model needs but the checkpoint lacks is randomly initialised, and that is said in one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    from embedcache.encoders import EncoderSettings
    from embedcache.tiny_models import make_tiny_esm2

    model = make_tiny_esm2(tmp_path / "esm2")
    capfd.readouterr()
    load_encoder("esm2", EncoderSettings(model=str(model)))
    err = capfd.readouterr().err
    assert "UNEXPECTED" not in err and "LOAD REPORT" not in err and "were not used" not in err
    damaged = shutil.copytree(model, tmp_path / "damaged")
    weights = load_file(damaged / "model.safetensors")
    dropped = next(k for k in weights if k.endswith("layer.1.output.dense.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 weight of EsmModel is not in the checkpoint .*randomly initialised .*layer\.1\.output\.dense\.weight"):
        load_encoder("esm2", EncoderSettings(model=str(damaged)))
