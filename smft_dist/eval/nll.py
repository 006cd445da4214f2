"""Held-out negative log-likelihood per token, summed over ranks.

Shape legend: B batch, L sequence length, V vocabulary.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def heldout_nll(model, batches: Iterable[dict], device: str | torch.device | None = None,
                max_batches: int | None = None) -> dict:
    """Mean NLL (nats) per trained token over `batches` (dicts with input_ids, attention_mask,
    labels as from `build_dataloader(..., shuffle=False, drop_last=False)`). Under torch.distributed
    every rank must pass the same number of batches (streaming's partitions are equal in size): the
    memory lookup is a collective. Returns {"nll", "ppl", "tokens"}."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        ids_BL, labels_BL = batch["input_ids"].to(device), batch["labels"].to(device)
        logits_BLV = model(input_ids=ids_BL, attention_mask=batch["attention_mask"].to(device)).logits
        # Causal shift: position t predicts token t+1.
        target_BL = labels_BL[:, 1:]
        nll_sum += F.cross_entropy(logits_BLV[:, :-1].flatten(0, 1).float(), target_BL.flatten(),
                                   ignore_index=-100, reduction="sum").item()
        tokens += int((target_BL != -100).sum())
    model.train(was_training)
    sums = torch.tensor([nll_sum, float(tokens)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    nll = sums[0].item() / max(sums[1].item(), 1.0)
    return {"nll": nll, "ppl": float(torch.tensor(nll).exp()), "tokens": int(sums[1].item())}


def mds_heldout_nll(model, path: str, batch_size: int = 8, max_batches: int | None = None,
                    device: str | torch.device | None = None, local_cache: str | None = None) -> dict:
    """`heldout_nll` over an MDS folder or URI (every sample once, in order; under torch.distributed
    each rank reads its partition and the sums are all-reduced: every rank must call this)."""
    from smft_dist.data.loader import build_dataloader

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    loader = build_dataloader(path, batch_size, shuffle=False, seed=0, rank=rank, world_size=world,
                              local_cache=local_cache, drop_last=False)
    return heldout_nll(model, loader, device=device, max_batches=max_batches)
