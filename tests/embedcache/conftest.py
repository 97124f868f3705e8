"""Tiny random-initialised models of every supported architecture, saved to temp dirs once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from embedcache.tiny_models import make_tiny_enformer, make_tiny_esm2, make_tiny_gpt2, make_tiny_nucleotide_transformer

REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class ToyConvConfig(PretrainedConfig):
    model_type = "toyconv"

    def __init__(self, vocab_size=32, hidden_size=16, num_hidden_layers=2, max_position_embeddings=64, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)
'''

REMOTE_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_toyconv import ToyConvConfig


class ToyConvModel(PreTrainedModel):
    """A bidirectional conv model whose forward takes NO attention mask: padding would change outputs."""

    config_class = ToyConvConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.convs = nn.ModuleList(
            nn.Conv1d(config.hidden_size, config.hidden_size, 3, padding=1) for _ in range(config.num_hidden_layers)
        )
        self.post_init()

    def forward(self, input_ids, output_hidden_states=False, return_dict=True):
        h = self.embed(input_ids)
        states = [h]
        for conv in self.convs:
            h = h + torch.tanh(conv(h.transpose(1, 2)).transpose(1, 2))
            states.append(h)
        return BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states) if output_hidden_states else None)
'''


def make_remote_code_model(directory: Path) -> Path:
    """Save a model whose code lives in the checkpoint (auto_map), like NT v2, plus a char tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    src = directory.parent / "toyconv_src"
    pkg = src / "toyconv_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_toyconv.py").write_text(REMOTE_CONFIG)
    (pkg / "modeling_toyconv.py").write_text(REMOTE_MODEL)
    sys.path.insert(0, str(src))
    try:
        cfg_mod = importlib.import_module("toyconv_pkg.configuration_toyconv")
        model_mod = importlib.import_module("toyconv_pkg.modeling_toyconv")
    finally:
        sys.path.remove(str(src))
    cfg_mod.ToyConvConfig.register_for_auto_class()
    model_mod.ToyConvModel.register_for_auto_class("AutoModel")
    import torch

    torch.manual_seed(0)
    model_mod.ToyConvModel(cfg_mod.ToyConvConfig()).save_pretrained(directory)
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", *"ACDEFGHIKLMNPQRSTVWY"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", model_max_length=64).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "esm2": make_tiny_esm2(root / "esm2"),
        # 40 learned positions, of which ESM-style ids use 2..39 (offset padding_idx + 1): 37 content tokens
        # after <cls>, so DNA over ~220 bp gets windows
        "nucleotide-transformer": make_tiny_nucleotide_transformer(root / "nt", max_positions=40),
        "enformer": make_tiny_enformer(root / "enformer"),
        "gpt2": make_tiny_gpt2(root / "gpt2"),
        "remote": make_remote_code_model(root / "remote"),
    }


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{k}\n{v}\n" for k, v in records.items()))
    return path
