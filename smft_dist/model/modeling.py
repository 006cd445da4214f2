"""`SmftForCausalLM`: `LlamaForCausalLM` with `ProductKeyMemory` layers in place of some FFNs.

Registered with `AutoConfig`/`AutoModelForCausalLM` on import of `smft_dist.model`, so
`save_pretrained` / `from_pretrained` / `generate` work as for any Hugging Face causal LM. The model
holds no collectives: distribution swaps the memory layers' value tables (smft_dist.distributed).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers import initialization as init

from smft_dist.memory.layer import ProductKeyMemory
from smft_dist.memory.product_keys import ProductKeys
from smft_dist.memory.values import ValueTable
from smft_dist.model.configuration import SmftConfig


class SmftForCausalLM(LlamaForCausalLM):
    config_class = SmftConfig
    config: SmftConfig

    def __init__(self, config: SmftConfig):
        super().__init__(config)
        for i in config.memory_layers:
            self.model.layers[i].mlp = ProductKeyMemory(
                config.hidden_size, config.memory_n_keys, config.memory_heads, config.memory_knn,
                config.memory_k_dim, config.memory_value_dim, swilu=config.memory_swilu,
                qk_norm=config.memory_qk_norm, value_dtype=config.memory_value_dtype,
            )
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ProductKeys):
            bound = 1.0 / math.sqrt(module.k_dim)
            init.uniform_(module.keys, -bound, bound)
        elif isinstance(module, ValueTable):
            init.normal_(module.weight, 0.0, module.dim ** -0.5)

    def memory_layers(self) -> list[ProductKeyMemory]:
        return [self.model.layers[i].mlp for i in self.config.memory_layers]

    @contextmanager
    def _token_mask(self, attention_mask):
        # The decoder layer calls `mlp(hidden)` without the mask; hand it to the memory layers so
        # padding positions make no lookups (and hence no TF-IDF accesses).
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        layers = self.memory_layers()
        for layer in layers:
            layer.token_mask = mask
        try:
            yield
        finally:
            for layer in layers:
                layer.token_mask = None

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        with self._token_mask(attention_mask):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


AutoConfig.register("smft", SmftConfig)
AutoModelForCausalLM.register(SmftConfig, SmftForCausalLM)
