"""Per-GPU memory of a run, from its config: `smft-inspect --plan`.

    plan = memory_plan(cfg, world=8, mp=8)      # a RunConfig (mode, method, precision, dist, data)
    plan["total_bytes"], plan["parts"]          # bytes per GPU, and what they are

docs/plan.md lists every part and what it counts. The weight, gradient, optimizer and memory-shard
parts are the bytes of real tensors (tests/test_memory_plan.py builds them on the meta device);
the activation, logits and exchange parts count what autograd saves and what the step allocates
for the code as written (tests/test_plan_vs_profiler.py compares them with the profiler's peak).
Every part is summed, so the total is an upper bound: the row gradients, the DeepSpeed step's
copies and (sparse finetuning) the row state's growth are not all alive at the activations' peak.

Not counted: the CUDA context and allocator fragmentation (leave ~10% headroom), the optimizers'
elementwise temporaries (after backward has freed the activations, which are larger), the data
loader.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from smft_dist.config import RunConfig, memory_trains_densely
from smft_dist.memory.sharded import owner_slice_rows, pooled_wire_bytes, rows_wire_bytes
from smft_dist.memory.values import DTYPES, SUM_CHUNK_ELEMENTS
from smft_dist.model import SmftConfig, SmftForCausalLM

GB = 1e9
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's zero_optimization.reduce_bucket_size default


def build_meta_model(cfg: RunConfig) -> SmftForCausalLM:
    with torch.device("meta"):
        return SmftForCausalLM(SmftConfig.from_model_config(cfg.model))


def lora_params(model: nn.Module, targets, r: int) -> int:
    """Parameters PEFT adds: r x (in + out) for every nn.Linear whose name ends in a target."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] in set(targets))


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the step's tensors. e: what the linears compute in (2 under bf16);
    r: the residual stream (fp32 under autocast, whose adds promote the bf16 block outputs to the
    fp32 embeddings; bf16 when DeepSpeed or FSDP2 compute in bf16 weights); autocast: whether each linear
    makes its own bf16 copy of its input (autocast caches the casts of weights, not of inputs)."""

    e: int
    r: int
    autocast: bool


def norm_bytes(h: int, dt: Dtypes, weights_train: bool) -> int:
    """Per token, one HF LlamaRMSNorm: its fp32 upcast of x (x itself when fp32: `pow` saves it)
    and the fp32 rsqrt; when its weight trains, also the normalised x cast back to the residual
    dtype (the weight multiply saves it for the weight's gradient)."""
    return 4 * h + 4 + (dt.r * h if weights_train else 0)


def attention_bytes(h: int, kv: int, heads: int, dt: Dtypes, weights_train: bool) -> int:
    """Per token, one attention block: q, k, v and the output that SDPA saves (o_proj's input is a
    view of that output) and its fp32 log-sum-exp per head (O(T), not O(T^2)); when the weights
    train, also the inputs of q/k/v_proj (one bf16 cast each under autocast, else one tensor)."""
    inputs = (3 if dt.autocast else 1) * h * dt.e if weights_train else 0
    return inputs + (2 * h + 2 * kv) * dt.e + heads * 4


def ffn_bytes(h: int, I: int, dt: Dtypes, weights_train: bool) -> int:
    """Per token, one SwiGLU FFN: the gate and up outputs and the activation (the multiply's and
    silu's backward need them); when the weights train, also the inputs of gate/up_proj (one cast
    each under autocast) and the product (down_proj's input)."""
    if not weights_train:
        return 3 * I * dt.e
    return (2 if dt.autocast else 1) * h * dt.e + 4 * I * dt.e


def pooled_lookup(cfg: RunConfig, world: int, mp: int, trainable: int) -> bool:
    """Whether the run's lookups pool at the owners (a sharded table, world > 1) or fetch the unique
    rows (one process: LocalValueTable; or dist.memory_exchange=rows). `auto` decides as the table
    does at each step (smft_dist.memory.sharded: the bytes each exchange would put on the wire),
    here for a micro-batch whose every token is real: pooled at the paper's shapes up to mp ~ 32,
    unique rows beyond (pooled moves a T x D partial per owner, so its bytes grow with mp)."""
    exchange = cfg.dist.memory_exchange
    if world == 1 or exchange != "auto":
        return world > 1 and exchange == "pooled"
    mcfg = cfg.model
    T, K, D = cfg.data.batch_size * cfg.data.seq_len, mcfg.memory_heads * mcfg.memory_knn, mcfg.memory_value_dim
    backward = cfg.mode != "background_index"
    row_grads = backward and not (cfg.mode == "finetune" and cfg.method == "lora")  # LoRA freezes the tables
    wire = 2 if cfg.precision == "bf16" else 4
    value_bytes = DTYPES[mcfg.memory_value_dtype].itemsize
    pooled = pooled_wire_bytes([T] * mp, K, mp, D, wire, [trainable > 0] * mp, backward, row_grads)
    rows = rows_wire_bytes([T] * mp, K, mp, mcfg.memory_n_keys ** 2, D, value_bytes, backward, row_grads)
    return not rows < pooled  # the table's rule: rows only when strictly fewer bytes


def lookup_bytes(mcfg, dt: Dtypes, query_grad: bool, pooled: bool) -> int:
    """Per token, one memory layer (the lookup and its gated output), what autograd keeps.

    Always: the silu gate (D x e), w2's input (D x e) and the int64 token index that scatters the
    bag into the padded batch. The bag, per head x knn entry: pooled, the requester's route (int64
    entry order, int32 local row id and token) and the owner's saved entries (int64 row id and bag,
    fp32 weight), 36 bytes; unique rows, the bag's int64 inverse ids and fp32 weights plus its three
    int64 per-token bookkeeping tensors (offsets, offset-to-bag, bag sizes); the fetched rows
    themselves are `fetched_row_bytes`. When gradient reaches the query (the layer's input
    requires grad: pretraining, full and LoRA finetuning): the padding mask (1 byte), the query's
    input and w1's input (h x e each), the fp32 queries the scoring saves (heads x k_dim x 4), the
    int64 indices of both top-k's (heads x 2 x knn and heads x knn x 8), the fp32 bag output
    (D x 4: the gate multiply's other factor) and w1's output (D x e)."""
    h, D, H, K = mcfg.hidden_size, mcfg.memory_value_dim, mcfg.memory_heads, mcfg.memory_knn
    bag = H * K * 36 if pooled else H * K * (8 + 4) + 3 * 8
    bag += 8 + 2 * D * dt.e
    if not query_grad:
        return bag
    scoring = 1 + 2 * h * dt.e + H * mcfg.memory_k_dim * 4 + H * K * (2 * 8 + 8)
    return bag + scoring + D * (4 + dt.e)


def fetched_row_bytes(mcfg, T: int) -> int:
    """The unique-row lookup keeps its fetched rows for backward, cast to the fp32 bag weights:
    U x D x 4 per memory layer, U at most min(T x heads x knn, slots). The pooled lookup keeps none."""
    U = min(T * mcfg.memory_heads * mcfg.memory_knn, mcfg.memory_slots)
    return len(mcfg.memory_layers) * U * mcfg.memory_value_dim * 4


def memory_plan(cfg: RunConfig, world: int, mp: int, gpus_per_node: int = 8) -> dict:
    """-> {"settings": ..., "parts": {name: bytes per GPU}, "total_bytes": int, "total_gb": float,
    "host_parts": {name: bytes of host memory per GPU's process}, "host_bytes_per_node": int,
    "host_gb_per_node": float}. model.memory_offload=host moves the memory shard and its optimizer
    row state from `parts` to `host_parts` (x gpus_per_node ranks per node, at most world), sums the
    step's row gradients there (the device holds one lookup's, or one slice: `memory_row_grads`) and adds
    the device's copy of the rows one lookup reads (`offload_rows`, docs/offload.md)."""
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
    # FSDP2 computes in gathered bf16 weights and DeepSpeed casts the module (the embeddings, hence
    # the residual stream, are bf16 too): only the plain engine runs bf16 as autocast over fp32 weights.
    dt = Dtypes(e=e, r=2 if bf16 and engine != "none" else 4, autocast=bf16 and engine == "none")

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
    parts["deepspeed_buffers"] = deepspeed_buffer_bytes(cfg, engine, zero, trainable, world, 2 if ds_bf16 else 4)

    # the memory: this rank's shard and the optimizer state of the rows it may update
    rows = math.ceil(mcfg.memory_slots / mp)
    layers = len(mcfg.memory_layers)
    D = mcfg.memory_value_dim
    value_dtype = DTYPES[mcfg.memory_value_dtype]
    parts["memory_values"] = rows * D * value_dtype.itemsize * layers
    kept, growth = memory_optimizer_bytes(cfg, rows, D, value_dtype)
    parts["memory_optimizer"] = layers * kept
    parts["memory_optimizer_growth"] = growth
    host_parts = {}
    offload = cfg.model.memory_offload == "host"
    if offload:
        for name in ("memory_values", "memory_optimizer", "memory_optimizer_growth"):
            host_parts[name] = parts.pop(name)

    # one micro-batch: what the forward keeps for backward, and the step's transients
    T = cfg.data.batch_size * cfg.data.seq_len
    lora = cfg.mode == "finetune" and cfg.method == "lora"
    memory_trains = training and not lora
    pooled = pooled_lookup(cfg, world, mp, trainable)
    # resident: the step's row gradients stay on the device until the memory optimizer sums them
    # (`RowSparse`); offloaded: each lookup's move to the host as they arrive (ValueTable._keep_grad),
    # a slice of the owner's rows at a time under the pooled exchange, into the shard's host sum
    # (`ShardRowSum`), which the optimizer reads, or in sparse finetuning kept as entries there
    if memory_trains:
        slice_rows = owner_slice_rows(D) if offload and pooled else None
        grads = memory_row_grads(cfg, mcfg, rows, world, mp, T, pooled, slice_rows)
        # where the step's row gradients are kept, and what summing (or reading) them allocates
        if offload and memory_trains_densely(cfg):  # summed on the host as they arrive (values.ShardRowSum)
            kept = layers * (rows * D * 4 + grads.step * 8)
            summed = shard_row_sum_read_bytes(rows, grads.step, grads.lookup, D, grads.unique)
        else:  # the entries, summed at the step (values.RowSparse)
            kept = layers * grads.step * D * 4
            summed = 0 if grads.one_unique_entry else row_grad_sum_bytes(grads.step, D, grads.lookup, grads.unique)
        if offload:  # the device holds one lookup's (under the pooled exchange, one slice's)
            parts["memory_row_grads"] = grads.lookup * D * 4
        (host_parts if offload else parts).update(memory_row_grads=kept, memory_row_grad_sum=summed)
    else:
        parts["memory_row_grads"] = 0
        (host_parts if offload else parts)["memory_row_grad_sum"] = 0
    parts["lookup_exchange"] = (lookup_exchange_bytes(mcfg, world, mp, T, e, pooled, value_dtype.itemsize)
                                if world > 1 else 0)
    if offload:
        parts["offload_rows"] = offload_row_bytes(mcfg, rows, world, T, value_dtype.itemsize, pooled)
    # bf16 over fp32 weights (the plain engine): a frozen linear keeps a bf16 copy of its weight for
    # the whole run (engines.cast_frozen_linears_bf16); autocast casts each trainable linear's
    # weight once per step and keeps the cast until backward (its cast cache), 2 bytes per element.
    # Every dense linear trains (pretraining, full finetuning) or none does (sparse memory
    # finetuning, the df pass, LoRA's base layers, whose adapters are the trainable linears).
    all_train = trainable == dense
    linears = linear_elements(model) if dt.autocast else 0
    parts["frozen_bf16_weights"] = 0 if all_train else 2 * linears
    parts["autocast_weight_copies"] = (2 * linears if all_train else 2 * trainable) if training and dt.autocast else 0
    parts["activations"] = activation_bytes(cfg, mcfg, dt, T, trainable, training, pooled)
    V = mcfg.vocab_size
    # logits T x V x e stay alive (the output holds them); the loss saves its fp32 log-softmax; at
    # the top of backward the NLL's T x V fp32 gradient and the log-softmax's fp32 input gradient
    # join them (under bf16 the fp32 copy of the logits made for the loss is freed once it is used).
    parts["logits"] = T * V * (e + 12) if training else T * V * e
    total = sum(parts.values())
    settings = {"mode": cfg.mode, "method": cfg.method, "precision": cfg.precision, "engine": engine,
                "zero_stage": zero, "world": world, "mp": mp, "micro_batch": cfg.data.batch_size,
                "seq_len": cfg.data.seq_len, "activation_checkpointing": cfg.model.activation_checkpointing,
                "dense_params": dense, "trainable_dense_params": trainable, "memory_rows_per_rank": rows,
                "autocast": dt.autocast, "memory_offload": cfg.model.memory_offload, "gpus_per_node": gpus_per_node}
    host_node = sum(host_parts.values()) * min(gpus_per_node, world)
    return {"settings": settings, "parts": parts, "total_bytes": total, "total_gb": round(total / GB, 2),
            "host_parts": host_parts, "host_bytes_per_node": host_node, "host_gb_per_node": round(host_node / GB, 2)}


def owner_entries(mcfg, world: int, T: int, pooled: bool) -> int:
    """The most entries an owner's lookup handles on the device at a time: every rank's T x heads x
    knn (all of them may read this shard), and under the pooled exchange at most one slice of them
    (`ShardedValueTable.owner_slice_rows` plus one bag, heads x knn, memory/sharded.py)."""
    HK = mcfg.memory_heads * mcfg.memory_knn
    return min(world * T * HK, owner_slice_rows(mcfg.memory_value_dim) + HK) if pooled else world * T * HK


def offload_row_bytes(mcfg, rows: int, world: int, T: int, value_bytes: int, pooled: bool) -> int:
    """An offloaded shard's rows on the device while one memory layer's lookup runs (layers run one
    at a time): the unique rows the owner reads, at most the shard and `owner_entries`, copied in
    from the host (ValueTable.unique_rows), in the table's dtype."""
    return min(rows, owner_entries(mcfg, world, T, pooled)) * mcfg.memory_value_dim * value_bytes


def activation_bytes(cfg: RunConfig, mcfg, dt: Dtypes, T: int, trainable: int, training: bool,
                     pooled: bool) -> int:
    """What one micro-batch's forward keeps for backward (training) or the largest block's
    outputs (forward only). Blocks below the first memory layer keep nothing when no dense weight
    trains (sparse memory finetuning): no gradient flows through them; the memory block itself then
    keeps only its lookup's bag path (its attention's input needs no gradient)."""
    h, I, L = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_hidden_layers
    heads = mcfg.num_attention_heads
    kv = (mcfg.num_key_value_heads or heads) * (h // heads)
    weights_train = bool(trainable)
    # both norms of a block live in this part
    attn = 2 * norm_bytes(h, dt, weights_train) + attention_bytes(h, kv, heads, dt, weights_train)
    ffn = ffn_bytes(h, I, dt, weights_train)
    add_mode = mcfg.memory_mode == "add"  # the FFN beside the memory, and the gate's multiply input
    first = min(mcfg.memory_layers)
    if not training:
        return T * (h * 4 + max(attn, ffn, lookup_bytes(mcfg, dt, False, pooled)) + 4 * h)
    memory_block = attn + lookup_bytes(mcfg, dt, True, pooled) + (ffn + h * dt.e if add_mode else 0)
    bag_only = lookup_bytes(mcfg, dt, False, pooled) + (h * dt.e if add_mode else 0)
    blocks_with_grad = [i for i in range(L) if trainable or i > first]
    dense_blocks = sum(1 for i in blocks_with_grad if i not in mcfg.memory_layers)
    memory_blocks = sum(memory_block if (trainable or i > first) else bag_only for i in mcfg.memory_layers)
    if cfg.model.activation_checkpointing:
        # recomputed blocks keep their input (the residual), one is recomputed at a time; memory
        # blocks are never recomputed (trainer.enable_activation_checkpointing)
        per_token = dense_blocks * h * dt.r + (attn + ffn if dense_blocks else 0) + memory_blocks
    else:
        per_token = dense_blocks * (attn + ffn) + memory_blocks
    rows = 0 if pooled else fetched_row_bytes(mcfg, T)
    # + the final norm, lm_head's input (for its weight's gradient) and the embedding's int64 token ids
    return rows + T * (per_token + norm_bytes(h, dt, weights_train) + (h * dt.e if weights_train else 0) + 8)


def linear_elements(model: SmftForCausalLM) -> int:
    """Elements of every nn.Linear's weight and bias (attention, FFN, lm_head, the memory layers'
    query, w1 and w2)."""
    return sum(p.numel() for m in model.modules() if type(m) is nn.Linear for p in m.parameters(recurse=False))


def lookup_exchange_bytes(mcfg, world: int, mp: int, T: int, e: int, pooled: bool, value_bytes: int) -> int:
    """The exchange's buffers while one memory layer runs (layers run one at a time), T tokens per
    rank on every rank. Pooled: forward, the owner's fp32 partial bags for every requester's
    tokens, their copy in the wire dtype (e) and the M partials received (mp x T x D x (4 + 2e)),
    plus the fp32 sum (T x D x 4), and for a bf16 shard one slice's entry rows that the owner
    bags, gathered and copied to fp32 (`owner_entries` x D x (2 + 4)); backward, grad_y expanded to every owner and
    received there, in the wire dtype and as fp32 (mp x T x D x (2e + 4)), no larger. Unique rows:
    the owner's gathered rows and the rows received (2 x U x D x 4 at most, U as in
    `fetched_row_bytes`)."""
    D = mcfg.memory_value_dim
    if pooled:
        upcast = owner_entries(mcfg, world, T, pooled) * D * (value_bytes + 4) if value_bytes != 4 else 0
        return mp * T * D * (4 + 2 * e) + T * D * 4 + upcast
    return 2 * fetched_row_bytes(mcfg, T) // len(mcfg.memory_layers)


@dataclass(frozen=True)
class RowGrads:
    """Rows of fp32 row gradients an owner keeps for one table (`memory_row_grads`)."""

    lookup: int  # one lookup's entry on the device (offloaded, pooled: one slice of it)
    step: int  # the step's entries, every one of its micro-batches'
    unique: bool  # an entry's rows do not repeat (the pooled exchange, one process)
    one_unique_entry: bool  # the step leaves one entry of unique rows: its own sum


def memory_row_grads(cfg: RunConfig, mcfg, rows: int, world: int, mp: int, T: int,
                     pooled: bool, slice_rows: Optional[int] = None) -> RowGrads:
    """The fp32 row gradients an owner keeps for one table (`ValueTable._keep_grad`), D x 4 bytes
    a row, from backward until the memory optimizer has stepped. `slice_rows`: an offloaded owner's
    pooled backward keeps them that many rows at a time (`ShardedValueTable.owner_slice_rows`):
    one lookup's on the device is one slice, and a lookup of more rows leaves several entries.

    One lookup (one memory layer, one micro-batch) leaves one entry at the owner: the pooled
    exchange's (and one process's) unique rows of the shard, at most the shard and the world's
    T x heads x knn ids; the unique-row exchange's entries of every requester concatenated,
    which may repeat a row, at most mp shards and the world's ids. A resident table sums the
    entries only at the optimizer's `sparse_grad`, so the step's are every layer's entry of each of
    the optim.grad_accum micro-batches. Sparse memory finetuning keeps the top-t selected rows of the
    last micro-batch (selection.max_rows per requester at worst); the earlier micro-batches' travel
    unrestricted (their selection is not known yet: Trainer.train_step)."""
    HK, K = mcfg.memory_heads * mcfg.memory_knn, cfg.optim.grad_accum
    unique = pooled or world == 1

    def entry_rows(cap: int) -> int:  # cap: the rows of this shard one requester (pooled: the owner) may keep
        return min(cap if unique else mp * cap, world * T * HK)

    unrestricted = entry_rows(rows)
    if cfg.mode == "finetune" and cfg.method == "sparse_memory":
        selected = entry_rows(min(rows, cfg.selection.max_rows))
        lookup, step = unrestricted if K > 1 else selected, (K - 1) * unrestricted + selected
    else:
        lookup, step = unrestricted, K * unrestricted
    # one entry of sorted unique rows a table (RowSparse.add's sorted_unique) is its own sum
    one_unique_entry = K == 1 and unique and cfg.dist.dp_replicate == 1 and (slice_rows is None or lookup <= slice_rows)
    return RowGrads(lookup=min(lookup, slice_rows or lookup), step=step, unique=unique,
                    one_unique_entry=one_unique_entry)


def _add_temporaries(entry: int, D: int, unique: bool, chunk_elements: int) -> int:
    """`add_rows_in_order` adding one entry of `entry` rows: per chunk, the gathered rows and their
    sum (and, where the entry's rows may repeat, the pass's rows gathered too, and 9 int64 of
    bookkeeping a row: sorted ids, order, runs, run starts, the k of each row, its pass order...)."""
    chunk = min(entry, max(1, chunk_elements // D))
    return (2 if unique else 3) * chunk * D * 4 + (0 if unique else entry * 9 * 8)


def row_grad_sum_bytes(N: int, D: int, entry: int, unique: bool, chunk_elements: int = SUM_CHUNK_ELEMENTS) -> int:
    """What `RowSparse.coalesce` (values.sum_entries_by_id) allocates beyond one table's N entry
    rows of D fp32 values while it sums them (entries of `entry` rows, `unique`: theirs do not
    repeat), at most: the output, the unique rows' sums and ids (at most N), and the ids' inverse,
    8 bytes a row, with one entry's `_add_temporaries` (the entries are added one by one, each
    freed once added)."""
    return N * (D * 4 + 16) + _add_temporaries(entry, D, unique, chunk_elements)


def shard_row_sum_read_bytes(rows: int, N: int, entry: int, D: int, unique: bool,
                             chunk_elements: int = SUM_CHUNK_ELEMENTS) -> int:
    """What an offloaded table's host sum (`values.ShardRowSum`, its buffer counted in
    `memory_row_grads`) allocates beyond its buffer and kept ids, at most: while a lookup's entry
    is added, `_add_temporaries`; at the optimizer step, the copy of the touched rows' sums
    (min(shard rows, N) x D x 4) and the unique of the N kept ids (their concatenation, sort
    and inverse, at most 5 int64 a row)."""
    return max(_add_temporaries(entry, D, unique, chunk_elements), min(rows, N) * D * 4 + N * 5 * 8)


def deepspeed_buffer_bytes(cfg: RunConfig, engine: str, zero: int, trainable: int, world: int, g: int) -> int:
    """DeepSpeed ZeRO-1/2's contiguous gradient bucket (reduce_bucket_size elements in the gradient
    dtype, allocated whole at the first backward) plus, at the step, this rank's flattened gradient
    partition and its fp32 copy: P_t / W x (g + 4). 0 for the other engines and ZeRO-0 fp32 (its
    all-reduce flattens at most a bucket of gradients, counted as the bucket)."""
    if engine != "deepspeed":
        return 0
    zero_cfg = {}
    if cfg.dist.deepspeed_config:
        zero_cfg = json.loads(Path(cfg.dist.deepspeed_config).read_text()).get("zero_optimization", {})
    bucket = int(zero_cfg.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET))
    if zero == 0:
        return min(bucket, trainable) * g
    contiguous = zero_cfg.get("contiguous_gradients", True)
    return (bucket * g if contiguous else 0) + math.ceil(trainable / world) * (g + 4)


def memory_optimizer_state(cfg: RunConfig, D: int, value_dtype: torch.dtype) -> tuple[type, dict]:
    """-> (its `row_state_class`, the per-row state specs: its `_all_specs`) of the run's memory
    optimizer, built on a one-row meta table; (None, {}) where the memory does not train."""
    from smft_dist.memory.values import ValueTable
    from smft_dist.optim import build_memory_optimizer, build_memory_row_optimizer

    table = ValueTable(1, D, 0, 1, dtype=value_dtype, device="meta")
    if cfg.mode == "background_index" or (cfg.mode == "finetune" and cfg.method == "lora"):
        return None, {}
    if cfg.mode == "finetune" and cfg.method == "sparse_memory":
        opt = build_memory_optimizer([table], cfg.optim)
    else:
        opt = build_memory_row_optimizer([table], cfg.optim)
    return opt.row_state_class, opt._all_specs(table)


def memory_optimizer_bytes(cfg: RunConfig, rows: int, D: int, value_dtype: torch.dtype) -> tuple[int, int]:
    """-> (kept, growth) of the run's memory optimizer for one table's shard of `rows` rows:
    `dense_row_state_bytes` and no growth where it trains every touched row (pretraining, full
    finetuning), `row_state_bytes` for the rows sparse memory finetuning may update."""
    from smft_dist.optim.row_state import DenseRowState

    state_class, specs = memory_optimizer_state(cfg, D, value_dtype)
    if not specs:  # the optimizer keeps no row state (plain SGD on fp32 values)
        return 0, 0
    if state_class is DenseRowState:
        return dense_row_state_bytes(specs, rows), 0
    return row_state_bytes(specs, min(rows, cfg.steps * cfg.selection.max_rows), rows)


def dense_row_state_bytes(specs: dict, rows: int) -> int:
    """The bytes a `DenseRowState` with these specs allocates, once, for a shard of `rows` rows:
    every row's state, and a bool per row marking the rows updated unless the specs count each
    row's updates ("step")."""
    row_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
    return rows * (row_bytes + (0 if "step" in specs else 1))


def row_state_bytes(specs: dict, rows_with_state: int, rows: int) -> tuple[int, int]:
    """-> (kept, growth): the bytes a `RowState` with these specs keeps for a shard of `rows` rows
    once `rows_with_state` of them have state (its buffers at `capacity_for` slots, and the int32
    row -> slot map), and the extra bytes at the peak of its growth from the capacity it last grew
    from (the one for half the rows; none when that growth was the first). `RowState._reserve`
    grows the int64 row ids first, then the state by increasing row size, one buffer at a time:
    growing buffer i, those before it are at the new capacity and it and those after at the old.
    With moments of D values that peak is the largest buffer's old copy; with per-row state
    smaller than the row ids (row-wise Adagrad's one fp32) it is while the ids grow."""
    from smft_dist.optim.row_state import MIN_CAPACITY, capacity_for

    row_bytes = [8] + sorted(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
    capacity = capacity_for(rows_with_state, rows)
    previous = capacity_for(-(-rows_with_state // 2), rows) if rows_with_state > MIN_CAPACITY else 0
    growth = max(previous * b - (capacity - previous) * sum(row_bytes[i + 1:]) for i, b in enumerate(row_bytes))
    return capacity * sum(row_bytes) + rows * 4, max(growth, 0)
