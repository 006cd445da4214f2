"""Freeze everything but the memory values for sparse memory finetuning (docs/design.md §1.3, §2.6)."""
from __future__ import annotations

import torch.nn as nn


def freeze_dense(model: nn.Module, keep=()) -> list[str]:
    """Set requires_grad=False on every parameter (dense weights, queries, keys, the memory
    layers' W1/W2) and undo anything that makes the input embeddings require grad.

    The value rows get their gradient through the table's own hook (they are never autograd
    parameters), so after this the only tensors requiring grad in the graph are the fetched rows:
    autograd backprops from the loss down to the memory layer and no further. -> names frozen.

    `keep`: parameters left trainable. Continued pretraining of a retrofitted model's memory alone
    (optim.train_dense=false) keeps `model.memory_parameters()`: the memory layers and their gates.
    """
    kept = {id(p) for p in keep}
    frozen = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in kept]
    for p in model.parameters():
        if id(p) not in kept:
            p.requires_grad_(False)
    # HF's enable_input_require_grads (used with gradient checkpointing / PEFT) hooks the
    # embeddings to output a grad-requiring tensor, which would drag backward through every layer.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    return frozen

