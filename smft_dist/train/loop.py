"""The training loop: one function, one call per component each step (torchtitan's shape).

    train(cfg) handles every mode (pretrain | background_index | finetune) and method
    (full | lora | sparse_memory); `Trainer.train_step` holds the per-method step.
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from smft_dist.checkpoint import layout as ckpt
from smft_dist.config import ConfigError, RunConfig, check_paths, data_source, save_config, validate
from smft_dist.data.loader import forever
from smft_dist.distributed import init_distributed
from smft_dist.distributed.replicas import check_replicas
from smft_dist.errors import console_script
from smft_dist.patch.ledger import open_run_ledger
from smft_dist.selection import build_background_index
from smft_dist.train.checkpoint import Checkpointer
from smft_dist.train.evaluation import Evaluator
from smft_dist.train.metrics import MetricLogger, peak_memory_mb
from smft_dist.train.preempt import PREEMPTED_EXIT_CODE, PreemptionFlag
from smft_dist.train.trainer import build_run

log = logging.getLogger("smft_dist")


def build_loader(cfg: RunConfig, ctx, path: str):
    from smft_dist.data.loader import build_dataloader, check_one_group_per_batch

    loader = build_dataloader(path, cfg.data.batch_size, shuffle=cfg.data.shuffle, seed=cfg.data.seed,
                              rank=ctx.rank, world_size=ctx.world_size, local_cache=cfg.data.local_cache,
                              num_workers=cfg.data.num_workers)
    if cfg.mode == "finetune" and not cfg.data.shuffle and cfg.data.one_group_per_batch:
        check_one_group_per_batch(loader.dataset, cfg.data.batch_size, ctx.world_size, cfg.optim.grad_accum)
    return loader


# What a checkpoint's weights were trained under: a resume under other values would mix two runs in one.
# Not here: steps (raising it continues the run), dist/checkpoint/ledger/eval/logging, name, out_dir.
TRAINING_SECTIONS = ("mode", "method", "seed", "precision", "model", "data", "optim", "selection", "lora")
# Keys in those sections that change how a step runs, not what it computes.
NOT_TRAINING = {"model.tokenizer", "model.activation_checkpointing", "data.local_cache", "data.num_workers",
                "optim.max_nonfinite_steps",
                "model.memory_offload",  # where the shard lives: the same step, bit for bit (docs/offload.md)
                # how a step's batch is split over ranks and micro-batches: a resume at another world
                # size may change them (docs/training.md "Resuming at scale")
                "data.batch_size", "optim.grad_accum",
                # paths: a resume loads the checkpoint, not init_from, and the saved data position's
                # dataset fingerprint names a change of data (a path written another way is the same data)
                "model.init_from", "data.train", "data.background"}


def _training_keys(config: dict) -> dict:
    """{dotted key: value} of the training keys of a run config (as a plain dict)."""
    def leaves(node, prefix):
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, sub in node.items() for k, v in leaves(sub, f"{prefix}.{key}").items()}

    flat = {k: v for section in TRAINING_SECTIONS if section in config
            for k, v in leaves(config[section], section).items()}
    return {k: v for k, v in flat.items() if k not in NOT_TRAINING}


def check_same_training(cfg: RunConfig, step_dir: Path) -> None:
    """Refuse to resume `step_dir` when its run was trained under other training keys (the config its
    meta.json records; checkpoints from before that record: the run's <out_dir>/config.yaml)."""
    from omegaconf import OmegaConf

    saved = ckpt.read_meta(step_dir).get("config")
    if saved is None and (Path(cfg.out_dir) / "config.yaml").is_file():
        saved = OmegaConf.to_container(OmegaConf.load(Path(cfg.out_dir) / "config.yaml"))
    if saved is None:
        return
    old, new = _training_keys(saved), _training_keys(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changed = [f"{k}: {old[k]} -> {v}" for k, v in new.items() if k in old and old[k] != v]  # new keys: not saved
    if not changed:
        return
    if cfg.checkpoint.allow_config_change:
        log.warning("resuming %s under changed training keys (checkpoint.allow_config_change): %s",
                    step_dir, "; ".join(changed))
        return
    raise ConfigError(f"{step_dir} was trained under other settings ({'; '.join(changed)}): resuming would continue "
                      f"its weights under the new ones; use a new out_dir for a new run, or set "
                      f"checkpoint.allow_config_change=true to continue this run with them")


def train(cfg: RunConfig) -> int:
    """Run `cfg` to the end; -> process exit code (0, or PREEMPTED_EXIT_CODE after a signal)."""
    check_paths(cfg)  # before any process group work: a typo fails in seconds, naming the key
    ctx = init_distributed(cfg.dist)
    validate(cfg, ctx.world_size)
    out_dir = Path(cfg.out_dir)
    # A background_index run always builds from model.init_from: resuming the step_0 an earlier index
    # run left in out_dir would keep that run's weights and df over a new init_from or background set.
    ckpt_cfg = replace(cfg.checkpoint, resume="none") if cfg.mode == "background_index" else cfg.checkpoint
    checkpointer = Checkpointer(ckpt_cfg, cfg.checkpoint.dir or out_dir / "checkpoints", ctx, cfg.model)
    if checkpointer.resume_dir is not None:  # before anything is built or written
        check_same_training(cfg, checkpointer.resume_dir)
    trainer = build_run(cfg, ctx)
    data_path = data_source(cfg)[1]
    loader = build_loader(cfg, ctx, data_path)
    step = checkpointer.load(trainer, loader)
    # A finished run: its config.yaml, ledger, metrics and checkpoint stay as they are.
    if cfg.mode != "background_index" and step >= cfg.steps:
        if ctx.is_main:
            print(f"run complete at step {step} (steps={cfg.steps}): nothing to train, nothing rewritten; "
                  f"raise steps to train on", flush=True)
        return 0
    evaluator = Evaluator(cfg, trainer.model)  # reads eval.qa and the tokenizer: a bad one fails before any write
    if ctx.is_main:  # only once the run is known to start: a bad run must not overwrite a good run's config
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    trainer.ledger = open_run_ledger(cfg, ctx, ckpt.layer_names(trainer.model), step)  # cut at the resumed step

    if cfg.mode == "background_index":
        with trainer.autocast():  # the slots the finetuning forward (same precision) will pick
            trainer.df_indexes = build_background_index(trainer.model, loader, cfg.selection.background_batches,
                                                        trainer.tables, corpus=str(data_path),
                                                        micro_batches=cfg.optim.grad_accum)
        path = checkpointer.save(0, force=True)
        if ctx.is_main:
            print(f"background df index over {cfg.selection.background_batches} batches saved in {path}", flush=True)
        return 0

    with ExitStack() as stack:
        trainer.preemption = stack.enter_context(PreemptionFlag())
        if trainer.ledger is not None:  # drains its writer and makes it durable, on every way out
            stack.callback(trainer.ledger.close)
        logger = MetricLogger(out_dir, cfg.steps, step, ctx.is_main, cfg.logging.every, cfg.logging.tensorboard,
                              cfg.logging.progress, desc=f"{cfg.name} {cfg.mode}/{cfg.method}",
                              progress_every_s=cfg.logging.progress_every_s)
        stack.callback(logger.close)
        if step == 0 and (before := evaluator(0)):
            logger.write(0, before)
        batches = forever(loader)
        while step < cfg.steps:
            t0 = time.perf_counter()
            metrics = trainer.train_step([next(batches) for _ in range(cfg.optim.grad_accum)])
            metrics["tokens_per_s"] = round(metrics.get("tokens", 0) / (time.perf_counter() - t0), 1)
            step += 1
            metrics["lr"] = trainer.current_lr()
            metrics["peak_mem_mb"] = round(peak_memory_mb(ctx.device), 1)
            metrics.update(evaluator(step))
            logger.log(step, metrics)
            checkpointer.save(step)
            if trainer.preempted:  # agreed by every rank at the step's last all-reduce (a later signal: next step)
                path = checkpointer.save(step, force=True)
                if ctx.is_main:
                    print(f"preempted by signal {trainer.preemption.signum}: saved {path} at step {step}, exiting "
                          f"{PREEMPTED_EXIT_CODE}", flush=True)
                return PREEMPTED_EXIT_CODE
    path = checkpointer.save(step, force=True)
    if ctx.dp_replicate > 1:  # only replica 0 was saved: the others must not have drifted from it
        digests = check_replicas(trainer.tables, ctx)
        if ctx.is_main:
            print(f"memory replicas bitwise identical: {ctx.dp_replicate} copies of each of {ctx.mp_size} shards "
                  f"(rank 0 sha256 {digests})", flush=True)
    if ctx.is_main:
        print(f"done: {step} steps, checkpoint in {path}", flush=True)
    return 0


@console_script
def main(argv=None) -> int:
    import argparse

    from smft_dist.config import load_config

    p = argparse.ArgumentParser(description="Train (pretrain | background_index | finetune) an smft_dist model")
    p.add_argument("--config", required=True, action="append",
                   help="a YAML run config; repeat to merge several in order (e.g. the model.yaml smft-retrofit writes, "
                        "then configs/retrofit/continue_pretrain.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return train(load_config(args.config, args.overrides))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
