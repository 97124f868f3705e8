"""Tiny random-initialised models of the real architectures, saved like any checkpoint.

For the offline demo, the tests and benchmarks: each maker builds a model from the library's real
config class with small sizes, saves it with `save_pretrained` (weights, config and tokenizer) to a
directory, and returns that directory, which then loads through exactly the path a user's hub id
or checkpoint directory takes (`--model DIR`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import torch

# ESM2's vocabulary, in the order of facebook/esm2_* (vocab.txt).
ESM2_VOCAB = [
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
]  # fmt: skip

# Nucleotide Transformer's vocabulary: specials, every 6-mer (A, T, C, G order), then single letters.
NT_SPECIALS = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
NT_VOCAB = NT_SPECIALS + ["".join(k) for k in itertools.product("ATCG", repeat=6)] + ["A", "T", "C", "G", "N"]


def _write_vocab(directory: Path, vocab: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return path


def save_esm_model(
    directory: Path, vocab: list[str], *, hidden: int, layers: int, heads: int, seed: int, tokenizer_kwargs: dict,
    layer_norm_eps: float = 1e-5, **config,
) -> Path:
    """An ESM-architecture masked LM with random weights (any size; FFN 4x hidden), saved as the public
    ESM / NT checkpoints are. `config`: further EsmConfig fields (positions, token dropout, ...)."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    torch.manual_seed(seed)
    esm_config = EsmConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        emb_layer_norm_before=False,
        # As the released ESM2 / NT configs: no dropout (EsmConfig's default 0.1 would make training-mode
        # forwards take SDPA's slow dropout path); layer-norm eps 1e-5 as ESM2 (NT-v2: 1e-12).
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=layer_norm_eps,
        pad_token_id=vocab.index("<pad>"),
        mask_token_id=vocab.index("<mask>"),
        **config,
    )
    # Saved with the MLM head, as facebook/esm2_* and InstaDeepAI/nucleotide-transformer-* are; the
    # encoder loads the base model from it.
    EsmForMaskedLM(esm_config).save_pretrained(directory)
    EsmTokenizer(str(_write_vocab(directory, vocab)), **tokenizer_kwargs).save_pretrained(directory)
    return directory


def make_tiny_esm2(directory: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """ESM2 architecture (rotary, token dropout, 33-token vocab) at toy size."""
    return save_esm_model(
        Path(directory), ESM2_VOCAB, hidden=hidden, layers=layers, heads=heads, seed=seed, tokenizer_kwargs={},
        max_position_embeddings=1026, position_embedding_type="rotary", token_dropout=True,
    )  # fmt: skip


def make_tiny_nucleotide_transformer(
    directory: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, max_positions: int = 1002, seed: int = 0
) -> Path:
    """Nucleotide Transformer v1 architecture (an ESM model, learned positions, 6-mer vocab, CLS only)."""
    # NT's tokenizer adds <cls> but no <eos>; learned positions start at padding_idx + 1.
    tokenizer_kwargs = {"eos_token": None, "model_max_length": max_positions - NT_VOCAB.index("<pad>") - 1}
    return save_esm_model(
        Path(directory), NT_VOCAB, hidden=hidden, layers=layers, heads=heads, seed=seed, tokenizer_kwargs=tokenizer_kwargs,
        max_position_embeddings=max_positions, position_embedding_type="absolute", token_dropout=False,
    )  # fmt: skip


def make_tiny_enformer(
    directory: str | Path,
    *,
    dim: int = 48,
    depth: int = 1,
    heads: int = 2,
    target_length: int = 8,
    seed: int = 0,
    attention_out_std: float | None = None,
) -> Path:
    """Enformer architecture (conv stem, 7 halvings to 128-bp bins, transformer trunk) at toy size.

    Its input window must be a multiple of 128 bp giving at least `target_length` bins. Enformer's
    relative positional features need dim // heads divisible by 6 (official: 1536 // 8 = 192).
    enformer-pytorch initialises attention's output projection to zeros, so a random model's attention
    adds nothing and q/k/v get no gradient; `attention_out_std` draws it from N(0, std) instead, as a
    trained model's would be non-zero.
    """
    from embedcache.encoders.enformer import require_enformer

    require_enformer()
    from enformer_pytorch import Enformer

    directory = Path(directory)
    torch.manual_seed(seed)
    model = Enformer.from_hparams(
        dim=dim,
        depth=depth,
        heads=heads,
        output_heads=dict(human=4),
        target_length=target_length,
        attn_dim_key=8,
        dim_divisible_by=dim // 4,
    )
    if attention_out_std is not None:
        for block in model.transformer:
            torch.nn.init.normal_(block[0].fn[1].to_out.weight, std=attention_out_std)
    return save_enformer(model, directory)


def save_enformer(model: torch.nn.Module, directory: str | Path) -> Path:
    """An enformer-pytorch model saved as the official checkpoint is laid out: config.json + pytorch_model.bin.

    The trunk shares its tensors with named submodules (stem, conv_tower, ...), which transformers 5's
    save_pretrained refuses to write (safetensors holds no shared tensors), so the state dict is a torch file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def make_tiny_gpt2(directory: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A causal model (GPT-2) with a character tokenizer that pads on the LEFT, as causal tokenizers do."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory = Path(directory)
    torch.manual_seed(seed)
    letters = sorted(set("ACDEFGHIKLMNPQRSTVWYXBZUO"))
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<unk>", *letters])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per letter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
        model_input_names=["input_ids", "attention_mask"],  # as GPT-2's own tokenizer declares
    )
    tokenizer.save_pretrained(directory)
    config = GPT2Config(
        vocab_size=len(vocab), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


TINY_MODELS: dict[str, Callable[..., Path]] = {
    "esm2": make_tiny_esm2,
    "nucleotide-transformer": make_tiny_nucleotide_transformer,
    "enformer": make_tiny_enformer,
    "hf": make_tiny_gpt2,
}
