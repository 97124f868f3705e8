"""Config of a model that states no layer count at all: its depth is len(kernel_sizes)."""

from transformers import PretrainedConfig


class NoDepthConfig(PretrainedConfig):
    model_type = "nodepthtoy"

    def __init__(self, vocab_size=24, width=16, kernel_sizes=(3, 5, 3), context=48, **kwargs):
        self.vocab_size = vocab_size
        self.width = width
        self.kernel_sizes = list(kernel_sizes)
        self.context = context
        super().__init__(**kwargs)
