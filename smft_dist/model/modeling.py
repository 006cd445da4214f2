"""`SmftForCausalLM`: `LlamaForCausalLM` with `ProductKeyMemory` layers in place of some FFNs.

Registered with `AutoConfig`/`AutoModelForCausalLM` on import of `smft_dist.model`, so
`save_pretrained` / `from_pretrained` / `generate` work as for any Hugging Face causal LM. The model
holds no collectives: distribution swaps the memory layers' value tables (smft_dist.distributed).
`smft-export` copies this file (and the memory/config files it imports) into exported folders as
standalone remote code (smft_dist.model.standalone), so it imports only torch and transformers
besides smft_dist modules.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaMLP

from smft_dist.memory.layer import ProductKeyMemory
from smft_dist.memory.product_keys import ProductKeys
from smft_dist.memory.values import ValueTable
from smft_dist.model.configuration import SmftConfig


class MemoryAugmentedMLP(LlamaMLP):
    """memory_mode="add": the dense FFN kept, a memory beside it, the memory's output scaled per
    channel by `memory_gate_C` (zero at init).

        out_BSC = ffn(x_BSC) + memory_gate_C * memory(x_BSC)

    While the gate is zero the output equals the FFN's bitwise (ffn + 0 * finite == ffn), so a
    retrofitted model computes exactly what the dense model did. The FFN's weights keep LlamaMLP's
    names (`gate_proj`, `up_proj`, `down_proj`): a dense checkpoint's keys load unchanged."""

    def __init__(self, config, memory: ProductKeyMemory):
        super().__init__(config)
        self.memory = memory
        self.memory_gate = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, x_BSC: torch.Tensor) -> torch.Tensor:
        return super().forward(x_BSC) + self.memory_gate * self.memory(x_BSC)


class SmftForCausalLM(LlamaForCausalLM):
    config_class = SmftConfig
    config: SmftConfig

    def __init__(self, config: SmftConfig):
        super().__init__(config)
        for i in config.memory_layers:
            memory = ProductKeyMemory(
                config.hidden_size, config.memory_n_keys, config.memory_heads, config.memory_knn,
                config.memory_k_dim, config.memory_value_dim, swilu=config.memory_swilu,
                qk_norm=config.memory_qk_norm, value_dtype=config.memory_value_dtype,
            )
            self.model.layers[i].mlp = MemoryAugmentedMLP(config, memory) if config.memory_mode == "add" else memory
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ProductKeys):
            bound = 1.0 / math.sqrt(module.k_dim)
            init.uniform_(module.keys, -bound, bound)
        elif isinstance(module, ValueTable):
            init.normal_(module.weight, 0.0, module.dim ** -0.5)
        elif isinstance(module, MemoryAugmentedMLP):
            init.zeros_(module.memory_gate)

    def memory_layers(self) -> list[ProductKeyMemory]:
        mlps = [self.model.layers[i].mlp for i in self.config.memory_layers]
        return [m.memory if isinstance(m, MemoryAugmentedMLP) else m for m in mlps]

    def memory_parameters(self) -> list[nn.Parameter]:
        """What continued pretraining of the memory alone trains (optim.train_dense=false): the
        memory layers' parameters (queries, keys, W1/W2, a registered value table) and, in add
        mode, their gates. Everything else is the dense model."""
        params = [p for layer in self.memory_layers() for p in layer.parameters()]
        return params + [m.memory_gate for m in (self.model.layers[i].mlp for i in self.config.memory_layers)
                         if isinstance(m, MemoryAugmentedMLP)]

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
