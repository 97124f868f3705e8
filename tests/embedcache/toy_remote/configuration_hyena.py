"""Config of a HyenaDNA-like model: its depth is `n_layer` and its width `d_model`, as in HyenaDNA's."""

from transformers import PretrainedConfig


class HyenaToyConfig(PretrainedConfig):
    model_type = "hyenatoy"

    def __init__(self, vocab_size=12, d_model=16, n_layer=3, d_inner=32, l_max=64, kernel=7, layer_norm_epsilon=1e-5, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layer = n_layer
        self.d_inner = d_inner
        self.l_max = l_max
        self.kernel = kernel
        self.layer_norm_epsilon = layer_norm_epsilon
        super().__init__(**kwargs)
