"""ESM-family encoders without padding: a batch of windows packed into one (T, d) set of rows.

A padded batch computes every linear layer, every layer norm and the attention of the padding
too, and hands SDPA a mask. Here the windows of a batch are concatenated once at the input
(FAESM's approach, unlike transformers' flash_attention_2, which unpads per attention call), the
per-token layers run on the T real rows only, and attention runs per window, found by cumulative
lengths (`cu_seqlens`, as flash attention's varlen kernels take them):

    CUDA, fp16/bf16   torch.nn.attention.varlen.varlen_attn (flash attention, varlen)
    otherwise         q, k, v scattered into a padded (b, h, n, dh) batch for one masked
                      scaled_dot_product_attention call, and gathered back: only attention sees
                      padding. (One SDPA call per window is several times slower on a CPU: a
                      batch of 60 short windows spends more in per-call overhead than in math.)

It reuses the model's own submodules (embeddings, query/key/value, layer norms, dense layers),
so weights are never copied and a peft-wrapped linear layer still applies. Only the arithmetic
around them is restated here, from transformers' modeling_esm.py: token-dropout scaling,
positions (rotary, or learned with ESM's padding offset), the pre-LN layer, the final LN.
Parity with the padded model is tested on CPU (tests/embedcache/test_unpadded.py) and, with the
varlen kernel, on CUDA (`pytest -m gpu`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM's token dropout: the share of tokens masked in training (modeling_esm.py)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot run unpadded (None when it can): transformers' own EsmModel only."""
    if type(model).__name__ != "EsmModel" or not type(model).__module__.startswith("transformers.models.esm"):
        return f"{type(model).__name__} is not transformers' EsmModel"
    config = model.config
    if getattr(config, "is_decoder", False):
        return "a decoder ESM"
    if config.position_embedding_type not in ("rotary", "absolute"):
        return f"position embeddings {config.position_embedding_type!r}"
    if config.position_embedding_type == "rotary":
        try:
            _rotary_module(model).inv_freq
        except AttributeError:
            return "no rotary inv_freq where transformers 4.x or 5.x keep it"
    layer = model.encoder.layer[0]
    needed = ("attention.LayerNorm", "attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "LayerNorm", "intermediate.dense", "output.dense")  # fmt: skip
    names = {n for n, _ in layer.named_modules()}
    missing = [n for n in needed if n not in names]
    if missing:
        return f"EsmLayer without {missing} (another transformers layout)"
    return None


def _rotary_module(model: nn.Module) -> nn.Module:
    """The module holding ESM's rotary inv_freq: the model's (transformers 5) or the first layer's (4.x)."""
    shared = getattr(model, "rotary_embeddings", None)
    return shared if shared is not None else model.encoder.layer[0].attention.self.rotary_embeddings


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "scale" in inspect.signature(varlen_attn).parameters


class UnpaddedEsm(nn.Module):
    """Runs a transformers `EsmModel` on packed windows: forward(input_ids (T,), cu_seqlens (b+1,))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"cannot run {type(model).__name__} unpadded: {reason}")
        self.esm = model
        config = model.config
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = config.position_embedding_type == "rotary"
        self.varlen, self.varlen_takes_scale = _varlen_attn()

    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(last hidden state (T, d), every hidden state (L + 1 of (T, d)) or None) of packed windows.

        `input_ids` (T,): the windows' ids (special tokens included), concatenated; `cu_seqlens`
        (b + 1,) int32 on the same device: 0, then the running sum of the window lengths.
        """
        lengths = cu_seqlens.diff()  # (b,)
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)  # (T,)
        position = torch.arange(len(input_ids), device=input_ids.device) - cu_seqlens[:-1].long()[segment]  # (T,)
        packing = Packing(cu_seqlens, max_len, segment, position, lengths)
        hidden = self._embed(input_ids, segment, position, lengths)  # (T, d)
        cos_sin = self._rotary_tables(position) if self.rotary else None
        states = [hidden] if output_hidden_states else None
        for layer in self.esm.encoder.layer:
            hidden = self._layer(layer, hidden, packing, cos_sin)
            if states is not None:
                states.append(hidden)
        if self.esm.encoder.emb_layer_norm_after is not None:
            hidden = self.esm.encoder.emb_layer_norm_after(hidden)
            if states is not None:
                states[-1] = hidden  # as EsmEncoder: the last hidden state is taken after the final LN
        return hidden, None if states is None else tuple(states)

    def _embed(self, input_ids, segment, position, lengths) -> torch.Tensor:
        emb = self.esm.embeddings
        x = emb.word_embeddings(input_ids)  # (T, d)
        if emb.token_dropout:
            is_mask = input_ids == emb.mask_token_id  # (T,)
            x = x.masked_fill(is_mask[:, None], 0.0)
            observed = torch.zeros(len(lengths), device=x.device).index_add_(0, segment, is_mask.float()) / lengths
            x = (x * (1 - MASK_RATIO_TRAIN) / (1 - observed)[segment, None]).to(x.dtype)
        if emb.position_embedding_type == "absolute":
            x = x + emb.position_embeddings(position + emb.padding_idx + 1)  # ESM's learned positions skip padding_idx
        if emb.layer_norm is not None:
            x = emb.layer_norm(x)
        return x

    def _rotary_tables(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = _rotary_module(self.esm)
        inv_freq = rotary.inv_freq.float()  # (dh / 2,)
        scale = float(getattr(rotary, "attention_scaling", 1.0))  # transformers 5: 1.0 for ESM's plain RoPE
        freqs = position.float()[:, None] * inv_freq[None, :]  # (T, dh / 2)
        angle = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, dh): one table for every head
        return angle.cos() * scale, angle.sin() * scale

    def _layer(self, layer: nn.Module, x: torch.Tensor, packing: "Packing", cos_sin) -> torch.Tensor:
        att = layer.attention
        h = att.LayerNorm(x)
        q = rearrange(att.self.query(h), "t (h dh) -> t h dh", dh=self.head_dim)
        k = rearrange(att.self.key(h), "t (h dh) -> t h dh", dh=self.head_dim)
        v = rearrange(att.self.value(h), "t (h dh) -> t h dh", dh=self.head_dim)
        if cos_sin is not None:
            q, k = _rotate(q, *cos_sin), _rotate(k, *cos_sin)
        a = self._attention(q, k, v, packing)  # (T, h, dh)
        x = att.output(rearrange(a, "t h dh -> t (h dh)"), x)  # dense + residual
        return layer.output(layer.intermediate(layer.LayerNorm(x)), x)  # FFN + residual

    def _attention(self, q, k, v, packing: "Packing") -> torch.Tensor:
        """Softmax(q k^T / sqrt(dh)) v within each window: (T, h, dh) each -> (T, h, dh)."""
        # ESM scales the query before the rotation; a rotation is linear, so scaling after it
        # (the kernels' own 1/sqrt(dh)) is the same function.
        if q.is_cuda and self.varlen is not None and q.dtype in (torch.float16, torch.bfloat16):
            kwargs = {"scale": 1 / math.sqrt(self.head_dim)} if self.varlen_takes_scale else {}
            cu, n = packing.cu_seqlens, packing.max_len
            return self.varlen(q, k, v, cu, cu, n, n, **kwargs)
        return _padded_attention(q, k, v, packing)


@dataclass(frozen=True, slots=True)
class Packing:
    """Where each packed row belongs: window `segment` (T,), at `position` (T,) within it."""

    cu_seqlens: torch.Tensor  # (b + 1,) int32
    max_len: int
    segment: torch.Tensor  # (T,)
    position: torch.Tensor  # (T,)
    lengths: torch.Tensor  # (b,)


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Attention within windows through one masked SDPA call on a padded copy of q, k, v."""
    b, n = len(packing.lengths), packing.max_len
    padded = q.new_zeros((3, b, n, *q.shape[1:]))  # (3, b, n, h, dh)
    padded[:, packing.segment, packing.position] = torch.stack((q, k, v))
    qb, kb, vb = rearrange(padded, "three b n h dh -> three b h n dh")
    keys = torch.arange(n, device=q.device)[None, :] < packing.lengths[:, None]  # (b, n): real keys only
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=rearrange(keys, "b n -> b 1 1 n"))  # (b, h, n, dh)
    return rearrange(out, "b h n dh -> b n h dh")[packing.segment, packing.position]  # (T, h, dh)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ESM's rotary embedding of (T, h, dh) at per-token angles, computed in the tables' dtype as ESM does."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


# Where inference runs unpadded by default. CUDA in half precision: the varlen flash kernel skips
# the padding's linear-layer and attention work entirely (fp32 CUDA stays on the padded SDPA path,
# as flash kernels take half precision only). CPU: the padding's share of the positions (~5% with
# length-sorted batches under a 4,096-token budget) is saved, and each window's attention runs on
# the CPU flash kernel without a mask (bench_build.py, section "unpadded"; benchmarks/README.md).
UNPADDED_DEVICES = ("cuda", "cpu")


def use_unpadded(model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Whether an encoder on `device` runs `model` through `UnpaddedEsm` for inference."""
    if device.type not in UNPADDED_DEVICES or unsupported_reason(model) is not None:
        return False
    return device.type != "cuda" or autocast_dtype in (torch.float16, torch.bfloat16)
