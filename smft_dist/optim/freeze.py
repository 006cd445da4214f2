"""Freeze everything but the memory values for sparse memory finetuning (docs/design.md §1.3, §2.6)."""
from __future__ import annotations

import torch.nn as nn


def freeze_dense(model: nn.Module) -> list[str]:
    """Set requires_grad=False on every parameter (dense weights, queries, keys, the memory
    layers' W1/W2) and undo anything that makes the input embeddings require grad.

    The value rows get their gradient through the table's own hook (they are never autograd
    parameters), so after this the only tensors requiring grad in the graph are the fetched rows:
    autograd backprops from the loss down to the memory layer and no further. -> names frozen.
    """
    frozen = [name for name, p in model.named_parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    # HF's enable_input_require_grads (used with gradient checkpointing / PEFT) hooks the
    # embeddings to output a grad-requiring tensor, which would drag backward through every layer.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    return frozen
