"""Per-GPU memory of a run, from its config: `smft-inspect --plan`.

    plan = memory_plan(cfg, world=8, mp=8)      # a RunConfig (mode, method, precision, dist, data)
    plan["total_bytes"], plan["parts"]          # bytes per GPU, and what they are

Parts (bytes on one GPU; P dense parameters, P_t of them trainable, W world, R memory rows of this
rank's shard, D value dim, T = micro_batch x seq_len tokens, h hidden, I FFN width, V vocab,
e activation bytes: 2 in bf16, 4 in fp32):

- dense_weights: P x 2 under DeepSpeed bf16 (it casts the module); P x 4 otherwise (autocast keeps
  fp32 weights); FSDP2 holds P x 4 / W plus two gathered decoder blocks (the one computing and the
  one prefetched) in the compute dtype.
- dense_grads: P_t x (2 DeepSpeed bf16, else 4), / W under ZeRO-2 and FSDP2.
- dense_optimizer: AdamW's two fp32 moments, plus DeepSpeed bf16's fp32 master weights: P_t x 8
  (x 12), / W under ZeRO-1/2 and FSDP2. No trainable dense weight (sparse memory finetuning): 0.
- memory_values: R x D x value bytes per memory layer.
- memory_optimizer: per memory layer, the row state (`RowState`) at its capacity for the rows
  that may be updated (every row of the shard for pretraining/full finetuning; min(R, steps x
  top_t) for sparse memory finetuning, all on one rank at worst): the capacity doubles from 64 rows
  and stops at R, so it is R at the cap and under 2x the rows with state below it. Per slot:
  AdamW's two fp32 moments and an int64 step (pretrain/full), SGD momentum if any, the fp32 master
  copy when values are stored in bf16, and the int64 row id; plus the int32 row -> slot map over R.
- memory_optimizer_growth: while the row state grows (one table, one buffer at a time) the old
  copy of one buffer lives beside the new capacity: the largest buffer at the capacity before the
  last growth. It happens in the optimizer step, after the backward has freed the activations, so
  counting it on top of them makes the total an upper bound by that much.
- activations (an estimate, not measured here): per decoder block that backward passes through
  (with every dense weight frozen, only those above the first memory layer) and token, (7h + 4I) x e saved
  for backward (norm inputs and outputs, q/k/v, attention output, FFN gate/up/act/product; flash
  attention saves O(T), not O(T^2)); with activation checkpointing only the block input (h x e) of
  each recomputed block plus one block being recomputed; memory blocks are never recomputed
  (trainer.enable_activation_checkpointing) and save their attention part plus the lookup: queries,
  top-k ids/weights, and the fetched rows U x D x e with their bf16 and fp32 gradients, U bounded by
  min(T x heads x knn, slots); logits T x V x (e + 4 + 4) (the fp32 copy for the loss and its grad).

Not counted: the CUDA context and allocator fragmentation (leave ~10% headroom), communication
buckets, the data loader.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from smft_dist.config import RunConfig
from smft_dist.memory.values import DTYPES
from smft_dist.model import SmftConfig, SmftForCausalLM

GB = 1e9


def build_meta_model(cfg: RunConfig) -> SmftForCausalLM:
    with torch.device("meta"):
        return SmftForCausalLM(SmftConfig.from_model_config(cfg.model))


def lora_params(model: nn.Module, targets, r: int) -> int:
    """Parameters PEFT adds: r x (in + out) for every nn.Linear whose name ends in a target."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] in set(targets))


def memory_plan(cfg: RunConfig, world: int, mp: int) -> dict:
    """-> {"settings": ..., "parts": {name: bytes per GPU}, "total_bytes": int, "total_gb": float}."""
    model = build_meta_model(cfg)
    mcfg = model.config
    value_ids = {id(layer.values.weight) for layer in model.memory_layers()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in value_ids)
    bf16 = cfg.precision == "bf16"
    training = cfg.mode != "background_index"
    if not training or (cfg.mode == "finetune" and cfg.method == "sparse_memory"):
        trainable = 0
    elif cfg.mode == "finetune" and cfg.method == "lora":
        trainable = lora_params(model, cfg.lora.targets, cfg.lora.r)
    else:
        trainable = dense
    engine = cfg.dist.engine if trainable and not (cfg.dist.engine == "fsdp2" and world == 1) else "none"
    zero = cfg.dist.zero_stage if engine == "deepspeed" else 0
    ds_bf16 = engine == "deepspeed" and bf16
    e = 2 if bf16 else 4

    parts = {}
    # dense weights (+ LoRA adapters, held like the weights they adapt)
    held = dense + (trainable if cfg.method == "lora" and cfg.mode == "finetune" else 0)
    if engine == "fsdp2":
        block = sum(p.numel() for p in model.model.layers[0].parameters())
        parts["dense_weights"] = math.ceil(held * 4 / world) + 2 * block * e
    else:
        parts["dense_weights"] = held * (2 if ds_bf16 else 4)
    grad_shard = world if (engine == "fsdp2" or zero >= 2) else 1
    parts["dense_grads"] = math.ceil(trainable * (2 if ds_bf16 else 4) / grad_shard)
    opt_shard = world if (engine == "fsdp2" or zero >= 1) else 1
    parts["dense_optimizer"] = math.ceil(trainable * (12 if ds_bf16 else 8) / opt_shard)

    # the memory: this rank's shard and the optimizer state of the rows it may update
    rows = math.ceil(mcfg.memory_slots / mp)
    layers = len(mcfg.memory_layers)
    D = mcfg.memory_value_dim
    value_dtype = DTYPES[mcfg.memory_value_dtype]
    parts["memory_values"] = rows * D * value_dtype.itemsize * layers
    kept, growth = memory_optimizer_bytes(cfg, rows, D, value_dtype)
    parts["memory_optimizer"] = layers * kept
    parts["memory_optimizer_growth"] = growth

    # activations of one micro-batch
    T = cfg.data.batch_size * cfg.data.seq_len
    h, I, V, L = mcfg.hidden_size, mcfg.intermediate_size, mcfg.vocab_size, mcfg.num_hidden_layers
    kv = (mcfg.num_key_value_heads or mcfg.num_attention_heads) * (h // mcfg.num_attention_heads)
    attn = (5 * h + 2 * kv) * e  # norm in/out, q, attention out, o_proj in, post-norm in/out; k, v
    ffn_block = attn + 4 * I * e
    U = min(T * mcfg.memory_heads * mcfg.memory_knn, mcfg.memory_slots)
    hk = mcfg.memory_heads * mcfg.memory_knn
    lookup_token = mcfg.memory_heads * mcfg.memory_k_dim * e + hk * (8 + 4 + e) + 4 * D * e
    memory_block = T * (attn + lookup_token) + U * D * (e + e + 4)
    # Blocks below the first memory layer save nothing when no dense weight trains (sparse memory
    # finetuning): no gradient flows through them.
    first = min(mcfg.memory_layers)
    dense_layers = sum(1 for i in range(L) if i not in mcfg.memory_layers and (trainable or i > first))
    if not training:
        act = T * max(ffn_block, attn + lookup_token) + U * D * e  # forward only: one block at a time
        logits = T * V * e
    elif cfg.model.activation_checkpointing:
        act = dense_layers * T * h * e + T * ffn_block + layers * memory_block
        logits = T * V * (e + 4 + 4)
    else:
        act = dense_layers * T * ffn_block + layers * memory_block
        logits = T * V * (e + 4 + 4)
    parts["activations"] = act + T * h * e  # + the embedding output
    parts["logits"] = logits
    total = sum(parts.values())
    settings = {"mode": cfg.mode, "method": cfg.method, "precision": cfg.precision, "engine": engine,
                "zero_stage": zero, "world": world, "mp": mp, "micro_batch": cfg.data.batch_size,
                "seq_len": cfg.data.seq_len, "activation_checkpointing": cfg.model.activation_checkpointing,
                "dense_params": dense, "trainable_dense_params": trainable, "memory_rows_per_rank": rows,
                "lookup_rows_bound": U}
    return {"settings": settings, "parts": parts, "total_bytes": total, "total_gb": round(total / GB, 2)}


def memory_optimizer_state_specs(cfg: RunConfig, D: int, value_dtype: torch.dtype) -> dict:
    """The per-row state the run's memory optimizer keeps (its `_all_specs`, without a table)."""
    from smft_dist.memory.values import ValueTable
    from smft_dist.optim import RowSparseAdamW, build_memory_optimizer

    table = ValueTable(1, D, 0, 1, dtype=value_dtype, device="meta")
    if cfg.mode == "background_index" or (cfg.mode == "finetune" and cfg.method == "lora"):
        return {}
    if cfg.mode == "finetune" and cfg.method == "sparse_memory":
        opt = build_memory_optimizer([table], cfg.optim)
    else:
        opt = RowSparseAdamW([table], cfg.optim.memory_lr)
    return opt._all_specs(table)


def memory_optimizer_bytes(cfg: RunConfig, rows: int, D: int, value_dtype: torch.dtype) -> tuple[int, int]:
    """-> `row_state_bytes` of the run's memory optimizer for one table's shard of `rows` rows."""
    specs = memory_optimizer_state_specs(cfg, D, value_dtype)
    if not specs:  # the optimizer keeps no row state (plain SGD on fp32 values)
        return 0, 0
    if cfg.mode == "finetune" and cfg.method == "sparse_memory":
        rows_with_state = min(rows, cfg.steps * cfg.selection.top_t)
    else:
        rows_with_state = rows
    return row_state_bytes(specs, rows_with_state, rows)


def row_state_bytes(specs: dict, rows_with_state: int, rows: int) -> tuple[int, int]:
    """-> (kept, growth): the bytes a `RowState` with these specs keeps for a shard of `rows` rows
    once `rows_with_state` of them have state (its buffers at `capacity_for` slots, and the int32
    row -> slot map), and the extra bytes at the peak of its growth (the largest buffer at the
    capacity it last grew from: the one for half the rows, none when that growth was the first)."""
    from smft_dist.optim.row_state import MIN_CAPACITY, capacity_for

    row_bytes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs.values()] + [8]  # + the int64 row id
    capacity = capacity_for(rows_with_state, rows)
    previous = capacity_for(-(-rows_with_state // 2), rows) if rows_with_state > MIN_CAPACITY else 0
    return capacity * sum(row_bytes) + rows * 4, previous * max(row_bytes)
