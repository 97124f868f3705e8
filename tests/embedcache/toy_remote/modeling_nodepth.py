"""A bidirectional conv model that takes an attention mask: padding is zeroed before every conv, so a
right-padded row sees what an unpadded one sees (the conv's own zero padding)."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_nodepth import NoDepthConfig


class NoDepthModel(PreTrainedModel):
    config_class = NoDepthConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.convs = nn.ModuleList(nn.Conv1d(config.width, config.width, k, padding=k // 2) for k in config.kernel_sizes)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        keep = mask[..., None].to(self.embed.weight.dtype)  # (b, n, 1)
        h = self.embed(input_ids) * keep
        states = [h]
        for conv in self.convs:
            h = (h + torch.tanh(conv(h.transpose(1, 2)).transpose(1, 2))) * keep
            states.append(h)
        return BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states) if output_hidden_states else None)
