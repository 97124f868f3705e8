"""Tiny random-initialised models of every supported architecture, saved to temp dirs once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from embedcache.encoders.enformer import EXTRA, enformer_available
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


ENFORMER_SKIP = f"needs the optional enformer-pytorch: pip install 'embedcache[{EXTRA}]'"
requires_enformer = pytest.mark.skipif(not enformer_available(), reason=ENFORMER_SKIP)


class TinyModels(dict):
    """Model directories by name; the Enformer one is made on first use, and a test that asks for it
    without the `enformer` extra installed is skipped, saying which extra it needs."""

    def __init__(self, root: Path, **made: Path):
        super().__init__(made)
        self.root = root

    def __missing__(self, name: str) -> Path:
        if name != "enformer":
            raise KeyError(name)
        if not enformer_available():
            pytest.skip(ENFORMER_SKIP)
        self[name] = make_tiny_enformer(self.root / "enformer")
        return self[name]


def char_tokenizer(letters: str, specials: list[str], *, template: str | None = None, **kwargs):
    """A fast character tokenizer (one token per letter); `template`: where its special tokens go, e.g. "$A [SEP]"."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*specials, *letters])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=kwargs.get("unk_token")))  # no merges: one token per letter
    if template is not None:
        used = [t for t in specials if t in template]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def save_with_remote_code(directory: Path, config_cls, model_cls, tokenizer, **config) -> Path:
    """Save a random model whose code travels in the checkpoint (auto_map -> its own .py files), as
    HyenaDNA and NT v2 are published; it loads back only with trust_remote_code."""
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModel")
    torch.manual_seed(0)
    model_cls(config_cls(**config)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_hyena_like(directory: Path) -> Path:
    """HyenaDNA-like: causal, tokenizer pads on the LEFT and appends [SEP], forward takes no attention mask,
    config names its depth `n_layer` and width `d_model`."""
    from .toy_remote.configuration_hyena import HyenaToyConfig
    from .toy_remote.modeling_hyena import HyenaToyModel

    specials = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]"]  # HyenaDNA's order
    tokenizer = char_tokenizer(
        "ACGTN", specials, template="$A [SEP]", pad_token="[PAD]", sep_token="[SEP]", cls_token="[CLS]",
        unk_token="[UNK]", mask_token="[MASK]", padding_side="left", model_max_length=64, model_input_names=["input_ids"],
    )  # fmt: skip
    return save_with_remote_code(directory, HyenaToyConfig, HyenaToyModel, tokenizer, vocab_size=16, n_layer=3, l_max=64)


def make_no_depth_model(directory: Path) -> Path:
    """Remote code whose config has no layer count at all (depth = len(kernel_sizes)), with an attention mask."""
    from .toy_remote.configuration_nodepth import NoDepthConfig
    from .toy_remote.modeling_nodepth import NoDepthModel

    tokenizer = char_tokenizer(AA, ["<pad>", "<unk>", "<s>"], template="<s> $A", pad_token="<pad>", unk_token="<unk>",
                               bos_token="<s>", model_max_length=48, model_input_names=["input_ids", "attention_mask"])  # fmt: skip
    return save_with_remote_code(directory, NoDepthConfig, NoDepthModel, tokenizer, kernel_sizes=[3, 5, 3, 3])


def make_bert_like(directory: Path) -> Path:
    """BERT (built into transformers): [CLS] ... [SEP], and a tokenizer that returns token_type_ids."""
    from transformers import BertConfig, BertModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = char_tokenizer(
        AA, specials, template="[CLS]:0 $A:0 [SEP]:0", pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(specials) + len(AA), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)  # fmt: skip
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    return TinyModels(
        root,
        esm2=make_tiny_esm2(root / "esm2"),
        # 40 learned positions, of which ESM-style ids use 2..39 (offset padding_idx + 1): 37 content tokens
        # after <cls>, so DNA over ~220 bp gets windows
        **{"nucleotide-transformer": make_tiny_nucleotide_transformer(root / "nt", max_positions=40)},
        gpt2=make_tiny_gpt2(root / "gpt2"),
        remote=make_remote_code_model(root / "remote"),
        hyena=make_hyena_like(root / "hyena"),
        nodepth=make_no_depth_model(root / "nodepth"),
        bert=make_bert_like(root / "bert"),
    )


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{k}\n{v}\n" for k, v in records.items()))
    return path
