"""Build the parts of a run and take one training step.

`build_run(cfg, ctx)` composes: the model (fresh, an HF folder or a checkpoint), the memory
sharding, the method (which weights train, with which optimizer), the dense engine and the df
index. `Trainer.train_step(micro_batches)` is the step for every method:

    zero the tables' step state -> for each of the optim.grad_accum micro-batches: forward
    (autocast for precision=bf16) -> (last one, sparse memory: global TF-IDF top-t over the counts
    of every micro-batch, restrict its backward to those rows) -> backward -> average row grads
    over data-parallel ranks -> dense engine step -> memory optimizer step (once)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from smft_dist.checkpoint import layout as ckpt
from smft_dist.checkpoint.model import load_hf_model, read_hf_config
from smft_dist.config import ConfigError, RunConfig, data_source, memory_trains_densely
from smft_dist.distributed import DistContext, shard_memory
from smft_dist.errors import UserError
from smft_dist.memory.values import DTYPES, LocalValueTable, moved_totals
from smft_dist.model import SmftConfig, SmftForCausalLM
from smft_dist.optim import build_memory_optimizer, build_memory_row_optimizer, freeze_dense
from smft_dist.patch.ledger import recording as ledger_recording
from smft_dist.selection import BackgroundIndex, select_for_model
from smft_dist.train.engines import (DeepSpeedEngine, FSDP2Engine, PlainEngine, cast_frozen_linears_bf16,
                                     deepspeed_config)

log = logging.getLogger("smft_dist")


class NonFiniteLossError(UserError, RuntimeError):
    pass


def lr_lambda(cfg: RunConfig):
    warm, total = cfg.optim.warmup_steps, cfg.steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f


def _dense_optimizer(cfg: RunConfig, params):
    params = [p for p in params if p.requires_grad]
    if not params:
        return None, None
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def _init_source(cfg: RunConfig) -> tuple[Optional[Path], Optional[Path]]:
    """-> (HF folder, checkpoint step dir) named by model.init_from (at most one is set)."""
    if not cfg.model.init_from:
        return None, None
    p = Path(cfg.model.init_from)
    if not p.exists():
        raise FileNotFoundError(f"model.init_from={p} does not exist: point it at a checkpoint folder "
                                "(<out_dir>/checkpoints) or an exported Hugging Face folder")
    if (p / "config.json").is_file() and not (p / "meta.json").is_file():
        _check_not_dense(p)
        return p, None
    return None, ckpt.resolve_checkpoint(p)


def _check_not_dense(hf_dir: Path) -> None:
    """A dense model (no memory layers) would load with its memory-layer FFNs dropped and random
    memories in their place: refuse it and point at the conversion."""
    model_type = read_hf_config(hf_dir)["model_type"]  # a damaged config.json: a CheckpointError naming it
    if model_type != SmftConfig.model_type:
        raise ConfigError(
            f"model.init_from={hf_dir} is a dense '{model_type}' model without memory layers: convert it first "
            f"with `smft-retrofit --model {hf_dir} --layers L --mode add --out DIR` (see docs/retrofit.md), "
            f"then train with --config DIR/model.yaml")


def check_start_tokenizer(cfg: RunConfig, hf_dir: Optional[Path], init_ckpt: Optional[Path]) -> dict:
    """Refuse data written with another tokenizer than the starting weights were trained for, before
    anything is built. The weights' tokenizer: the fingerprint model.init_from's checkpoint meta
    records, or that of the tokenizer inside an HF init_from folder; the data's: its smft_data.json.
    -> {"tokenizer_fingerprint", "tokenizer_folder"} this run's checkpoints record: the data's, else
    (data written before fingerprints) the starting weights'; None values where neither is known."""
    from smft_dist.data.mds import read_info
    from smft_dist.data.tokenizer import (FINGERPRINT_KEY, check_same_tokenizer, load_tokenizer,
                                          tokenizer_fingerprint)

    key, data = data_source(cfg)
    info = (read_info(data) if data and Path(data).is_dir() else None) or {}
    have = {FINGERPRINT_KEY: info.get(FINGERPRINT_KEY), "tokenizer_folder": info.get("tokenizer")}
    if init_ckpt is not None:
        meta = ckpt.read_meta(init_ckpt)
        start = {FINGERPRINT_KEY: meta.get(FINGERPRINT_KEY), "tokenizer_folder": meta.get("tokenizer_folder")}
        start_what = f"model.init_from={init_ckpt} (its meta.json)"
    elif hf_dir is not None and (hf_dir / "tokenizer_config.json").is_file():
        start = {FINGERPRINT_KEY: tokenizer_fingerprint(load_tokenizer(hf_dir)), "tokenizer_folder": str(hf_dir)}
        start_what = f"model.init_from={hf_dir} (its tokenizer)"
    else:  # a fresh init, or an HF folder without a tokenizer: no weights trained on any tokenizer's ids
        return have
    if info:  # data a local folder holds; remote data is checked by whoever wrote it
        model_tok = start["tokenizer_folder"] or "the model's tokenizer"
        check_same_tokenizer(
            have[FINGERPRINT_KEY], f"{key}={data} (its smft_data.json, tokenizer {info.get('tokenizer')})",
            start[FINGERPRINT_KEY], start_what,
            fix=f"re-convert the data with the model's tokenizer (smft-data ... --tokenizer {model_tok}), or set "
                f"checkpoint.allow_tokenizer_change=true if the data's tokenizer keeps every id of the model's "
                f"(e.g. only appends tokens)",
            allow="checkpoint.allow_tokenizer_change" if cfg.checkpoint.allow_tokenizer_change else None)
    return have if have[FINGERPRINT_KEY] else start


def load_df_indexes(source: Optional[Path], model, tables) -> Optional[list[BackgroundIndex]]:
    """df of each memory layer from a folder holding `<layer>.safetensors` files (None if absent)."""
    if source is None:
        return None
    files = [source / f"{n}.safetensors" for n in ckpt.layer_names(model)]
    if not all(f.is_file() for f in files):
        return None
    try:
        return [BackgroundIndex.load(f, t) for f, t in zip(files, tables)]
    except ValueError as e:  # built for another slot count: a mismatched artifact, like a checkpoint's
        raise ckpt.CheckpointError(str(e)) from None


@dataclass
class Trainer:
    cfg: RunConfig
    ctx: DistContext
    model: SmftForCausalLM  # the unwrapped HF model (its memory layers reach the tables)
    tables: list
    engine: PlainEngine
    memory_optimizer: object = None
    df_indexes: Optional[list] = None
    nonfinite_in_a_row: int = 0
    wrapped: object = None  # the PEFT model in LoRA mode (what the engine runs)
    ledger: object = None  # smft_dist.patch.ledger.Ledger: sparse updates recorded (set by the loop)
    preemption: object = None  # train.preempt.PreemptionFlag, read at each step's all-reduces (set by the loop)
    preempted: bool = False  # some rank's flag was set, as of the last step's last all-reduce (the same on every rank)
    tokenizer_identity: Optional[dict] = None  # what checkpoints record of the tokenizer (check_start_tokenizer)

    @property
    def sparse(self) -> bool:
        return self.cfg.mode == "finetune" and self.cfg.method == "sparse_memory"

    def _to_device(self, batch: dict) -> dict:
        batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items() if k in
                 ("input_ids", "attention_mask", "labels")}
        if batch["input_ids"].shape[0] == 0:
            # The HF attention cannot reshape 0 rows, yet this rank must join the memory lookups'
            # collectives: run one all-padding row instead (no label tokens: it trains nothing).
            L = max(batch["input_ids"].shape[1], 1)
            ids = batch["input_ids"].new_zeros(1, L)
            batch = {"input_ids": ids, "attention_mask": torch.zeros_like(ids), "labels": torch.full_like(ids, -100)}
        return batch

    def _scalar(self, value: float) -> torch.Tensor:
        """A float64 0-dim device tensor holding a host number: a fill kernel, not a blocking
        host-to-device copy (as `torch.tensor([...], device=...)` would be)."""
        return torch.full((), float(value), dtype=torch.float64, device=self.ctx.device)

    def _read(self, local_X: torch.Tensor, summed_Y: torch.Tensor) -> tuple[list[float], list[float]]:
        """-> (local_X, summed_Y summed over every rank) on the host, float64 vectors on the device:
        one all-reduce and one device-to-host copy. summed_Y ends with the preemption flag, so
        every rank leaves the step with the same decision (`self.preempted`)."""
        if self.ctx.world_size > 1:
            dist.all_reduce(summed_Y)
        values = torch.cat([local_X, summed_Y]).tolist()
        self.preempted = values[-1] > 0
        return values[:local_X.numel()], values[local_X.numel():-1]

    def _preempt_flag(self) -> torch.Tensor:
        return self._scalar(self.preemption is not None and self.preemption.flag).reshape(1)

    def autocast(self):
        """bf16 autocast of the forward on the run's device (a no-op context for fp32)."""
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def train_step(self, micro_batches: list[dict] | dict) -> dict:
        """One optimizer step over `optim.grad_accum` micro-batches (a dict: one micro-batch).

        The step's loss is the mean over the label tokens of the global batch: micro-batch k on
        rank r weighs n_rk / N (N: the label tokens of every micro-batch on every rank), so any
        world size and K micro-batches of b rows train as one batch of world x K x b rows. Access
        counts accumulate over the K forwards, and in sparse memory finetuning the global top-t is
        chosen after the last forward, before its backward: it covers every micro-batch on every rank.
        Row gradients of micro-batches 1..K-1 travel unrestricted (their selection is not known yet)
        and are filtered by the optimizer; with K = 1 only the selected rows' gradients travel.
        """
        if self.ledger is not None:  # knowledge-patch ledger: the batch's identity (before `group` is dropped)
            self.ledger.begin_step(micro_batches)
        micro = [self._to_device(b) for b in (micro_batches if isinstance(micro_batches, list) else [micro_batches])]
        for t in self.tables:
            t.zero_step()
        moved_rows, moved_bytes = moved_totals(self.tables)
        # Label and attended tokens of each micro-batch (on the device until the first read).
        local_K2 = torch.stack([torch.stack([(b["labels"][:, 1:] != -100).sum(), b["attention_mask"].sum()])
                                for b in micro]).double()
        metrics, selected, stats = {}, None, []
        loss_sum = self._scalar(0.0)  # sum over micro-batches of loss x label tokens, on the device
        for k, batch in enumerate(micro):
            last = k == len(micro) - 1
            with self.autocast():
                out = self.engine(**batch, use_cache=False)  # a KV cache would keep every layer's keys and values
            loss = out.loss
            # A rank without label tokens has the NaN mean over none as its loss: not a failure.
            nonfinite = ((~torch.isfinite(loss.detach())) & (local_K2[k, 0] > 0)).double().reshape(1)
            # One all-reduce and one read per micro-batch, before its backward: whether any rank's
            # loss is non-finite (a backward would carry NaN into the engines' reduced gradients
            # before the step could drop them), with the preemption flag; the first also carries
            # the token counts (the weights of the micro-batches, and whether the step is empty).
            if k == 0:
                local, (global_labels, tokens, nonfinite) = self._read(
                    local_K2.flatten(), torch.cat([local_K2.sum(0), nonfinite, self._preempt_flag()]))
                n_labels = [int(n) for n in local[0::2]]
                if global_labels == 0:  # empty or all-padding batch: nothing to learn, no selection
                    log.warning("skipping a step whose global batch has no label tokens (empty or all padding)")
                    return {"skipped": 1, "rows_selected": 0}
                # The rows' gradients are summed over ranks: / world -> the gradient of the global-mean
                # loss (mean), x the global label tokens -> of the loss summed over them (per_token,
                # docs/design.md §5.2). Each is scaled as its owner keeps it (ValueTable.set_grad_scale).
                row_scale = (global_labels if self.cfg.optim.memory_lr_scale == "per_token" else 1) / self.ctx.world_size
                for t in self.tables:
                    t.set_grad_scale(row_scale)
            else:
                _, (nonfinite,) = self._read(nonfinite[:0], torch.cat([nonfinite, self._preempt_flag()]))
            if nonfinite:
                return self._skip_nonfinite(loss)
            n_label = n_labels[k]
            if last and self.sparse:
                selected, stats = select_for_model(self.tables, self.df_indexes, self.cfg.selection)
                metrics["rows_selected"] = sum(s.selected for s in stats)
            if n_label == 0:  # its loss is the NaN mean over no tokens: it weighs nothing, in the log too
                weighted = out.logits.sum() * 0.0  # this rank has nothing to learn but must join the backward
            else:
                # This micro-batch's share of the global-mean loss, x world: the engines average the
                # dense gradients over ranks and row_scale divides the rows' rank sum by world.
                weighted = loss * (n_label * self.ctx.world_size / global_labels)
                loss_sum = loss_sum + loss.detach().double() * n_label
            self.engine.backward(weighted, sync=last)
        self.nonfinite_in_a_row = 0
        if self.ctx.dp_replicate > 1:
            for t in self.tables:
                t.sync_replicas()
        self.engine.step()
        with ledger_recording(self.ledger, self.tables, selected):  # the selected rows before/after, per rank
            updated = self.memory_optimizer.step(selected) if self.memory_optimizer is not None else 0
        # The step's one metrics all-reduce: loss, rows updated and the preemption flag summed over
        # ranks; the rows touched (already global over each table's group) ride on the same read.
        touched = (torch.stack([s.candidates for s in stats]).sum().double().reshape(1) if stats
                   else loss_sum.reshape(1)[:0])
        touched, (loss_sum, updated) = self._read(
            touched, torch.cat([loss_sum.reshape(1), self._scalar(updated).reshape(1), self._preempt_flag()]))
        metrics.update(loss=loss_sum / global_labels, tokens=int(tokens))
        if stats:
            metrics["rows_touched"] = int(touched[0])
        if self.memory_optimizer is not None:
            metrics["rows_updated"] = int(updated) // self.ctx.dp_replicate  # replicas update the same rows
        if self.cfg.model.memory_offload == "host":  # this rank's host <-> device traffic (docs/offload.md)
            rows_now, bytes_now = moved_totals(self.tables)
            metrics.update(host_rows_moved=rows_now - moved_rows, host_bytes_moved=bytes_now - moved_bytes)
        return metrics

    def _skip_nonfinite(self, loss) -> dict:
        """Drop the step (its accumulated gradients too); stop after max_nonfinite_steps in a row."""
        self.engine.zero_grad()
        for t in self.tables:
            t.zero_step()
        self.nonfinite_in_a_row += 1
        log.warning("non-finite loss (%s) on some rank: step skipped (%d in a row)", loss.item(),
                    self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.cfg.optim.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row: lower the learning rate or check the "
                f"data (optim.max_nonfinite_steps={self.cfg.optim.max_nonfinite_steps})")
        return {"skipped": 1, "rows_selected": 0}

    def current_lr(self) -> float:
        """The learning rate of what trains: the memory rows in sparse mode, else the dense weights."""
        if self.sparse or self.engine.scheduler is None:
            return self.memory_optimizer.lr if self.sparse else self.cfg.optim.lr
        return self.engine.scheduler.get_last_lr()[0]

    def checkpoint_meta(self) -> dict:
        from omegaconf import OmegaConf

        return {"world_size": self.ctx.world_size, "mp": self.ctx.mp_size, "dp_replicate": self.ctx.dp_replicate,
                "engine": self.cfg.dist.engine, "method": self.cfg.method, "mode": self.cfg.mode,
                "model": OmegaConf.to_container(OmegaConf.structured(self.cfg.model)),
                "lora": OmegaConf.to_container(OmegaConf.structured(self.cfg.lora)),
                "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),  # a resume checks it (train.loop)
                **(self.tokenizer_identity or {})}  # a run starting from these weights checks its data against it


def build_fresh_model(cfg: RunConfig, ctx: DistContext) -> tuple[SmftForCausalLM, list]:
    """A seeded model whose memory values are only ever allocated shard by shard.

    The model is built on the meta device; each memory layer gets this rank's table (its rows
    drawn from a generator seeded by `seed + layer position`, so every mp size draws the same
    table), then the dense weights are materialised and initialised with the same seed on every
    rank. No rank ever holds the whole N x D table (4 GiB for the paper's 1M x 1024 in fp32).
    """
    with torch.device("meta"):
        model = SmftForCausalLM(SmftConfig.from_model_config(cfg.model))
    if ctx.world_size > 1:
        tables = shard_memory(model, ctx, seed=cfg.seed)
    else:
        tables = []
        for i, layer in enumerate(model.memory_layers()):
            table = LocalValueTable(layer.num_slots, layer.value_dim, dtype=layer.values.weight.dtype, device=ctx.device)
            table.reset_parameters(torch.Generator().manual_seed(cfg.seed + i))
            layer.set_value_table(table, register=False)  # keep it out of to_empty below
            tables.append(table)
    for table in tables:
        table.weight._is_hf_initialized = True  # drawn above; HF's init_weights leaves it alone
    model.to_empty(device=ctx.device)
    torch.manual_seed(cfg.seed)  # identical dense init on every rank
    with torch.no_grad():
        # _init_weights on every module directly: HF's init_weights() skips modules it marked as
        # initialised while building on the meta device, leaving to_empty's garbage behind.
        model.apply(model._init_weights)
    if ctx.world_size == 1:
        for layer, table in zip(model.memory_layers(), tables):
            layer.set_value_table(table, register=True)  # a plain HF model again (save_pretrained)
    return model, tables


def weights_to_fp32(model: SmftForCausalLM) -> None:
    """Every floating weight in fp32 except the memory value tables (`model.memory_value_dtype`,
    whose bf16 rows the memory optimizers give fp32 master rows).

    Hugging Face folders are often stored in bf16 and `from_pretrained` keeps that dtype; the plain
    engine and FSDP2 keep no master copy (AdamW would round each update into bf16: small steps
    vanish), and precision=bf16 is autocast over fp32 weights (DeepSpeed's bf16 mode makes its own
    bf16 copy and fp32 masters from them)."""
    value_dtype = DTYPES[model.config.memory_value_dtype]
    values = {id(layer.values.weight) for layer in model.memory_layers()}
    for p in model.parameters():
        p.data = p.data.to(value_dtype if id(p) in values else torch.float32)
    for b in model.buffers():
        if b.is_floating_point():
            b.data = b.data.float()


def build_run(cfg: RunConfig, ctx: DistContext) -> Trainer:
    """Compose model, sharding, method, engine and df index. Weights come from model.init_from (a
    checkpoint or an HF folder), else a seeded fresh init; resuming a run is the checkpointer's."""
    hf_dir, init_ckpt = _init_source(cfg)
    tokenizer_identity = check_start_tokenizer(cfg, hf_dir, init_ckpt)
    if init_ckpt is not None:  # before anything is built or loaded
        ckpt.check_model_matches(cfg.model, ckpt.read_meta(init_ckpt).get("model", {}), init_ckpt)
        ckpt.check_intact(init_ckpt)
    if hf_dir is not None:
        model = load_hf_model(hf_dir, SmftForCausalLM)  # on the host, in the dtype it was stored in
        ckpt.check_model_matches(cfg.model, model.config.to_dict(), hf_dir)
        weights_to_fp32(model)
        # Shard on the host: each rank's device receives its own rows only, never the whole table
        # (shard_memory creates the shards on ctx.device, outside the model's registered modules).
        tables = shard_memory(model, ctx) if ctx.world_size > 1 else [layer.values for layer in model.memory_layers()]
        model.to(ctx.device)
    else:
        model, tables = build_fresh_model(cfg, ctx)

    names = ckpt.layer_names(model)
    if init_ckpt is not None:  # before LoRA renames the wrapped linears
        ckpt.load_dense(model, init_ckpt)
        ckpt.load_memory(tables, names, init_ckpt)
    if cfg.model.memory_offload == "host":  # before the memory optimizer: its row state follows the shard
        for t in tables:
            t.offload_to_host(dense_grad_sum=memory_trains_densely(cfg))
    wrapped = None
    if cfg.method == "lora" and cfg.mode == "finetune":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.targets), bias="none")
        wrapped = get_peft_model(model, lcfg)

    # Which weights train, and with which optimizer.
    memory_optimizer = None
    if cfg.mode == "background_index":
        for p in model.parameters():
            p.requires_grad_(False)
        for t in tables:
            t.trainable = False
    elif memory_trains_densely(cfg):
        if not cfg.optim.train_dense:
            freeze_dense(model, keep=model.memory_parameters())
        memory_optimizer = build_memory_row_optimizer(tables, cfg.optim, cfg.seed)
    elif cfg.method == "lora":
        for t in tables:
            t.trainable = False
    else:  # sparse memory finetuning: only the selected memory rows train
        freeze_dense(model)
        memory_optimizer = build_memory_optimizer(tables, cfg.optim)

    run_model = wrapped if wrapped is not None else model
    # from_pretrained returns eval mode: dropout (LoRA's included) must be on while training.
    run_model.train()
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    make_opt = lambda m: _dense_optimizer(cfg, m.parameters())  # noqa: E731
    has_dense = any(p.requires_grad for p in run_model.parameters())
    if cfg.dist.engine != "none" and not has_dense and ctx.is_main:
        log.info("every dense weight is frozen: dist.engine=%s has nothing to do, the plain engine runs",
                 cfg.dist.engine)
    if cfg.dist.engine == "deepspeed" and has_dense:
        # One process keeps its tables registered (a plain HF model); DeepSpeed's bf16 mode would
        # cast them with the module, away from model.memory_value_dtype (sharded tables never are).
        for layer, table in zip(model.memory_layers(), tables):
            layer.set_value_table(table, register=False)
        opt, sched = make_opt(run_model)
        ds_config = deepspeed_config(cfg.dist.zero_stage, cfg.data.batch_size, ctx.world_size, cfg.optim.grad_accum,
                                     cfg.optim.grad_clip, cfg.precision, cfg.dist.deepspeed_config)
        engine = DeepSpeedEngine(run_model, opt, sched, ctx.world_size, ds_config)
    elif cfg.dist.engine == "fsdp2" and ctx.world_size > 1 and has_dense:
        engine = FSDP2Engine(run_model, make_opt, cfg.optim.grad_clip, ctx.world_size, ctx.device.type, cfg.precision)
    else:
        opt, sched = make_opt(run_model)
        engine = PlainEngine(run_model, opt, sched, cfg.optim.grad_clip, ctx.world_size)
        if cfg.precision == "bf16":  # autocast over fp32 weights: cast the frozen ones once, not every forward
            cast_frozen_linears_bf16(run_model)

    df_indexes = None
    if cfg.mode == "finetune" and cfg.method == "sparse_memory" and cfg.selection.mode == "tfidf":
        df_dir = Path(cfg.selection.df_path) if cfg.selection.df_path else None
        # selection.df_path, when set, is the only source: without its files it is an error, not a fallback
        for source in (df_dir,) if df_dir else (init_ckpt and init_ckpt / "df", hf_dir and hf_dir / "background_df"):
            df_indexes = load_df_indexes(source, model, tables) if source else None
            if df_indexes:
                break
        if df_indexes is None and df_dir:
            raise ConfigError(f"selection.df_path={df_dir} holds no "
                              f"{', '.join(n + '.safetensors' for n in ckpt.layer_names(model))}: point it at the df/ "
                              f"folder of a mode=background_index run's checkpoint")
        if df_indexes is None:
            raise FileNotFoundError(
                "sparse memory finetuning with selection.mode=tfidf needs a background df index: run mode="
                "background_index first and set model.init_from to its checkpoints (or selection.df_path to a folder "
                "of <layer>.safetensors files), or use selection.mode=tf")
    return Trainer(cfg, ctx, model, tables, engine, memory_optimizer, df_indexes, wrapped=wrapped,
                   tokenizer_identity=tokenizer_identity)


def enable_activation_checkpointing(model: SmftForCausalLM) -> None:
    """Recompute every decoder block in backward except those holding a memory layer.

    A recomputed memory block would fetch its rows again (a second all-to-all inside the backward,
    which every rank would have to enter in lockstep), record its accesses twice, and run without
    the padding mask (set only during the model's forward). Keeping those blocks' activations
    instead costs one block's activations per memory layer (`smft-inspect --plan` counts them)."""
    model.config.use_cache = False  # a KV cache is never used while training (HF warns otherwise)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i in model.config.memory_layers:
        model.model.layers[i].gradient_checkpointing = False
