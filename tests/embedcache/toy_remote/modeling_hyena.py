"""A HyenaDNA-like causal model: gated causal long convolutions, NO attention mask in forward, and, as
HyenaDNA, a final norm applied to last_hidden_state but not to hidden_states[-1]."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithNoAttention

from .configuration_hyena import HyenaToyConfig


class HyenaToyBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.in_proj = nn.Linear(d, 2 * d)
        self.conv = nn.Conv1d(d, d, config.kernel, groups=d, padding=config.kernel - 1)
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp = nn.Sequential(nn.Linear(d, config.d_inner), nn.GELU(), nn.Linear(config.d_inner, d))

    def forward(self, x):  # (b, n, d)
        u, gate = self.in_proj(self.norm1(x)).chunk(2, dim=-1)
        y = self.conv(u.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)  # causal: left context only
        x = x + self.out_proj(y * torch.sigmoid(gate))
        return x + self.mlp(self.norm2(x))


class HyenaToyModel(PreTrainedModel):
    config_class = HyenaToyConfig
    base_model_prefix = "hyena"
    supports_gradient_checkpointing = False

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(HyenaToyBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, input_ids, inputs_embeds=None, output_hidden_states=None, return_dict=None):
        h = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        states = [h]
        for layer in self.layers:
            h = layer(h)
            states.append(h)
        return BaseModelOutputWithNoAttention(
            last_hidden_state=self.ln_f(h), hidden_states=tuple(states) if output_hidden_states else None
        )
